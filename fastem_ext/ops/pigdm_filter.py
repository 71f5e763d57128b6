"""Fused op 2, the guidance spectra, and the direct blur of the non-circular model.

- ``particle_blur(X, K[, Y])``: the blur of ``n`` particles by one kernel in the Fourier domain,
  ``K·X``, or with ``Y`` the residual ``Y − K·X`` in the same pass.
- ``pigdm_filter(X, K, Y, r2, step, σ)``: the ΠGDM filter (Eq. 17, ``guidance.pigdm_vector``)
  ``conj(K)·R / (r²|K|² + σ²)`` with ``R = Y − K·X`` formed in the same pass (or ``R = X`` when
  ``Y`` is ``None``: ``X`` is then already a residual spectrum, e.g. of the masked model);
  ``r² = r2[step]`` is read on the device.
- ``blur_valid(x, k)``: ``k ⊛ x`` keeping the ``[H−K+1, W−K+1]`` pixels whose whole neighbourhood
  is inside the image (``physics.blur(..., boundary="valid")``), by direct summation.

Spectra: ``X`` ``[n, C, H, Wh]``, ``Y`` ``[C, H, Wh]`` (shared) or ``[n, C, H, Wh]``, ``K``
``[H, Wh]``, complex64 half spectra.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..guidance import pigdm_spectrum
from ..physics import _valid_conv
from ..schedule import at
from . import _backend, _checks
from ._backend import tl, triton

BLOCK = 256  # frequencies per program
TILE = 32  # output rows and columns per program of blur_valid


def _blur_reference(spec: Tensor, otf: Tensor, spec_y: Tensor | None) -> Tensor:
    blurred = otf * spec
    return blurred if spec_y is None else spec_y - blurred


def _blur_fake(spec: Tensor, otf: Tensor, spec_y: Tensor | None) -> Tensor:
    return torch.empty_like(spec)


def _pigdm_reference(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                     sigma: float) -> Tensor:
    residual = spec if spec_y is None else _blur_reference(spec, otf, spec_y)
    return pigdm_spectrum(residual, otf, at(r2, step), sigma)


def _pigdm_fake(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                sigma: float) -> Tensor:
    return torch.empty_like(spec)


def _valid_fake(x: Tensor, kernel: Tensor) -> Tensor:
    size = kernel.shape[-1]
    return x.new_empty(*x.shape[:-2], x.shape[-2] - size + 1, x.shape[-1] - size + 1)


_backend.register_fake("particle_blur", _blur_fake)
_backend.register_fake("pigdm_filter", _pigdm_fake)
_backend.register_fake("blur_valid", _valid_fake)

if triton is not None:

    @triton.jit
    def _spectral_kernel(x_ptr, otf_ptr, y_ptr, r2_ptr, step_ptr, out_ptr, channels, freqs,
                         noise_var, HAS_Y: tl.constexpr, Y_SHARED: tl.constexpr,
                         FILTER: tl.constexpr, BLOCK: tl.constexpr):
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
        elif FILTER:  # x is already the residual
            rr = xr
            ri = xi
        else:  # the blur K·X
            rr = kr * xr - ki * xi
            ri = kr * xi + ki * xr
        if FILTER:  # conj(K)·R / (r²|K|² + σ²)
            d = tl.load(r2_ptr + tl.load(step_ptr)) * (kr * kr + ki * ki) + noise_var
            out_r = tl.math.div_rn(kr * rr + ki * ri, d)  # IEEE division, as torch's
            out_i = tl.math.div_rn(kr * ri - ki * rr, d)
        else:
            out_r = rr
            out_i = ri
        tl.store(out_ptr + offset, out_r, mask=mask)
        tl.store(out_ptr + offset + 1, out_i, mask=mask)

    @triton.jit
    def _valid_kernel(x_ptr, k_ptr, out_ptr, height, width, out_h, out_w, size,
                      TILE: tl.constexpr):
        # x: [B, H, W]; k: [K, K]; out: [B, H-K+1, W-K+1]. Grid: (row tiles, column tiles, B).
        p = tl.program_id(0) * TILE + tl.arange(0, TILE)[:, None]
        q = tl.program_id(1) * TILE + tl.arange(0, TILE)[None, :]
        mask = (p < out_h) & (q < out_w)
        image = tl.program_id(2).to(tl.int64)
        src = x_ptr + image * height * width + p * width + q
        acc = tl.zeros([TILE, TILE], dtype=tl.float32)
        # True convolution: out[p, q] = Σ_{a,b} k[K-1-a, K-1-b] · x[p + a, q + b].
        for a in range(size):
            for b in range(size):
                weight = tl.load(k_ptr + (size - 1 - a) * size + (size - 1 - b))
                acc += weight * tl.load(src + a * width + b, mask=mask, other=0.0)
        tl.store(out_ptr + image * out_h * out_w + p * out_w + q, acc, mask=mask)

    def _launch_spectral(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor | None,
                         step: Tensor | None, sigma: float, filtered: bool) -> Tensor:
        shape = _checks.spectra(spec, "spec")
        _checks.plane(otf, "otf", torch.complex64, shape[2:], spec.device)
        shared = spec_y is None or _checks.target(spec_y, shape, spec.device)
        if filtered:
            _checks.table(r2, "r2", step, spec.device)
        n, channels, height, half = shape
        if n * channels > 65535:
            raise ValueError(f"at most 65535 particle-channel planes, got {n * channels}")
        out = torch.empty_like(spec)
        freqs = height * half
        x = torch.view_as_real(spec)
        with _backend.device_guard(spec):
            _spectral_kernel[(triton.cdiv(freqs, BLOCK), n * channels)](
                x, torch.view_as_real(otf), x if spec_y is None else torch.view_as_real(spec_y),
                x if r2 is None else r2, x if step is None else step,
                torch.view_as_real(out), channels, freqs, sigma * sigma,
                HAS_Y=spec_y is not None, Y_SHARED=shared, FILTER=filtered, BLOCK=BLOCK)
        return out

    @torch.library.custom_op("fastem_triton::particle_blur", mutates_args=())
    def _blur_triton(spec: Tensor, otf: Tensor, spec_y: Tensor | None) -> Tensor:
        return _launch_spectral(spec, otf, spec_y, None, None, 0.0, filtered=False)

    @torch.library.custom_op("fastem_triton::pigdm_filter", mutates_args=())
    def _pigdm_triton(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor,
                      step: Tensor, sigma: float) -> Tensor:
        return _launch_spectral(spec, otf, spec_y, r2, step, sigma, filtered=True)

    @torch.library.custom_op("fastem_triton::blur_valid", mutates_args=())
    def _valid_triton(x: Tensor, kernel: Tensor) -> Tensor:
        _check_valid(x, kernel)
        out = _valid_fake(x, kernel)
        height, width = x.shape[-2:]
        out_h, out_w = out.shape[-2:]
        images = x.numel() // (height * width)
        grid = (triton.cdiv(out_h, TILE), triton.cdiv(out_w, TILE), images)
        with _backend.device_guard(x):
            _valid_kernel[grid](x, kernel, out, height, width, out_h, out_w, kernel.shape[-1],
                                TILE=TILE)
        return out

    _blur_triton.register_fake(_blur_fake)
    _pigdm_triton.register_fake(_pigdm_fake)
    _valid_triton.register_fake(_valid_fake)
else:
    _blur_triton = _pigdm_triton = _valid_triton = None


def _check_valid(x: Tensor, kernel: Tensor) -> None:
    _checks.tensor(x, "x", torch.float32, x.device)
    _checks.tensor(kernel, "kernel", torch.float32, x.device)
    size = kernel.shape[-1]
    if x.dim() < 2 or kernel.dim() != 2 or kernel.shape[0] != size:
        raise ValueError(f"x must be [..., H, W] and kernel [K, K], got {tuple(x.shape)} and "
                         f"{tuple(kernel.shape)}")
    if not size <= min(_checks.MAX_KERNEL_SIZE, *x.shape[-2:]):
        raise ValueError(f"kernel size {size} must be <= min(64, H, W) for x {tuple(x.shape)}")
    if x.numel() > 65535 * x.shape[-2] * x.shape[-1]:
        raise ValueError(f"at most 65535 images per call, got shape {tuple(x.shape)}")


def particle_blur(spec: Tensor, otf: Tensor, spec_y: Tensor | None = None) -> Tensor:
    """``K·X`` (or ``Y − K·X`` when ``spec_y`` is given), ``[n, C, H, Wh]`` complex64."""
    impl = _backend.dispatch("particle_blur", spec.device, _blur_reference, _blur_triton)
    return impl(*_backend.dense(spec, otf, spec_y))


def pigdm_filter(spec: Tensor, otf: Tensor, spec_y: Tensor | None, r2: Tensor, step: Tensor,
                 sigma: float) -> Tensor:
    """``conj(K)·R / (r2[step]·|K|² + σ²)``, ``[n, C, H, Wh]`` complex64 (module docstring).

    r2: ``[S]`` float32 table; step: 0-d int64; sigma: the noise level in the units of ``Y``.
    """
    impl = _backend.dispatch("pigdm_filter", spec.device, _pigdm_reference, _pigdm_triton)
    return impl(*_backend.dense(spec, otf, spec_y), r2, step, float(sigma))


def blur_valid(x: Tensor, kernel: Tensor) -> Tensor:
    """``k ⊛ x`` on the valid pixels: x ``[..., H, W]``, kernel ``[K, K]`` (``K ≤ 64``) →
    ``[..., H−K+1, W−K+1]`` float32."""
    impl = _backend.dispatch("blur_valid", x.device, _valid_conv, _valid_triton)
    return impl(x, kernel)
