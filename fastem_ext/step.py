"""The one step of Algorithms 1 and 2, on the fused ops (``fastem_ext.ops``, which run their
pure-torch references on the CPU without the extension and on the meta device). The reference
loop (``samplers.sample``), the fast engine (``engine``, which replays it as a CUDA graph) and the
benchmarks all run this step.

Per respaced step ``i`` (from ``S−1`` down to 0), for the ``n`` particles as one batch sharing one
kernel (or in kernel **groups**, below):

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

**Groups.** ``plan_step`` may take a sequence of ``G`` observations and the step a kernel
``[G, K, K]``: the particles are then ``G`` equal consecutive groups, group ``g`` observing its own
``obs[g]`` with its own kernel ``kernel[g]`` (its own M-step and guidance), while the network runs
once over all of them (step 1) and the update is one op (step 4). Independent runs batched into
one network call: ``run()``'s restarts (``batch_restarts``), or different photos of one size. The
noise can come from one generator per group (``standard_normal``), so that each group draws what
its run alone would draw. With one group (a single observation, a ``[K, K]`` kernel) the step is
exactly the ungrouped one.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .guidance import dps_vector, pigdm_vector
from .mstep import HQSConfig, gradient_weight, hqs, kernel_spectra
from .observation import Observation
from .physics import psf2otf
from .schedule import StepTables, at, to_image, tweedie_x0

EpsModel = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for all particles, or one per kernel group (module docstring)."""


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

    groups: the observation of each kernel group (``(None,)`` unconditional); coefs:
    ``ops.ddpm_coefficients`` ``[6, S]``; ridge: the M-step's ΠGDM ridge ``[S]`` in image units or
    ``None``; weight: the M-step's per-frequency weight ``[H, W//2+1]`` or ``None``.
    """

    groups: tuple[Observation | None, ...]
    tables: StepTables
    config: StepConfig
    coefs: Tensor
    ridge: Tensor | None
    weight: Tensor | None


def plan_step(obs: Observation | Sequence[Observation] | None, tables: StepTables,
              config: StepConfig) -> StepPlan:
    """The device tables of one run (``StepPlan``); ``obs``: one observation, or one per kernel
    group (module docstring: all on one grid). Also computes each ``obs.spec_y`` and
    ``obs.guidance_weight`` once."""
    from . import ops  # lazily (module docstring)

    groups = tuple(obs) if isinstance(obs, Sequence) else (obs,)
    if not groups or (len(groups) > 1 and any(
            g is None or g.y.shape[-2:] != groups[0].y.shape[-2:] for g in groups)):
        raise ValueError("kernel groups need one observation each, all on one grid")
    first = groups[0]
    mstep, ridge, weight = config.mstep, None, None
    if mstep is not None:
        if config.guidance == "pigdm" and mstep.ridge > 0:
            ridge = (tables.x0_var * mstep.ridge).contiguous()
        if mstep.gradient:
            weight = gradient_weight(first.y.shape[-2:], first.y.device, first.y.dtype)
    for group in groups:
        if group is not None:
            _ = group.spec_y, group.guidance_weight
    return StepPlan(groups, tables, config, ops.ddpm_coefficients(tables, config.guidance),
                    ridge, weight)


def standard_normal(shape: Sequence[int], generator: Generators, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
    """A standard normal tensor of ``shape`` (``[n, ...]``) from ``generator``, or, given one
    generator per kernel group, group ``g``'s ``n/G`` rows from generator ``g``: what each
    group's run alone would draw."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    count = len(generator)
    if count < 1 or shape[0] % count:
        raise ValueError(f"{shape[0]} particles cannot be split into {count} groups")
    rows = (shape[0] // count, *shape[1:])
    return torch.cat([torch.randn(rows, generator=g, device=device, dtype=dtype)
                      for g in generator])


def guided_step(eps_model: EpsModel, plan: StepPlan, step: Tensor, x: Tensor,
                kernel: Tensor | None,
                generator: Generators) -> tuple[Tensor, Tensor | None, Tensor]:
    """One step from ``x_t`` (``[n, C, H, W]``, network units) at the respaced index ``step``
    (0-d int64 on ``x``'s device), its noise drawn from ``generator`` (one draw of ``x``'s shape
    per step, ``standard_normal``). Returns ``(x_{t−1}, kernel, x̂0 in [0, 1])``, all
    detached."""
    noise = standard_normal(x.shape, generator, x.device, x.dtype)
    return step_with_noise(eps_model, plan, step, x, kernel, noise)


def step_with_noise(eps_model: EpsModel, plan: StepPlan, step: Tensor, x: Tensor,
                    kernel: Tensor | None,
                    noise: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``guided_step`` with the step's standard normal ``noise`` (``[n, C, H, W]``) given: the
    form an exported program traces (``export``), where the caller draws the noise. ``kernel``:
    ``[K, K]``, or ``[G, K, K]`` for ``G`` kernel groups (module docstring)."""
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
    count = len(plan.groups)
    grouped = count > 1 or (kernel is not None and kernel.dim() == 3)  # [1, K, K]: one group
    if grouped and (kernel is None or kernel.dim() != 3 or len(kernel) != count
                    or x.shape[0] % count):
        got = None if kernel is None else tuple(kernel.shape)
        raise ValueError(f"{count} kernel groups need a [{count}, K, K] kernel and particles "
                         f"in {count} equal groups, got kernel {got} and {x.shape[0]} particles")
    rows = x.shape[0] // count
    kernels, vectors = [], []
    for g, obs in enumerate(plan.groups):
        part = spec_x[g * rows:(g + 1) * rows] if grouped else spec_x
        k = kernel[g] if grouped else kernel
        if config.mstep is not None:
            k = _mstep(plan, obs, part, k, step)
        kernels.append(k)
        if guided:
            otf = psf2otf(k, x.shape[-2:])
            if config.guidance == "pigdm":
                vectors.append(pigdm_vector(obs, part, otf, tables.x0_var, step))
            else:
                vectors.append(dps_vector(obs, part, otf))
    kernel = torch.stack(kernels) if grouped else kernels[0]
    grad = None
    if guided:
        v = torch.cat(vectors) if grouped else vectors[0]
        (grad,) = torch.autograd.grad(unclamped, x_t, grad_outputs=v)
    x_prev, _ = ops.ddpm_update(x.detach(), eps, plan.coefs, step, noise, grad, config.scale)
    return x_prev, kernel, x0


def _mstep(plan: StepPlan, obs: Observation, spec_x: Tensor, kernel: Tensor,
           step: Tensor) -> Tensor:
    """The M-step of one kernel group from its particles' ``x̂0`` half spectrum: the new
    kernel."""
    mstep = plan.config.mstep
    spectra = kernel_spectra(obs.target_spectrum(spec_x, kernel), spec_x, plan.weight)
    return hqs(spectra, kernel, obs.sigma, mstep, tuple(obs.y.shape[-2:]), ridge_r2=plan.ridge,
               step=step)
