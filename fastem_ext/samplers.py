"""Eager reference loops: non-blind ΠGDM/DPS (Algorithm 1), Fast EM (Algorithm 2) and
Diffusion EM (Algorithm A.1).

One loop serves them all: ``len(schedule)`` calls of ``step.guided_step`` (the step, its units and
its graph-safety are described there), with the step index counting down on the device as in the
fast engine (``engine``), which replays the same step as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .mstep import HQSConfig, hqs, kernel_spectra
from .observation import Observation
from .schedule import Schedule, to_image
from .step import EpsModel, Generators, StepConfig, guided_step, plan_step, standard_normal

StepCallback = Callable[[int, Tensor, Tensor | None], None]
"""``callback(i, x0 [n, C, H, W] in [0, 1], kernel [K, K] ([G, K, K] in kernel groups) or
None)``; device tensors, no sync."""


@dataclass
class SamplerOutput:
    """particles: ``[n, C, H, W]`` in [0, 1]; kernel: ``[K, K]`` (sum 1; ``[G, K, K]`` in
    kernel groups) or ``None``;
    compile_seconds: the fast engine's network compilation (its first step), or ``None``;
    fused_norms: whether the fast engine ran the network's UNet norms as the fused op."""

    particles: Tensor
    kernel: Tensor | None
    compile_seconds: float | None = None
    fused_norms: bool = False


def sample(eps_model: EpsModel, obs: Observation | Sequence[Observation] | None, *,
           schedule: Schedule, shape: tuple[int, int, int, int], generator: Generators,
           guidance: str | None = "pigdm", kernel: Tensor | None = None,
           mstep: HQSConfig | None = None, guidance_scale: float = 1.0,
           callback: StepCallback | None = None) -> SamplerOutput:
    """The eager loop. ``obs=None``/``guidance=None`` samples the prior unconditionally.

    shape: ``(n, C, H, W)``; kernel: ``[K, K]`` — fixed (non-blind) or the initial kernel when
    ``mstep`` is given (Fast EM). ``mstep`` must be validated. Kernel groups (``step``'s
    docstring): ``obs`` one observation per group, ``kernel`` ``[G, K, K]``, ``generator`` one
    per group (each group's particles then draw what its run alone would draw).
    """
    device = first_generator(generator).device
    dtype = observation_dtype(obs)
    tables = schedule.tables(device, dtype)
    plan = plan_step(obs, tables, StepConfig(guidance, mstep, guidance_scale))
    x = standard_normal(shape, generator, device, dtype)
    index = torch.full((), len(tables) - 1, dtype=torch.int64, device=device)
    for i in reversed(range(len(tables))):
        x, kernel, x0 = guided_step(eps_model, plan, index, x, kernel, generator)
        index.sub_(1)
        if callback is not None:
            callback(i, x0, kernel)
    return SamplerOutput(to_image(x.clamp(-1.0, 1.0)), kernel)


def particle_shape(obs: Observation | Sequence[Observation],
                   particles: int) -> tuple[int, int, int, int]:
    """The shape of ``particles`` samples of ``obs``, or of each of the kernel groups' observations
    (``Observation.particle_shape``), the groups one after another."""
    groups = obs if isinstance(obs, Sequence) else (obs,)
    shapes = [group.particle_shape(particles) for group in groups]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def observation_dtype(obs: Observation | Sequence[Observation] | None) -> torch.dtype:
    """The dtype a run over ``obs`` (one observation, one per group, or none) samples in."""
    first = obs[0] if isinstance(obs, Sequence) and obs else obs
    return first.y.dtype if isinstance(first, Observation) else torch.float32


def first_generator(generator: Generators) -> torch.Generator:
    """The generator, or the first of one per group (whose device the run is on)."""
    return generator if isinstance(generator, torch.Generator) else generator[0]


Runner = Callable[..., SamplerOutput]
"""A loop executor with the signature of ``sample``."""


def fast_em(eps_model: EpsModel, obs: Observation | Sequence[Observation],
            kernel_init: Tensor, *, schedule: Schedule, particles: int, generator: Generators,
            guidance: str = "pigdm", mstep: HQSConfig, guidance_scale: float = 1.0,
            callback: StepCallback | None = None, runner: Runner = sample) -> SamplerOutput:
    """Fast EM (Algorithm 2): one guided run with an M-step folded into every step; in kernel
    groups (``sample``), ``particles`` per group.

    ``runner`` executes the loop: ``sample`` (eager) or ``engine.graphed_sample``."""
    shape = particle_shape(obs, particles)
    return runner(eps_model, obs, schedule=schedule, shape=shape, generator=generator,
                  guidance=guidance, kernel=kernel_init, mstep=mstep,
                  guidance_scale=guidance_scale, callback=callback)


def nonblind(eps_model: EpsModel, obs: Observation, kernel: Tensor, *, schedule: Schedule,
             particles: int, generator: torch.Generator, guidance: str = "pigdm",
             guidance_scale: float = 1.0, callback: StepCallback | None = None,
             runner: Runner = sample) -> SamplerOutput:
    """Non-blind ΠGDM/DPS (Algorithm 1) with a known kernel."""
    shape = particle_shape(obs, particles)
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
    image_hw = tuple(obs.y.shape[-2:])
    out = None
    for _ in range(rounds):
        out = nonblind(eps_model, obs, kernel, schedule=schedule, particles=particles,
                       generator=generator, guidance=guidance, guidance_scale=guidance_scale,
                       callback=callback, runner=runner)
        spec_x = torch.fft.rfft2(out.particles)
        spectra = kernel_spectra(obs.target_spectrum(spec_x, kernel), spec_x)
        kernel = hqs(spectra, kernel, obs.sigma, mstep, image_hw)
    return replace(out, kernel=kernel)  # the last run's engine facts (compilation, norms)
