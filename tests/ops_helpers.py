"""Helpers of the fused-op tests: random inputs, the float64 oracle and the error rule.

The rule (STYLE.md): evaluated against the reference in float64, the fused op's max error must
be at most 2× the error of the same reference run in float32 — PyTorch's own error — plus a
floor of a few float32 ulps of the output's scale (for outputs the float32 reference happens to
get exactly right). For bfloat16 / float16 outputs: the same reference run in that dtype, the
floor in that dtype's ulps.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NO_EXT = os.environ.get("FASTEM_NO_EXT", "0") not in ("", "0")  # the README's mode without C++
SHAPES = [(8, 8), (9, 7), (6, 11)]  # even, odd and non-square grids
PARTICLES = [1, 3, 16]


def generator(*key: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand(shape: Sequence[int], g: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32."""
    return torch.rand(*shape, generator=g).to(device)


def randn(shape: Sequence[int], g: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(*shape, generator=g).to(device)


def spectrum(shape: Sequence[int], g: torch.Generator, device: torch.device) -> Tensor:
    """The rfft2 of a random image ``[*shape]`` (a genuine Hermitian half spectrum)."""
    return torch.fft.rfft2(torch.rand(*shape, generator=g)).to(device)


def to_double(x: object) -> object:
    """Float tensors (float32, bfloat16, float16, complex64) in float64 / complex128."""
    if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex()):
        return x.to(torch.complex128 if x.is_complex() else torch.float64)
    return x


def _real(t: Tensor) -> Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).detach().cpu().double()


def _tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def assert_float64_rule(out: Tensor | Sequence[Tensor], reference: Callable, args: Sequence,
                        *, factor: float = 2.0, floor_ulps: float = 4.0) -> None:
    """``out`` (the fused op on ``args``) against ``reference`` (module docstring)."""
    outs = _tuple(out)
    ref64 = _tuple(reference(*[to_double(a) for a in args]))
    ref32 = _tuple(reference(*args))
    assert len(outs) == len(ref64)
    for i, (o, r32, r64) in enumerate(zip(outs, ref32, ref64, strict=True)):
        assert o.dtype == r32.dtype and o.shape == r32.shape and o.device == r32.device, i
        ulp = torch.finfo(o.dtype if o.is_floating_point() else torch.float32).eps
        o, r32, r64 = _real(o), _real(r32), _real(r64)
        assert torch.isfinite(o).all(), f"output {i} has non-finite values"
        err = (o - r64).abs().max().item()
        err_ref = (r32 - r64).abs().max().item()
        bound = factor * err_ref + floor_ulps * ulp * r64.abs().max().item()
        assert err <= bound, (f"output {i}: error {err:.3e} vs float64 exceeds {factor}x the "
                              f"float32 reference's {err_ref:.3e} (+ floor): {bound:.3e}")


def registered_op(name: str, backend: str) -> torch._ops.OpOverloadPacket:
    """The op object behind a backend: ``fastem::<name>`` (C++) or ``fastem_triton::<name>``."""
    return getattr(torch.ops.fastem if backend == "cpp" else torch.ops.fastem_triton, name)
