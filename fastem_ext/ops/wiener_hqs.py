"""Fused op 1, the M-step in the Fourier domain (Eq. 24, see ``fastem_ext.mstep``).

- ``spectral_sums(Y, X) -> (A, B)``: ``A = Σ_{i,c} conj(X^i_c)·Y_c``, ``B = Σ_{i,c} |X^i_c|²``
  in one pass over particles and channels (float64 accumulators in the fused kernels).
- ``wiener_z(A, B, K, shift, step, c) -> Z``: ``Z = (A + c·K) / (B + shift[step])`` per frequency:
  the Z-update of one HQS iteration, ``c = nσ²β``, ``shift`` the per-step table of what Eq. 24's
  denominator adds to ``B`` (coupling, ℓ2 term, ΠGDM ridge).
- ``hqs``: the whole M-step on the fused ops (``rfft2 → wiener_z → irfft2 → kernel_project``
  per iteration, re-centring fused into the last projection) for the ``l1``, ``l2`` and ``none``
  regularisers; the plug-and-play denoiser runs a network between projections and stays on
  ``mstep.hqs``.

All spectra are rfft2 half spectra ``[H, W//2+1]`` (complex64, or float32 for ``B``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..mstep import HQSConfig, KernelSpectra, hqs_terms, z_spectrum
from ..mstep import spectral_sums as _spectral_sums_reference
from ..physics import kernel_grid
from ..schedule import at
from . import _backend, _checks
from ._backend import tl, triton
from .kernel_project import kernel_project

BLOCK = 256  # frequencies per program


def _spectral_sums_fake(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
    plane = spec_x.shape[-2:]
    return spec_x.new_empty(plane), spec_x.new_empty(plane, dtype=torch.float32)


def _wiener_z_reference(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
                        coupling: float) -> Tensor:
    return z_spectrum(cross, energy + at(shift, step), otf, coupling)


def _wiener_z_fake(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
                   coupling: float) -> Tensor:
    return torch.empty_like(cross)


_backend.register_fake("spectral_sums", _spectral_sums_fake)
_backend.register_fake("wiener_z", _wiener_z_fake)

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

    @triton.jit
    def _wiener_z_kernel(cross_ptr, energy_ptr, otf_ptr, shift_ptr, step_ptr, out_ptr, freqs,
                         coupling, BLOCK: tl.constexpr):
        # cross, otf, out: [F, 2] (interleaved complex); energy: [F]; shift: [S]; step: [].
        f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = f < freqs
        d = tl.load(energy_ptr + f, mask=mask, other=1.0) + tl.load(shift_ptr + tl.load(step_ptr))
        ar = tl.load(cross_ptr + 2 * f, mask=mask, other=0.0)
        ai = tl.load(cross_ptr + 2 * f + 1, mask=mask, other=0.0)
        kr = tl.load(otf_ptr + 2 * f, mask=mask, other=0.0)
        ki = tl.load(otf_ptr + 2 * f + 1, mask=mask, other=0.0)
        # IEEE division (a plain '/' may lower to an approximate one on GPUs).
        tl.store(out_ptr + 2 * f, tl.math.div_rn(ar + coupling * kr, d), mask=mask)
        tl.store(out_ptr + 2 * f + 1, tl.math.div_rn(ai + coupling * ki, d), mask=mask)

    @torch.library.custom_op("fastem_triton::spectral_sums", mutates_args=())
    def _spectral_sums_triton(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
        n, channels, height, half = _checks.spectra(spec_x, "spec_x")
        shared = _checks.target(spec_y, (n, channels, height, half), spec_x.device)
        cross, energy = _spectral_sums_fake(spec_y, spec_x)
        freqs = height * half
        with _backend.device_guard(spec_x):
            _spectral_sums_kernel[_backend.launch_grid(freqs, BLOCK)](
                torch.view_as_real(spec_x), torch.view_as_real(spec_y), torch.view_as_real(cross),
                energy, n, channels, freqs, Y_SHARED=shared, BLOCK=BLOCK)
        return cross, energy

    @torch.library.custom_op("fastem_triton::wiener_z", mutates_args=())
    def _wiener_z_triton(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
                         coupling: float) -> Tensor:
        _checks.tensor(cross, "cross", torch.complex64, cross.device)
        _checks.plane(energy, "energy", torch.float32, cross.shape, cross.device)
        _checks.plane(otf, "otf", torch.complex64, cross.shape, cross.device)
        _checks.table(shift, "shift", step, cross.device)
        out = torch.empty_like(cross)
        with _backend.device_guard(cross):
            _wiener_z_kernel[_backend.launch_grid(cross.numel(), BLOCK)](
                torch.view_as_real(cross), energy, torch.view_as_real(otf), shift, step,
                torch.view_as_real(out), cross.numel(), coupling, BLOCK=BLOCK)
        return out

    _spectral_sums_triton.register_fake(_spectral_sums_fake)
    _wiener_z_triton.register_fake(_wiener_z_fake)
else:
    _spectral_sums_triton = _wiener_z_triton = None


def spectral_sums(spec_y: Tensor, spec_x: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of Eq. 24. spec_x: ``[n, C, H, Wh]``; spec_y: ``[C, H, Wh]`` or
    ``[n, C, H, Wh]`` (complex64). Returns ``A`` ``[H, Wh]`` complex64, ``B`` ``[H, Wh]``."""
    impl = _backend.dispatch("spectral_sums", spec_x.device, _spectral_sums_reference,
                             _spectral_sums_triton)
    return impl(*_backend.dense(spec_y, spec_x))


