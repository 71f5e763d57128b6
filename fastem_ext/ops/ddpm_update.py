"""Fused op 3, the DDPM step in one pass over the particles (``step.guided_step``).

- ``predict_x0``: ``x̂0 = clamp((x_t − √(1−ᾱ)·ε)/√ᾱ, −1, 1)`` mapped to [0, 1]
  (``schedule.tweedie_x0``, ``schedule.to_image``).
- ``ddpm_update``: the same ``x̂0`` and the guided ancestral update
  ``x_{t−1} = coef_x0·x̂0 + coef_xt·x_t + √β̃·z + (scale·w)·g``, returning ``(x_{t−1}, x̂0)``.

Every per-step scalar is read on the device from ``coefs`` ``[6, S]`` (``ddpm_coefficients``) at
the 0-d int64 ``step``: one captured CUDA graph serves every step. ``ε`` may be the first ``C``
channels of a learned-variance output ``[n, 2C, H, W]`` (read in place). The noise ``z`` is the
caller's (the samplers draw it from their generator, which CUDA-graph replay advances).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedule import StepTables, at, to_image, tweedie_x0
from . import _backend, _checks
from ._backend import tl, triton

BLOCK = 1024  # elements per program
ROWS = ("sqrt_ac", "sqrt_one_minus_ac", "coef_x0", "coef_xt", "noise_std", "weight")


def ddpm_coefficients(tables: StepTables, guidance: str | None = "pigdm") -> Tensor:
    """The ``[6, S]`` float32 table of the ``ROWS`` on the tables' device; build it once.

    guidance: ``"pigdm"``/``"dps"`` take that weight row, ``None`` a zero row.
    """
    weights = {"pigdm": tables.pigdm_weight, "dps": tables.dps_weight}
    weight = weights[guidance] if guidance is not None else torch.zeros_like(tables.sqrt_ac)
    rows = [tables.sqrt_ac, tables.sqrt_one_minus_ac, tables.coef_x0, tables.coef_xt,
            tables.noise_std, weight]
    return torch.stack(rows).to(torch.float32).contiguous()


def _clamped_x0(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
    return tweedie_x0(x_t, eps, at(coefs[0], step), at(coefs[1], step)).clamp(-1.0, 1.0)


def _predict_reference(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
    return to_image(_clamped_x0(x_t, eps, coefs, step))


def _update_reference(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor, noise: Tensor,
                      grad: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    x0 = _clamped_x0(x_t, eps, coefs, step)
    # The unguided ancestral sample μ̃(x̂0, x_t) + √β̃ z (Eq. 14), then the guidance step.
    x_prev = at(coefs[2], step) * x0 + at(coefs[3], step) * x_t + at(coefs[4], step) * noise
    if grad is not None:
        x_prev = x_prev + (scale * at(coefs[5], step)) * grad
    return x_prev, to_image(x0)


def _predict_fake(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
    return torch.empty_like(x_t)


def _update_fake(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor, noise: Tensor,
                 grad: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x_t), torch.empty_like(x_t)


_backend.register_fake("predict_x0", _predict_fake)
_backend.register_fake("ddpm_update", _update_fake)

if triton is not None:

    @triton.jit
    def _ddpm_kernel(xt_ptr, eps_ptr, noise_ptr, grad_ptr, coef_ptr, step_ptr, prev_ptr, x0_ptr,
                     per_particle, eps_stride, steps, scale, UPDATE: tl.constexpr,
                     HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        # x_t, noise, grad, prev, x0: [n, C, H, W]; eps: [n, ≥C, H, W] with particle stride
        # eps_stride; coefs: [6, S] (ROWS); step: []. Grid: (blocks of a particle, particles),
        # so that no element index is divided.
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        particle = tl.program_id(1).to(tl.int64)
        mask = j < per_particle
        e = particle * per_particle + j
        step = tl.load(step_ptr)
        x = tl.load(xt_ptr + e, mask=mask, other=0.0)
        eps = tl.load(eps_ptr + particle * eps_stride + j, mask=mask, other=0.0)
        # IEEE division (a plain '/' may lower to an approximate one on GPUs).
        x0 = tl.math.div_rn(x - tl.load(coef_ptr + steps + step) * eps, tl.load(coef_ptr + step))
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        tl.store(x0_ptr + e, (x0 + 1.0) * 0.5, mask=mask)
        if UPDATE:
            z = tl.load(noise_ptr + e, mask=mask, other=0.0)
            out = (tl.load(coef_ptr + 2 * steps + step) * x0
                   + tl.load(coef_ptr + 3 * steps + step) * x
                   + tl.load(coef_ptr + 4 * steps + step) * z)
            if HAS_GRAD:
                weight = scale * tl.load(coef_ptr + 5 * steps + step)
                out += weight * tl.load(grad_ptr + e, mask=mask, other=0.0)
            tl.store(prev_ptr + e, out, mask=mask)

    def _launch(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor, noise: Tensor | None,
                grad: Tensor | None, scale: float, update: bool) -> tuple[Tensor, Tensor]:
        eps_stride = _check(x_t, eps, coefs, step)
        for t, name in ((noise, "noise"), (grad, "grad")):
            if t is not None:
                _checks.tensor(t, name, torch.float32, x_t.device)
                if t.shape != x_t.shape:
                    raise ValueError(f"{name} must be {list(x_t.shape)}, got {list(t.shape)}")
        x0 = torch.empty_like(x_t)
        x_prev = torch.empty_like(x_t) if update else x0
        per_particle = x_t[0].numel()
        with _backend.device_guard(x_t):
            _ddpm_kernel[(triton.cdiv(per_particle, BLOCK), x_t.shape[0])](
                x_t, eps, x_t if noise is None else noise, x_t if grad is None else grad, coefs,
                step, x_prev, x0, per_particle, eps_stride, coefs.shape[1], scale, UPDATE=update,
                HAS_GRAD=grad is not None, BLOCK=BLOCK)
        return x_prev, x0

    @torch.library.custom_op("fastem_triton::predict_x0", mutates_args=())
    def _predict_triton(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
        return _launch(x_t, eps, coefs, step, None, None, 0.0, update=False)[1]

    @torch.library.custom_op("fastem_triton::ddpm_update", mutates_args=())
    def _update_triton(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor, noise: Tensor,
                       grad: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
        return _launch(x_t, eps, coefs, step, noise, grad, scale, update=True)

    _predict_triton.register_fake(_predict_fake)
    _update_triton.register_fake(_update_fake)
else:
    _predict_triton = _update_triton = None


def _check(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> int:
    """The rules of csrc/checks.h ``check_diffusion_inputs``; returns eps's particle stride."""
    _checks.tensor(x_t, "x_t", torch.float32, x_t.device)
    if x_t.dim() != 4 or not 1 <= x_t.shape[0] <= 65535:
        raise ValueError(f"x_t must be [n, C, H, W] with 1 <= n <= 65535, got {list(x_t.shape)}")
    if eps.device != x_t.device or eps.dtype != torch.float32 or eps.shape != x_t.shape:
        raise ValueError(f"eps must be float32 {list(x_t.shape)} on {x_t.device}")
    plane = x_t.shape[2] * x_t.shape[3]
    if eps.stride()[1:] != (plane, x_t.shape[3], 1) or eps.stride(0) < x_t.shape[1] * plane:
        raise ValueError("each particle of eps must be a contiguous [C, H, W] block")
    _checks.tensor(coefs, "coefs", torch.float32, x_t.device)
    if coefs.dim() != 2 or coefs.shape[0] < len(ROWS) or coefs.shape[1] < 1:
        raise ValueError(f"coefs must be [6, S] (ddpm_coefficients), got {list(coefs.shape)}")
    _checks.tensor(step, "step", torch.int64, x_t.device)
    if step.dim() != 0:
        raise ValueError(f"step must be a 0-d tensor, got {list(step.shape)}")
    return eps.stride(0)


def predict_x0(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
    """x̂0 in [0, 1] ``[n, C, H, W]`` from x_t ``[n, C, H, W]`` and ε ``[n, C or 2C, H, W]``."""
    eps = eps[:, : x_t.shape[1]]
    impl = _backend.dispatch("predict_x0", x_t, _predict_reference, _predict_triton)
    return impl(x_t, eps, coefs, step)


def ddpm_update(x_t: Tensor, eps: Tensor, coefs: Tensor, step: Tensor, noise: Tensor,
                grad: Tensor | None = None, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(x_{t−1}, x̂0 in [0, 1])``, each ``[n, C, H, W]`` float32 (module docstring).

    noise: ``z`` ``[n, C, H, W]``; grad: the guidance gradient ``g`` or ``None``; scale: the
    guidance multiplier.
    """
    eps = eps[:, : x_t.shape[1]]
    impl = _backend.dispatch("ddpm_update", x_t, _update_reference, _update_triton)
    return impl(x_t, eps, coefs, step, noise, grad, float(scale))
