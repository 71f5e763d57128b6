"""Shared fixtures of the test suite (the ``cuda`` marker lives in the repository's conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from ops_helpers import NO_EXT

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTEM_DATA", REPO.parent / "shared" / "data"))

# Without a GPU the fused ops' Triton kernels are tested in Triton's interpreter on CPU tensors;
# it must be switched on before fastem_ext.ops defines the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FUSED_BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu"),
    pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=pytest.mark.cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
]


def _force_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Sets ``FASTEM_BACKEND`` to the parameter's backend; returns the device to test on.

    The C++ extension must be built (``pip install --no-build-isolation -e .``) unless
    ``FASTEM_NO_EXT=1`` says it is not; Triton cases skip only where triton is not installed.
    """
    from fastem_ext.ops import _backend

    name, device = request.param
    device = torch.device(device)
    if name == "cpp" and NO_EXT:
        pytest.skip("FASTEM_NO_EXT is set: no C++ extension")
    if name == "triton" and _backend.triton is None:
        pytest.skip("triton is not installed")
    if name == "triton" and device.type == "cpu" and not _backend.TRITON_INTERPRET:
        pytest.skip("Triton's CPU interpreter is only switched on where there is no GPU")
    why = _backend.unavailable(name, device)
    if why is not None:
        pytest.fail(f"backend {name} unavailable on {device}: {why}")
    monkeypatch.setenv("FASTEM_BACKEND", name)
    return device


@pytest.fixture(params=[pytest.param(("reference", "cpu"), id="reference-cpu"), *FUSED_BACKENDS])
def op_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Each implementation of the ops in turn, the pure-torch references included: they are the
    CPU fallback, so the tests' own oracles check them too."""
    return _force_backend(request, monkeypatch)


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """Each fused backend in turn: registered ops (opcheck), input checks, fused vs reference."""
    return _force_backend(request, monkeypatch)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"test data not found at {DATA} (set FASTEM_DATA to ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def val_crop(data_dir: Path) -> torch.Tensor:
    """A 256×256 centre crop of kodak_01, [3, 256, 256] float32 in [0, 1]."""
    from fastem_ext.io import center_crop, read_image

    image, _ = read_image(data_dir / "natural" / "val" / "kodak_01.png")
    return center_crop(image, 256)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The CLI sets torch's thread count for the process; no test leaks it into the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
