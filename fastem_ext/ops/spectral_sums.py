"""Fused op 1a, ``spectral_sums(Y, X) -> (A, B)``: the loop-invariant sums of the M-step's
Z-update (Eq. 24, see ``fastem_ext.mstep``), ``A = Σ_{i,c} conj(X^i_c)·Y_c`` and
``B = Σ_{i,c} |X^i_c|²``, in one pass over particles and channels (float64 accumulators in the
fused kernels).

Spectra are rfft2 half spectra: ``X`` ``[n, C, H, Wh]``, ``Y`` ``[C, H, Wh]`` (shared) or
``[n, C, H, Wh]`` (one target per particle), complex64; ``A`` ``[H, Wh]`` complex64, ``B``
``[H, Wh]`` float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks
from ._backend import tl, triton

BLOCK = 256  # frequencies per program


def _reference(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
    cross = (spec_x.conj() * spec_y).sum(dim=(0, 1))
    energy = (spec_x.real.square() + spec_x.imag.square()).sum(dim=(0, 1))
    return cross, energy


def _fake(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
    plane = spec_x.shape[-2:]
    return spec_x.new_empty(plane), spec_x.new_empty(plane, dtype=torch.float32)


_backend.register_fake("spectral_sums", _fake)

if triton is not None:

    @triton.jit
    def _spectral_sums_kernel(x_ptr, y_ptr, cross_ptr, energy_ptr, n, channels, freqs,
                              Y_SHARED: tl.constexpr, BLOCK: tl.constexpr):
        # x: [n, C, F, 2], y: [C or n·C, F, 2] (interleaved complex); cross: [F, 2]; energy: [F].
        f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = f < freqs
        acc_re = tl.zeros([BLOCK], dtype=tl.float64)
        acc_im = tl.zeros([BLOCK], dtype=tl.float64)
        energy = tl.zeros([BLOCK], dtype=tl.float64)
        for c in range(channels):
            sum_re = tl.zeros([BLOCK], dtype=tl.float64)
            sum_im = tl.zeros([BLOCK], dtype=tl.float64)
            for i in range(n):
                offset = ((i * channels + c) * freqs + f) * 2
                xr = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float64)
                xi = tl.load(x_ptr + offset + 1, mask=mask, other=0.0).to(tl.float64)
                energy += xr * xr + xi * xi
                if Y_SHARED:  # Σ_i conj(X_i)·Y_c: one product per channel, after the loop
                    sum_re += xr
                    sum_im += xi
                else:
                    yr = tl.load(y_ptr + offset, mask=mask, other=0.0).to(tl.float64)
                    yi = tl.load(y_ptr + offset + 1, mask=mask, other=0.0).to(tl.float64)
                    acc_re += xr * yr + xi * yi
                    acc_im += xr * yi - xi * yr
            if Y_SHARED:
                offset = (c * freqs + f) * 2
                yr = tl.load(y_ptr + offset, mask=mask, other=0.0).to(tl.float64)
                yi = tl.load(y_ptr + offset + 1, mask=mask, other=0.0).to(tl.float64)
                acc_re += sum_re * yr + sum_im * yi
                acc_im += sum_re * yi - sum_im * yr
        tl.store(cross_ptr + 2 * f, acc_re.to(tl.float32), mask=mask)
        tl.store(cross_ptr + 2 * f + 1, acc_im.to(tl.float32), mask=mask)
        tl.store(energy_ptr + f, energy.to(tl.float32), mask=mask)

    @torch.library.custom_op("fastem_triton::spectral_sums", mutates_args=())
    def _triton_impl(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
        n, channels, height, half = _checks.spectra(spec_x, "spec_x")
        shared = _checks.target(spec_y, (n, channels, height, half), spec_x.device)
        cross, energy = _fake(spec_y, spec_x)
        freqs = height * half
        with _backend.device_guard(spec_x):
            _spectral_sums_kernel[_backend.launch_grid(freqs, BLOCK)](
                torch.view_as_real(spec_x), torch.view_as_real(spec_y), torch.view_as_real(cross),
                energy, n, channels, freqs, Y_SHARED=shared, BLOCK=BLOCK)
        return cross, energy

    _triton_impl.register_fake(_fake)
else:
    _triton_impl = None


def spectral_sums(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of Eq. 24 (module docstring)."""
    impl = _backend.dispatch("spectral_sums", spec_x, _reference, _triton_impl)
    return impl(*_backend.dense(spec_y, spec_x))
