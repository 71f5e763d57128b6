"""Eager reference samplers: non-blind ΠGDM/DPS (Algorithm 1), Fast EM (Algorithm 2) and
Diffusion EM (Algorithm A.1).

One loop serves them all. Per respaced step ``i`` (from ``S−1`` down to 0), for the ``n`` particles
as one batch sharing one kernel:

1. ``ε̂ = ε_θ(x_t, t_i)``; ``x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ``, clamped to [-1, 1] with a straight-through
   gradient (the VJP sees the unclamped estimate: a clamp would zero the guidance on saturated
   pixels);
2. Fast EM only — the M-step: ``k ← HQS(y, (x̂0 + 1)/2, σ, k)`` warm-started, with the ΠGDM ridge
   ``r²/4`` (the network's variance in [0, 1] units) when the guidance is ΠGDM;
3. the guidance ``g`` with the current kernel;
4. the DDPM ancestral update ``x_{t−1} = μ̃(x̂0, x_t) + √β̃ z + w_i g``, ``w_i`` read from the
   schedule's device tables (ΠGDM: ``√ᾱ r² (1+β̃)^{-1/2}``; DPS: ``scale·√ᾱ``).

Nothing in the loop calls ``.item()``/``.cpu()`` or creates a CPU tensor. ``eps_model`` is any
callable ``eps(x_t [n, C, H, W], t [n] int64) -> [n, C or 2C, H, W]`` (extra channels — a learned
variance — are ignored).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .guidance import dps_guidance, pigdm_guidance
from .mstep import HQSConfig, gradient_spectra, hqs, kernel_spectra
from .observation import Observation
from .physics import psf2otf
from .schedule import Schedule, StepTables, at

EpsModel = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor | None], None]
"""``callback(i, x0 [n, C, H, W] in [0, 1], kernel [K, K] or None)``; device tensors, no sync."""


@dataclass
class SamplerOutput:
    """particles: ``[n, C, H, W]`` in [0, 1]; kernel: ``[K, K]`` (sum 1) or ``None``."""

    particles: Tensor
    kernel: Tensor | None


Index = int | Tensor
"""A respaced step: a Python int (eager loop) or a 0-d int64 device tensor (CUDA-graph replay)."""


@dataclass(frozen=True)
class StepConfig:
    """What one step does. guidance: ``"pigdm"``, ``"dps"`` or ``None`` (unconditional);
    mstep: the validated HQS settings (Fast EM) or ``None`` (kernel fixed); scale: the guidance
    multiplier."""

    guidance: str | None = "pigdm"
    mstep: HQSConfig | None = None
    scale: float = 1.0


def predict_x0(eps_model: EpsModel, x_t: Tensor, tables: StepTables, i: Index) -> Tensor:
    """The clamped Tweedie estimate ``x̂0 ∈ [-1, 1]`` with a straight-through gradient."""
    channels = x_t.shape[1]
    eps = eps_model(x_t, at(tables.t, i).expand(x_t.shape[0]))[:, :channels].to(x_t.dtype)
    x0 = tweedie_x0(x_t, eps, at(tables.sqrt_ac, i), at(tables.sqrt_one_minus_ac, i))
    return x0 + (x0.clamp(-1.0, 1.0) - x0).detach()


def tweedie_x0(x_t: Tensor, eps: Tensor, sqrt_ac: Tensor, sqrt_one_minus_ac: Tensor) -> Tensor:
    """The unclamped Tweedie estimate ``(x_t − √(1−ᾱ) ε)/√ᾱ`` (network units, shapes of ``x_t``)."""
    return (x_t - sqrt_one_minus_ac * eps) / sqrt_ac


def ancestral_step(x0: Tensor, x_t: Tensor, noise: Tensor, coef_x0: Tensor, coef_xt: Tensor,
                   noise_std: Tensor) -> Tensor:
    """The unguided DDPM ancestral sample ``μ̃(x̂0, x_t) + √β̃ z`` (Eq. 14), shapes of ``x_t``."""
    return coef_x0 * x0 + coef_xt * x_t + noise_std * noise


def guided_step(eps_model: EpsModel, obs: Observation | None, tables: StepTables, i: Index,
                x: Tensor, kernel: Tensor | None, config: StepConfig,
                generator: torch.Generator) -> tuple[Tensor, Tensor | None, Tensor]:
    """One step of Algorithms 1/2 from ``x_t`` (``[n, C, H, W]``, network units).

    Returns ``(x_{t−1}, kernel, x̂0)``, all detached. Graph-safe: with ``i`` a device tensor it
    reads every scalar from the tables and never touches the host.
    """
    with torch.enable_grad():
        x_t = x.detach().requires_grad_(config.guidance is not None)
        x0 = predict_x0(eps_model, x_t, tables, i)
        if config.mstep is not None:
            mstep = config.mstep
            ridge = (at(tables.r2, i) / 4.0 * mstep.ridge
                     if config.guidance == "pigdm" and mstep.ridge > 0 else None)
            x0_image = (x0.detach() + 1.0) / 2.0
            target = obs.mstep_target(x0_image, kernel)
            if mstep.gradient:
                spectra = gradient_spectra(target, x0_image)
            else:
                spectra = kernel_spectra(target, x0_image)
            new = hqs(spectra, kernel, obs.sigma, mstep, x.shape[-2:], ridge_r2=ridge)
            kernel = new if mstep.start >= 1000 else torch.where(
                at(tables.t, i) < mstep.start, new, kernel)
        step = _guidance_step(x_t, x0, obs, kernel, config, tables, i)
    x0 = x0.detach()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x = ancestral_step(x0, x, noise, at(tables.coef_x0, i), at(tables.coef_xt, i),
                       at(tables.noise_std, i))
    return (x if step is None else x + step), kernel, x0


def sample(eps_model: EpsModel, obs: Observation | None, *, schedule: Schedule,
           shape: tuple[int, int, int, int], generator: torch.Generator,
           guidance: str | None = "pigdm", kernel: Tensor | None = None,
           mstep: HQSConfig | None = None, guidance_scale: float = 1.0,
           callback: StepCallback | None = None) -> SamplerOutput:
    """The eager loop. ``obs=None``/``guidance=None`` samples the prior unconditionally.

    shape: ``(n, C, H, W)``; kernel: ``[K, K]`` — fixed (non-blind) or the initial kernel when
    ``mstep`` is given (Fast EM). ``mstep`` must be validated.
    """
    device = generator.device
    dtype = obs.y.dtype if obs is not None else torch.float32
    tables = schedule.tables(device, dtype)
    config = StepConfig(guidance, mstep, guidance_scale)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    for i in reversed(range(len(tables))):
        x, kernel, x0 = guided_step(eps_model, obs, tables, i, x, kernel, config, generator)
        if callback is not None:
            callback(i, (x0 + 1.0) / 2.0, kernel)
    return SamplerOutput(((x.clamp(-1.0, 1.0) + 1.0) / 2.0).detach(), kernel)


Runner = Callable[..., SamplerOutput]
"""A loop executor with the signature of ``sample``."""


def _guidance_step(x_t: Tensor, x0: Tensor, obs: Observation | None, kernel: Tensor | None,
                   config: StepConfig, tables: StepTables, i: Index) -> Tensor | None:
    """The weighted guidance ``w_i · g`` (``None`` without guidance)."""
    if config.guidance is None:
        return None
    otf = psf2otf(kernel, x_t.shape[-2:])
    if config.guidance == "pigdm":
        residual = obs.residual_spectrum_net(x0.detach(), otf)
        grad = pigdm_guidance(x_t, x0, residual, otf, at(tables.r2, i), obs.sigma_net)
        return (config.scale * at(tables.pigdm_weight, i)) * grad
    grad = dps_guidance(x_t, obs.residual_net(x0, otf))
    return (config.scale * at(tables.dps_weight, i)) * grad


def fast_em(eps_model: EpsModel, obs: Observation, kernel_init: Tensor, *, schedule: Schedule,
            particles: int, generator: torch.Generator, guidance: str = "pigdm",
            mstep: HQSConfig, guidance_scale: float = 1.0,
            callback: StepCallback | None = None, runner: Runner = sample) -> SamplerOutput:
    """Fast EM (Algorithm 2): one guided run with an M-step folded into every step.

    ``runner`` executes the loop: ``sample`` (eager) or ``engine.graphed_sample``."""
    shape = (particles, *obs.y.shape)
    return runner(eps_model, obs, schedule=schedule, shape=shape, generator=generator,
                  guidance=guidance, kernel=kernel_init, mstep=mstep,
                  guidance_scale=guidance_scale, callback=callback)


def nonblind(eps_model: EpsModel, obs: Observation, kernel: Tensor, *, schedule: Schedule,
             particles: int, generator: torch.Generator, guidance: str = "pigdm",
             guidance_scale: float = 1.0, callback: StepCallback | None = None,
             runner: Runner = sample) -> SamplerOutput:
    """Non-blind ΠGDM/DPS (Algorithm 1) with a known kernel."""
    shape = (particles, *obs.y.shape)
    return runner(eps_model, obs, schedule=schedule, shape=shape, generator=generator,
                  guidance=guidance, kernel=kernel, guidance_scale=guidance_scale,
                  callback=callback)


def diffusion_em(eps_model: EpsModel, obs: Observation, kernel_init: Tensor, *,
                 schedule: Schedule, particles: int, generator: torch.Generator,
                 mstep: HQSConfig, rounds: int = 10, guidance: str = "pigdm",
                 guidance_scale: float = 1.0, callback: StepCallback | None = None,
                 runner: Runner = sample) -> SamplerOutput:
    """Diffusion EM (Algorithm A.1): ``rounds`` × (full non-blind run, then one M-step on its
    final samples). Returns the last run's particles and the kernel after the last M-step."""
    kernel = kernel_init
    image_hw = obs.y.shape[-2:]
    out = None
    for _ in range(rounds):
        out = nonblind(eps_model, obs, kernel, schedule=schedule, particles=particles,
                       generator=generator, guidance=guidance, guidance_scale=guidance_scale,
                       callback=callback, runner=runner)
        target = obs.mstep_target(out.particles, kernel)
        kernel = hqs(kernel_spectra(target, out.particles), kernel, obs.sigma, mstep, image_hw)
    return SamplerOutput(out.particles, kernel)
