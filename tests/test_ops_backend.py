"""The dispatcher: lazy loading, FASTEM_BACKEND forcing, defaults, and torch.compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ops_helpers import NO_EXT

from fastem_ext import ops
from fastem_ext.mstep import HQSConfig, hqs, kernel_spectra
from fastem_ext.ops import _backend
from fastem_ext.physics import gaussian_kernel, psf2otf
from fastem_ext.schedule import Schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (imports and lazy loading start from scratch)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FASTEM_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**environment, **env}, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_builds_and_loads_nothing():
    out = _python(
        "import sys, torch, fastem_ext\n"
        "print('fastem_ext.ops' in sys.modules)\n"
        "import fastem_ext.ops\n"
        "from fastem_ext.ops import _backend\n"
        "print(sorted(torch.ops.loaded_libraries), _backend._load_extension.cache_info().currsize,"
        " any('cpp_extension' in m for m in sys.modules))\n"
        "x = torch.rand(1, 3, 8, 8)\n"
        "fastem_ext.ops.predict_x0(x, x, torch.rand(6, 2) + 1, torch.tensor(0))\n"
        "print(len(torch.ops.loaded_libraries))")
    assert out.splitlines() == ["False", "[] 0 False", "1"]


def test_no_ext_runs_the_references():
    out = _python(
        "import torch\n"
        "from fastem_ext import ops\n"
        "from fastem_ext.ops import _backend\n"
        "x = torch.rand(1, 3, 8, 8)\n"
        "ops.predict_x0(x, x, torch.rand(6, 2) + 1, torch.tensor(0))\n"
        "print(_backend.select('predict_x0', torch.device('cpu')),"
        " len(torch.ops.loaded_libraries))",
        FASTEM_NO_EXT="1")
    assert out == "reference 0"


def _profiled_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_fastem_backend_forces_the_implementation(monkeypatch, backend):
    if backend == "triton" and _backend.unavailable("triton", torch.device("cpu")):
        pytest.skip("triton cannot run on this machine's CPU")
    if backend == "cpp" and NO_EXT:
        pytest.skip("FASTEM_NO_EXT is set: no C++ extension")
    monkeypatch.setenv("FASTEM_BACKEND", backend)
    cross, otf = torch.randn(6, 4, dtype=torch.complex64), torch.randn(6, 4, dtype=torch.complex64)
    energy, shift, step = torch.rand(6, 4), torch.rand(2) + 1, torch.tensor(1)
    names = _profiled_names(lambda: ops.wiener_z(cross, energy, otf, shift, step, 2.0))
    assert ("fastem::wiener_z" in names) == (backend == "cpp")
    assert ("fastem_triton::wiener_z" in names) == (backend == "triton")
    assert _backend.select("wiener_z", torch.device("cpu")) == backend


def test_defaults_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTEM_BACKEND", raising=False)
    cpu = torch.device("cpu")
    expected = "cpp" if _backend.unavailable("cpp", cpu) is None else "reference"
    assert _backend.select("wiener_z", cpu) == expected
    assert _backend.select("wiener_z", torch.device("meta")) == "reference"


def test_bad_or_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTEM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTEM_BACKEND"):
        _backend.select("wiener_z", torch.device("cpu"))
    monkeypatch.setenv("FASTEM_BACKEND", "triton")
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.select("wiener_z", torch.device("cpu"))


def test_cpp_ops_compile_with_their_fake_kernels(monkeypatch):
    if _backend.unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    monkeypatch.setenv("FASTEM_BACKEND", "cpp")
    spec = torch.fft.rfft2(torch.rand(2, 3, 8, 6))

    def step(spec_x, otf, r2, index):
        cross, energy = ops.spectral_sums(spec_x[0], spec_x)
        return ops.pigdm_filter(spec_x, otf, spec_x[0], r2, index, 0.1), cross, energy

    args = (spec, spec[0, 0], torch.rand(3), torch.tensor(2))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, expected in zip(compiled(*args), step(*args), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_one_captured_graph_replays_every_step(monkeypatch, backend):
    """The fused step reads its scalars on the device: a graph captured at one step replays
    correctly at another after only the step tensor changed."""
    device = torch.device("cuda")
    why = _backend.unavailable(backend, device)
    if why is not None:
        pytest.fail(f"{backend} unavailable on CUDA: {why}")
    monkeypatch.setenv("FASTEM_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    shape = (32, 32)
    x_t, eps, noise = (torch.randn(2, 3, *shape, generator=g).to(device) for _ in range(3))
    spec_y = torch.fft.rfft2(torch.rand(3, *shape, generator=g).to(device))
    tables = Schedule("10").tables(device)
    coefs, ridge = ops.ddpm_coefficients(tables), tables.x0_var
    kernel = gaussian_kernel(5, 1.0, device=device)
    config = HQSConfig(iters=3, regularizer="l1").validate()
    step = torch.tensor(7, device=device)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x0 = ops.predict_x0(x_t, eps, coefs, step)
        spec_x = torch.fft.rfft2(x0)
        k = hqs(kernel_spectra(spec_y, spec_x), kernel, 0.05, config, shape, ridge_r2=ridge,
                step=step)
        filtered = ops.pigdm_filter(spec_x, psf2otf(k, shape), spec_y, ridge, step, 0.05)
        v = torch.fft.irfft2(filtered, s=shape)
        return ops.ddpm_update(x_t, eps, coefs, step, noise, grad=v)[0], k

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for index in (7, 4, 0):
        step.fill_(index)
        graph.replay()
        for got, expected in zip(captured, run(), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