def wiener_z(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
             coupling: float) -> Tensor:
    """The Z spectrum ``(cross + coupling·otf) / (energy + shift[step])``, ``[H, Wh]`` complex64.

    cross, otf: ``[H, Wh]`` complex64; energy: ``[H, Wh]`` float32; shift: ``[S]`` float32;
    step: 0-d int64 (device tensors: graph-safe).
    """
    impl = _backend.dispatch("wiener_z", cross.device, _wiener_z_reference, _wiener_z_triton)
    return impl(*_backend.dense(cross, energy, otf), shift, step, coupling)


def kernel_spectra(spec_y: Tensor, spec_x: Tensor) -> KernelSpectra:
    """``mstep.kernel_spectra`` from spectra already computed (shapes as ``spectral_sums``)."""
    cross, energy = spectral_sums(spec_y, spec_x)
    return KernelSpectra(cross, energy, spec_x.shape[0], spec_x.shape[1])


def hqs(spectra: KernelSpectra, kernel: Tensor, sigma: float, config: HQSConfig,
        shape: tuple[int, int], ridge_r2: Tensor | float | None = None,
        step: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mstep.hqs`` on the fused ops: the re-centred kernel ``[K, K]`` and its grid ``[H, W]``
    (``physics.kernel_grid``: the guidance's ``psf2otf`` is one ``rfft2`` of it).

    ridge_r2: ``None``, a float, or a per-step table ``[S]`` read at ``step`` (0-d int64) — with
    tables on the device, nothing here touches the host. ``config.kind`` must not be ``pnp``.
    """
    if config.kind == "pnp":
        raise ValueError("the fused M-step covers the l1, l2 and none regularisers; the "
                         "plug-and-play denoiser runs in mstep.hqs")
    terms = hqs_terms(config, spectra.particles, spectra.channels, shape, sigma, ridge_r2)
    shift, step = _backend.table_index(terms.shift, kernel, step)
    threshold = terms.sigma_d**2 if config.kind == "l1" else 0.0
    grid = kernel_grid(kernel, shape)
    for j in range(config.iters):
        spectrum = wiener_z(spectra.cross, spectra.energy, torch.fft.rfft2(grid), shift, step,
                            terms.coupling)
        z = torch.fft.irfft2(spectrum, s=shape)
        kernel, grid = kernel_project(z, kernel, threshold, recenter=j == config.iters - 1)
    return kernel, grid
