"""Which implementation of a fused op runs: ``reference`` (pure torch), ``triton`` or ``cpp``.

``FASTEM_BACKEND=reference|triton|cpp`` forces one (an error if it cannot run on the inputs'
device); otherwise the first available in the device's preference order below runs. The C++
library ``fastem_ext._C`` is loaded on the first call that wants it, never at import, and it is
never built here (``pip install --no-build-isolation -e .`` builds it; ``FASTEM_NO_EXT=1`` at run
time ignores a built one). Triton runs on CUDA tensors, and on CPU tensors only when
``TRITON_INTERPRET=1`` was set before this package was imported (the interpreter is for tests:
it is never chosen by default on CPU). The fused kernels compute in float32: inputs of another
dtype (the float64 oracles of the tests) always run the reference.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the references and the C++ ops do not need it
    triton = None
    tl = None

BACKENDS = ("reference", "triton", "cpp")
FUSED_DTYPES = (torch.float32, torch.complex64)
# Fastest first. CPU: the C++ ops win or tie at the engine's shapes (benchmarks/RESULTS.md);
# GPU (H100, 2026-11-26): C++ wins or ties on every op but ddpm_update at n >= 4, where Triton
# is faster (28 vs 52 µs at n = 16; one op in the step, so C++ stays first).
PREFERENCE = {"cuda": ("cpp", "triton", "reference"), "cpu": ("cpp", "reference")}

# Set at import: Triton decides at kernel definition whether kernels run in its interpreter.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_FAKES: dict[str, Callable] = {}
_FAKES_REGISTERED: set[str] = set()


def register_fake(name: str, fake: Callable) -> None:
    """The fake (meta) kernel of ``fastem::<name>``: registered now if the library is loaded
    (csrc/fastem.cpp names this module for torch.compile to import), else when it loads."""
    _FAKES[name] = fake
    if hasattr(torch.ops.fastem, name):
        _register_fakes()


def _register_fakes() -> None:
    for name, fake in _FAKES.items():
        if name not in _FAKES_REGISTERED:
            torch.library.register_fake(f"fastem::{name}")(fake)
            _FAKES_REGISTERED.add(name)


@functools.cache
def _load_extension() -> str | None:
    """Load ``fastem_ext._C`` once. Returns ``None`` on success, else why it is unavailable."""
    if os.environ.get("FASTEM_NO_EXT", "0") not in ("", "0"):
        return "FASTEM_NO_EXT is set"
    spec = importlib.util.find_spec("fastem_ext._C")
    if spec is None or spec.origin is None:
        return "fastem_ext._C is not built (pip install --no-build-isolation -e .)"
    torch.ops.load_library(spec.origin)
    _register_fakes()
    return None


def load_extension() -> None:
    """Load ``fastem_ext._C`` now: a compiled program that calls the ops by name (``export``)
    needs them registered. RuntimeError saying why when it cannot."""
    why = _load_extension()
    if why is not None:
        raise RuntimeError(f"the fastem C++ ops are unavailable: {why}")


# torch.compile runs this eagerly and keeps the answer (it loads libraries, reads caches).
@torch.compiler.assume_constant_result
def unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (``None`` when it can)."""
    if backend == "reference":
        return None
    if device.type not in ("cpu", "cuda"):
        return f"no {backend} kernels for {device.type} tensors"
    if backend == "triton":
        if triton is None:
            return "triton is not installed"
        if device.type == "cpu" and not TRITON_INTERPRET:
            return "Triton runs CPU tensors only with TRITON_INTERPRET=1 set before import"
        return None
    if backend == "cpp":
        why = _load_extension()
        if why is None and device.type == "cuda" and not torch.ops.fastem.has_cuda():
            why = "fastem_ext._C was built without CUDA kernels"
        return why
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def select(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    forced = os.environ.get("FASTEM_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTEM_BACKEND must be one of {BACKENDS}, got {forced!r}")
        why = unavailable(forced, device)
        if why is not None:
            raise RuntimeError(f"FASTEM_BACKEND={forced} cannot run {op} on {device}: {why}")
        return forced
    order = PREFERENCE.get(device.type, ("reference",))
    return next(b for b in order if unavailable(b, device) is None)


def dispatch(op: str, like: torch.Tensor, reference: Callable,
             triton_impl: Callable | None, scalar: float | torch.Tensor = 0.0) -> Callable:
    """The callable for ``op`` on tensors like ``like``: ``reference``, ``triton_impl`` or
    ``fastem::<op>`` (the reference for any dtype but float32/complex64, and when ``scalar``,
    an argument the kernels take as a host float, is a tensor: a traced program's input, e.g.
    σ in ``export``, which a host float would freeze at its traced value)."""
    if like.dtype not in FUSED_DTYPES or isinstance(scalar, torch.Tensor):
        return reference
    backend = select(op, like.device)
    if backend == "cpp":
        return getattr(torch.ops.fastem, op)
    if backend == "triton":
        return triton_impl
    return reference


def dense(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in row-major layout (``None`` passes). cuFFT may hand back strided spectra
    (``rfft2`` of a 2-D grid on CUDA is one); the kernels index them densely, so the op
    wrappers take any layout and copy only what is not already contiguous."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def table_index(values: torch.Tensor | float, like: torch.Tensor,
                step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-step scalar as the ``(table [S], step 0-d int64)`` pair that the ops read, in the
    dtype and on the device of ``like``.

    A float becomes a one-entry table, filled on the device (no host-to-device copy: CUDA-graph
    capture allows it); ``step=None`` or a one-entry table reads entry 0.
    """
    if isinstance(values, torch.Tensor):
        table = values.to(device=like.device, dtype=like.dtype).reshape(-1)
    else:
        table = torch.full((1,), float(values), dtype=like.dtype, device=like.device)
    if step is None or table.numel() == 1:
        step = torch.zeros((), dtype=torch.int64, device=like.device)
    return table, step


def launch_grid(n: int, block: int) -> tuple[int]:
    """Programs for ``n`` elements, ``block`` per program."""
    return (max(1, -(-n // block)),)


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch Triton kernels on ``t``'s GPU (Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
