"""The one step of Algorithms 1 and 2, on the fused ops (``fastem_ext.ops``, which run their
pure-torch references on the CPU without the extension and on the meta device). The reference
loop (``samplers.sample``), the fast engine (``engine``, which replays it as a CUDA graph) and the
benchmarks all run this step.

Per respaced step ``i`` (from ``S−1`` down to 0), for the ``n`` particles as one batch sharing one
kernel:

1. ``ε̂ = ε_θ(x_t, t_i)``; ``x̂0 = to_image(clamp((x_t − √(1−ᾱ) ε̂)/√ᾱ, −1, 1))`` in [0, 1]
   (``ops.predict_x0``);
2. Fast EM only — the M-step ``k ← HQS(y, x̂0, σ, k)``, warm-started (``mstep.hqs``).
   ``HQSConfig.ridge`` scales the ΠGDM ridge ``r²`` (App. D; default 0: none) when the guidance
   is ΠGDM, ``gradient`` fits the kernel on the images' gradients (default on); both are read
   here and nowhere else;
3. the guidance: ``v = ∇_{x̂0} log p(y | x̂0, k)`` in image units (``guidance``), then
   ``g = (∂x̂0/∂x_t)ᵀ v`` by one vector-Jacobian product through the network. The clamp is
   straight-through: the product runs through the unclamped estimate, because the clamp's zero
   gradient would freeze the guidance on every saturated pixel;
4. the DDPM ancestral update and the guidance step in one op,
   ``x_{t−1} = μ̃(x̂0, x_t) + √β̃ z + w_i g`` (``ops.ddpm_update``; ``z`` from the caller's
   generator, ``w_i`` from the schedule's tables: ΠGDM ``√ᾱ r² (1+β̃)^{-1/2}``, DPS ``scale·ζ``).

``x_t`` and ``ε̂`` are in the network's units; what the step hands to the M-step and the guidance
is in image units (``schedule`` converts, ``to_image`` and the image-unit tables). Graph-safe: the
step index is a 0-d int64 device tensor, every per-step scalar a gather from a device table, and
nothing reads a value back or creates a host tensor. ``eps_model`` is any callable
``eps(x_t [n, C, H, W], t [n] int64) -> [n, C or 2C, H, W]`` (extra channels — a learned
variance — are ignored).

The fused ops (``fastem_ext.ops``) are imported inside the functions that call them: importing
fastem_ext loads no op (their Triton kernels and torch.compile hooks cost a second).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .guidance import dps_vector, pigdm_vector
from .mstep import HQSConfig, gradient_weight, hqs, kernel_spectra
from .observation import Observation
from .physics import psf2otf
from .schedule import StepTables, at, to_image, tweedie_x0

EpsModel = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepConfig:
    """What one step does. guidance: ``"pigdm"``, ``"dps"`` or ``None`` (unconditional);
    mstep: the validated HQS settings (Fast EM) or ``None`` (kernel fixed); scale: the guidance
    multiplier."""

    guidance: str | None = "pigdm"
    mstep: HQSConfig | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class StepPlan:
    """What every step of one run reads, built once by ``plan_step`` outside any captured region.

    coefs: ``ops.ddpm_coefficients`` ``[6, S]``; ridge: the M-step's ΠGDM ridge ``[S]`` in image
    units or ``None``; weight: the M-step's per-frequency weight ``[H, W//2+1]`` or ``None``.
    """

    obs: Observation | None
    tables: StepTables
    config: StepConfig
    coefs: Tensor
    ridge: Tensor | None
    weight: Tensor | None


def plan_step(obs: Observation | None, tables: StepTables, config: StepConfig) -> StepPlan:
    """The device tables of one run (``StepPlan``); also computes ``obs.spec_y`` and
    ``obs.guidance_weight`` once."""
    from . import ops  # lazily (module docstring)

    mstep, ridge, weight = config.mstep, None, None
    if mstep is not None:
        if config.guidance == "pigdm" and mstep.ridge > 0:
            ridge = (tables.x0_var * mstep.ridge).contiguous()
        if mstep.gradient:
            weight = gradient_weight(obs.y.shape[-2:], obs.y.device, obs.y.dtype)
    if obs is not None:
        _ = obs.spec_y, obs.guidance_weight
    return StepPlan(obs, tables, config, ops.ddpm_coefficients(tables, config.guidance), ridge,
                    weight)


def guided_step(eps_model: EpsModel, plan: StepPlan, step: Tensor, x: Tensor,
                kernel: Tensor | None,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """One step from ``x_t`` (``[n, C, H, W]``, network units) at the respaced index ``step``
    (0-d int64 on ``x``'s device), its noise drawn from ``generator`` (one ``randn`` of ``x``'s
    shape per step). Returns ``(x_{t−1}, kernel, x̂0 in [0, 1])``, all detached."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return step_with_noise(eps_model, plan, step, x, kernel, noise)


def step_with_noise(eps_model: EpsModel, plan: StepPlan, step: Tensor, x: Tensor,
                    kernel: Tensor | None,
                    noise: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``guided_step`` with the step's standard normal ``noise`` (``[n, C, H, W]``) given: the
    form an exported program traces (``export``), where the caller draws the noise."""
    from . import ops  # lazily (module docstring)

    config, tables = plan.config, plan.tables
    guided = config.guidance is not None
    with torch.enable_grad():
        x_t = x.detach().requires_grad_(guided)
        eps = eps_model(x_t, at(tables.t, step).expand(x.shape[0]))[:, : x.shape[1]]
        if guided:  # the straight-through clamp: the VJP's path skips it
            unclamped = to_image(tweedie_x0(x_t, eps, at(tables.sqrt_ac, step),
                                            at(tables.sqrt_one_minus_ac, step)))
    eps = eps.detach()
    x0 = ops.predict_x0(x.detach(), eps, plan.coefs, step)
    spec_x = torch.fft.rfft2(x0)
    if config.mstep is not None:
        kernel = _mstep(plan, spec_x, kernel, step)
    grad = None
    if guided:
        otf = psf2otf(kernel, x.shape[-2:])
        if config.guidance == "pigdm":
            v = pigdm_vector(plan.obs, spec_x, otf, tables.x0_var, step)
        else:
            v = dps_vector(plan.obs, spec_x, otf)
        (grad,) = torch.autograd.grad(unclamped, x_t, grad_outputs=v)
    x_prev, _ = ops.ddpm_update(x.detach(), eps, plan.coefs, step, noise, grad, config.scale)
    return x_prev, kernel, x0


def _mstep(plan: StepPlan, spec_x: Tensor, kernel: Tensor, step: Tensor) -> Tensor:
    """The M-step from ``x̂0``'s half spectrum: the new kernel."""
    obs, mstep = plan.obs, plan.config.mstep
    spectra = kernel_spectra(obs.target_spectrum(spec_x, kernel), spec_x, plan.weight)
    return hqs(spectra, kernel, obs.sigma, mstep, tuple(obs.y.shape[-2:]), ridge_r2=plan.ridge,
               step=step)
