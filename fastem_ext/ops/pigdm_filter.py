"""Fused op 2, ``pigdm_filter(X, K, Y, r2, step, σ)``: the ΠGDM filter of the guidance (Eq. 17,
``guidance.pigdm_vector``) ``conj(K)·R / (r²|K|² + σ²)`` with ``R = Y − K·X`` formed in the same
pass (or ``R = X`` when ``Y`` is ``None``: ``X`` is then already a residual spectrum, e.g. of the
masked model); ``r² = r2[step]`` is read on the device.

Spectra: ``X`` ``[n, C, H, Wh]``, ``Y`` ``[C, H, Wh]`` (shared) or ``[n, C, H, Wh]``, ``K``
``[H, Wh]``, complex64 half spectra.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import at
from . import _backend, _checks
from ._backend import tl, triton

BLOCK = 256  # frequencies per program


def _pigdm_reference(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                     sigma: float) -> Tensor:
    residual = spec if spec_y is None else spec_y - otf * spec
    gain = otf.real.square() + otf.imag.square()
    return otf.conj() * residual / (at(r2, step) * gain + sigma**2)


def _pigdm_fake(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                sigma: float) -> Tensor:
    return torch.empty_like(spec)


_backend.register_fake("pigdm_filter", _pigdm_fake)

if triton is not None:

    @triton.jit
    def _pigdm_kernel(x_ptr, otf_ptr, y_ptr, r2_ptr, step_ptr, out_ptr, channels, freqs,
                      noise_var, HAS_Y: tl.constexpr, Y_SHARED: tl.constexpr, BLOCK: tl.constexpr):
        # x, out: [n·C, F, 2] and y: [C or n·C, F, 2] interleaved complex; otf: [F, 2].
        # Grid: (frequency blocks, particle-channel planes).
        f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = f < freqs
        plane = tl.program_id(1).to(tl.int64)
        offset = (plane * freqs + f) * 2
        xr = tl.load(x_ptr + offset, mask=mask, other=0.0)
        xi = tl.load(x_ptr + offset + 1, mask=mask, other=0.0)
        kr = tl.load(otf_ptr + 2 * f, mask=mask, other=0.0)
        ki = tl.load(otf_ptr + 2 * f + 1, mask=mask, other=0.0)
        if HAS_Y:  # residual Y − K·X
            y_offset = offset
            if Y_SHARED:
                y_offset = ((plane % channels) * freqs + f) * 2
            rr = tl.load(y_ptr + y_offset, mask=mask, other=0.0) - (kr * xr - ki * xi)
            ri = tl.load(y_ptr + y_offset + 1, mask=mask, other=0.0) - (kr * xi + ki * xr)
        else:  # x is already the residual
            rr = xr
            ri = xi
        # conj(K)·R / (r²|K|² + σ²), with IEEE division, as torch's
        d = tl.load(r2_ptr + tl.load(step_ptr)) * (kr * kr + ki * ki) + noise_var
        out_r = tl.math.div_rn(kr * rr + ki * ri, d)
        out_i = tl.math.div_rn(kr * ri - ki * rr, d)
        tl.store(out_ptr + offset, out_r, mask=mask)
        tl.store(out_ptr + offset + 1, out_i, mask=mask)

    @torch.library.custom_op("fastem_triton::pigdm_filter", mutates_args=())
    def _pigdm_triton(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor,
                      step: Tensor, sigma: float) -> Tensor:
        shape = _checks.spectra(spec, "spec")
        _checks.plane(otf, "otf", torch.complex64, shape[2:], spec.device)
        shared = spec_y is None or _checks.target(spec_y, shape, spec.device)
        _checks.table(r2, "r2", step, spec.device)
        n, channels, height, half = shape
        if n * channels > 65535:
            raise ValueError(f"at most 65535 particle-channel planes, got {n * channels}")
        out = torch.empty_like(spec)
        freqs = height * half
        x = torch.view_as_real(spec)
        with _backend.device_guard(spec):
            _pigdm_kernel[(triton.cdiv(freqs, BLOCK), n * channels)](
                x, torch.view_as_real(otf), x if spec_y is None else torch.view_as_real(spec_y),
                r2, step, torch.view_as_real(out), channels, freqs, sigma * sigma,
                HAS_Y=spec_y is not None, Y_SHARED=shared, BLOCK=BLOCK)
        return out

    _pigdm_triton.register_fake(_pigdm_fake)
else:
    _pigdm_triton = None


def pigdm_filter(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                 sigma: float | Tensor) -> Tensor:
    """``conj(K)·R / (r2[step]·|K|² + σ²)``, ``[n, C, H, Wh]`` complex64 (module docstring).

    r2: ``[S]`` float32 table; step: 0-d int64; sigma: the noise level in the units of ``Y``
    (a 0-d tensor runs the reference: ``_backend.dispatch``).
    """
    impl = _backend.dispatch("pigdm_filter", spec, _pigdm_reference, _pigdm_triton, sigma)
    sigma = sigma if isinstance(sigma, Tensor) else float(sigma)
    return impl(*_backend.dense(spec, otf, spec_y), r2, step, sigma)
