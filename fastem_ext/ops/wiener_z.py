"""Fused op 1b, ``wiener_z(A, B, K, shift, step, c) -> Z``: the Z-update of one HQS iteration
(Eq. 24, see ``fastem_ext.mstep``) per frequency, ``Z = (A + c·K) / (B + shift[step])``, with
``A``, ``B`` the sums of ``spectral_sums``, ``K`` the previous kernel's OTF, ``c = nσ²β`` and
``shift`` the per-step table of what Eq. 24's denominator adds to ``B`` (coupling, ℓ2 term, ΠGDM
ridge: ``mstep.hqs_terms``), read on the device.

All spectra are rfft2 half spectra ``[H, Wh]`` (complex64, or float32 for ``B``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import at
from . import _backend, _checks
from ._backend import tl, triton

BLOCK = 256  # frequencies per program


def z_spectrum(cross: Tensor, denominator: Tensor, otf: Tensor, coupling: Tensor | float) -> Tensor:
    """Eq. 24 per frequency: ``(cross + coupling·otf) / denominator``, all ``[..., H, Wh]``."""
    return (cross + coupling * otf) / denominator


def _reference(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
               coupling: float) -> Tensor:
    return z_spectrum(cross, energy + at(shift, step), otf, coupling)


def _fake(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
          coupling: float) -> Tensor:
    return torch.empty_like(cross)


_backend.register_fake("wiener_z", _fake)

if triton is not None:

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

    @torch.library.custom_op("fastem_triton::wiener_z", mutates_args=())
    def _triton_impl(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
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

    _triton_impl.register_fake(_fake)
else:
    _triton_impl = None


def wiener_z(cross: Tensor, energy: Tensor, otf: Tensor, shift: Tensor, step: Tensor,
             coupling: float | Tensor) -> Tensor:
    """The Z spectrum ``(cross + coupling·otf) / (energy + shift[step])``, ``[H, Wh]`` complex64.

    cross, otf: ``[H, Wh]`` complex64; energy: ``[H, Wh]`` float32; shift: ``[S]`` float32;
    step: 0-d int64 (device tensors: graph-safe); coupling: a float, or a 0-d tensor (which
    runs the reference: ``_backend.dispatch``).
    """
    impl = _backend.dispatch("wiener_z", cross, _reference, _triton_impl, coupling)
    return impl(*_backend.dense(cross, energy, otf), shift, step, coupling)
