"""``run()``: one blurry photo in, the kernel and restored images out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .boundary import BOUNDARIES, Frame
from .centring import as_pixels, recentre
from .checks import (
    ESTIMATED_SIGMA,
    check_choice,
    check_int,
    check_kernel,
    check_kernel_size,
    check_positive,
    check_sigma,
)
from .deconv import deconvolve_tv
from .engine import EngineConfig, fused_norms_pay, graphed_sample
from .hardware import describe_device
from .io import load_image
from .mstep import REGULARIZERS, HQSConfig
from .noise import estimate_noise
from .observation import Observation
from .photo import crop_window, estimate_on_crops, restore_tiles, tile_plan
from .physics import blur_spectrum, initial_kernel, psf2otf
from .priors import Prior, load_prior
from .progress import StepProgress
from .restarts import (
    SEEDS,
    Diverged,
    keep_least,
    restart_seed,
    total_variation,
)
from .samplers import Runner, SamplerOutput, StepCallback, diffusion_em, fast_em, nonblind, sample
from .schedule import Schedule
from .settings import (
    BLIND,
    DEFAULT_STEPS,
    ENGINES,
    MAX_CROPS,
    MAX_GUIDANCE_SCALE,
    MAX_PARTICLES,
    MAX_ROUNDS,
    METHODS,
    NONBLIND,
    WORKING_SIZE,
    batched_restarts,
    check_crops_path,
    check_path_flags,
    check_restarts,
    check_working_multiple,
    kernel_size_or_default,
    mstep_config,
    resolve_device,
    resolve_max_batch,
    tile_schedule_of,
)
from .step import Generators


@dataclass
class Result:
    """image: ``[C, H, W]`` (the first particle, a sharp posterior sample); kernel: ``[K, K]``
    (sum 1; a blind method's re-centred below a pixel, ``centring``); particles:
    ``[n, C, H, W]``; mean: ``[C, H, W]`` (the particles' average, the paper's "SA" output:
    higher PSNR, softer); info: settings, noise level, timings. All on CPU, float32, in
    [0, 1]."""

    image: Tensor
    kernel: Tensor
    particles: Tensor
    mean: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def run(blurry: object, sigma: float | None = None, *, method: str = "fastem-pigdm",
        prior: object = "natural", particles: int = 1, steps: str | int | None = None,
        kernel_size: int | None = None, seed: int = 0, device: str | torch.device | None = None,
        progress: bool = True, kernel: Tensor | None = None, boundary: str = "valid",
        regularizer: str = "pnp", rounds: int = 10, r2: str = "reference",
        guidance_scale: float = 1.0, engine: str = "auto", precision: str = "bf16",
        compile: bool = False, mstep: HQSConfig | None = None,
        callback: StepCallback | None = None, working_size: int = WORKING_SIZE, crops: int = 3,
        max_batch: int | None = None, tile_steps: str | int | None = None, fast: bool = False,
        full_diffusion: bool = False, restarts: int | None = None,
        batch_restarts: bool = False) -> Result:
    """Blind (or non-blind) deblurring of one photo.

    blurry: a path, PIL image, ``H×W(×C)`` numpy array (uint8, uint16 or float in [0, 1]) or a
    tensor ``[C, H, W]`` / ``[1, C, H, W]`` in [0, 1]. sigma: noise std in [0, 1] units
    (10/255 ≈ 0.039); ``None`` estimates it. method: ``fastem-pigdm`` (default), ``fastem-dps``,
    ``diffem-pigdm`` (``rounds`` full runs), or the non-blind ``pigdm`` / ``dps``, which need
    ``kernel``; for blind methods ``kernel`` is the initial estimate. kernel_size: K of the
    K×K kernel (default 33; with ``kernel``, its size: another is refused). steps: respacing such as
    ``"100"`` or ``"ddim50"`` (default per method). boundary: ``valid`` for real photos (any size,
    no wrap-around), ``circular`` for synthetic circularly blurred data. regularizer: the
    M-step's kernel prior (``pnp`` uses the bundled kernel denoiser). engine: ``fast`` (the
    step captured as a CUDA graph, network in ``precision``), ``reference`` (eager float32) or
    ``auto`` (fast on CUDA, reference on CPU); on CUDA the fast engine runs the UNets'
    GroupNorm + SiLU as the fused op unless compiled (``info["fused_norms"]``). compile: the
    fast engine runs the network as Inductor-compiled code (``torch.compile``; compiled once
    per process, network and image size, minutes on a CPU; a failure falls back to eager with
    a warning). mstep: the M-step's settings in full (an ``HQSConfig``; its regulariser
    replaces ``regularizer``); default: the tuned ones.
    callback: called after every step as ``callback(i, x0, kernel)`` with the respaced step
    ``i`` (counting down to 0), the current ``x̂0`` ``[n, C, H, W]`` in [0, 1] cropped to the
    photo's frame, and the current kernel (device tensors; reading them synchronises).
    restarts: a blind method runs this many times (``R``; default 3 for ``fastem-pigdm``, 1
    for the other blind methods; non-blind methods run once), restart ``r`` with the random
    stream of seed ``seed·R + r`` (so different seeds share no restart), and the result is the
    restart whose restored frame (on the crops path: crops) has the least total variation
    (module ``restarts``; ``info["restarts"]`` gives every restart's seed and score and which
    was kept, ``None`` for non-blind methods); the callback sees every restart's steps, ``i``
    counting down again at each. A restart that diverges (NaN or inf) is left out with a
    ``RestartsDiverged`` warning (its score ``None``, its index in ``info["restarts"]
    ["diverged"]``); ``Diverged`` is raised when every restart did. ``batch_restarts=True``
    runs a Fast EM method's restarts as one batch (kernel groups, ``step``): one network call
    per step for all of them (on the crops path: crops × particles × restarts inputs, above
    ``max_batch``), each restart drawing its own random stream as it would alone (the same
    results up to the float rounding of a larger batch, which a chaotic blind loop can
    amplify; ``info["restarts"]["batched"]``); the callback then sees every restart at once
    (``x̂0`` of all, the kernels ``[R, K, K]``).

    A photo larger than ``working_size`` (pixels, default 256) on either side takes the crops
    path (``photo``): the blind method runs on its ``crops`` most informative windows as one
    batch sharing the kernel, then the full frame is restored with that kernel by non-blind
    ΠGDM/DPS over overlapping tiles (``tile_steps``: default 25 for ΠGDM, 1000 for DPS; at
    most ``max_batch`` network inputs, tiles × particles, per call; default 8, or crops ×
    particles where that is more, since the crops share one call), or, with ``fast=True``
    (this path at any size), by a TV deconvolution (``deconv``: no diffusion; one image).
    Non-blind methods skip the crops. ``full_diffusion=True`` keeps the whole-image run. On the
    crops path ``callback`` sees each batch's ``x̂0`` on its computation grids (crops or tiles
    × particles, window-major, the unobserved borders included) instead of the frame.
    ``info["path"]`` says which path ran; ``info["stages"]`` gives each stage's crops or tiles,
    steps and seconds.
    """
    started = time.perf_counter()
    loaded = load_image(blurry)
    image = loaded.image
    method = check_choice("method", method, METHODS)
    boundary = check_choice("boundary", boundary, BOUNDARIES)
    regularizer = check_choice("regularizer", regularizer, REGULARIZERS)
    particles = check_int("particles", particles, low=1, high=MAX_PARTICLES)
    rounds = check_int("rounds", rounds, low=1, high=MAX_ROUNDS)
    seed = check_int("seed", seed, low=0, high=SEEDS - 1)
    guidance_scale = check_positive("guidance_scale", guidance_scale, high=MAX_GUIDANCE_SCALE)
    if kernel is not None:
        kernel = check_kernel("kernel", kernel, blur=True).float().cpu()
        if kernel_size is not None and check_int("kernel_size", kernel_size, low=1) != len(kernel):
            raise ValueError(f"kernel_size {kernel_size} disagrees with the given "
                             f"{len(kernel)}x{len(kernel)} kernel (leave kernel_size out)")
        kernel_size = len(kernel)
    elif method not in BLIND:
        raise ValueError(f"method {method!r} is non-blind: pass kernel= (a [K, K] tensor)")
    restarts = check_restarts(restarts, method)
    runs = batched_restarts(batch_restarts, method, restarts)  # one network call for them
    batched = runs > 1
    kernel_size = check_kernel_size("kernel_size", kernel_size_or_default(kernel_size),
                                    tuple(image.shape[-2:]))
    estimated = sigma is None
    sigma = check_sigma(ESTIMATED_SIGMA if estimated else "sigma",
                        estimate_noise(image) if estimated else sigma)
    device = resolve_device(device)
    engine = check_choice("engine", engine, ENGINES)
    if engine == "auto":
        engine = "fast" if device.type == "cuda" else "reference"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if compile and engine != "fast":
        raise ValueError("compile=True needs engine='fast' (or 'auto' on CUDA); the reference "
                         "engine runs the network eagerly")
    fused_norms = engine == "fast" and fused_norms_pay(device, compile)
    runner = sample if engine == "reference" else partial(graphed_sample, engine=EngineConfig(
        precision=precision, compile=compile, fused_norms=fused_norms).validate())
    schedule = Schedule(DEFAULT_STEPS[method] if steps is None else steps, r2=r2)
    mstep = mstep_config(regularizer, kernel_size, device, mstep)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")

    working_size = check_int("working_size", working_size, low=32)
    crops = check_int("crops", crops, low=1, high=MAX_CROPS)
    max_batch = resolve_max_batch(max_batch, method, crops, particles, runs)
    tile_schedule = tile_schedule_of(tile_steps, method, r2)
    check_path_flags(fast, full_diffusion, boundary)
    large = max(image.shape[-2:]) > working_size
    on_crops = boundary == "valid" and not full_diffusion and (large or fast)
    if on_crops:
        check_crops_path(method, kernel_size, working_size, crops, particles, max_batch, fast,
                         runs)

    net_prior = load_prior(prior, device)
    if on_crops:
        check_working_multiple(working_size, net_prior)
        return _run_on_crops(
            loaded, image, sigma, estimated, started, method=method, net_prior=net_prior,
            kernel=kernel, kernel_size=kernel_size, schedule=schedule,
            tile_schedule=tile_schedule, particles=particles, seed=seed, device=device,
            progress=progress, mstep=mstep, rounds=rounds, guidance_scale=guidance_scale,
            callback=callback, runner=runner, working_size=working_size, crops=crops,
            max_batch=max_batch, fast=fast, restarts=restarts,
            batched=batched, info={
                "restarts": None, "r2": r2, "engine": engine,
                "precision": precision if engine == "fast" else "fp32", "regularizer": mstep.kind})
    frame = Frame.plan(*image.shape[-2:], kernel_size, net_prior.size_multiple, boundary)
    colour = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    grid, mask = frame.pad(colour.to(device))
    obs = Observation(grid, sigma, mask)
    if kernel is None:
        kernel = initial_kernel(kernel_size)
    kernel = (kernel / kernel.sum()).to(device)
    run_steps = len(schedule) * (rounds if method == "diffem-pigdm" else 1) * restarts
    total = run_steps // restarts if batched else run_steps  # the steps the loop takes
    reporter = StepProgress(total, obs, enabled=progress, desc=method)
    step_callback = reporter
    if callback is not None:
        def step_callback(i: int, x0: Tensor, k: Tensor | None) -> None:
            reporter(i, x0, k)
            callback(i, frame.crop(x0), k)

    _probe_prior(net_prior, (particles, 3, frame.grid_h, frame.grid_w), schedule, device)
    if torch.cuda.is_available() and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sample_start = time.perf_counter()
    compile_times = []  # per restart: the fast engine's compilation, or None

    def restart(stream: int) -> tuple[float, tuple[Tensor, Tensor, Tensor | None, bool]]:
        if batched:
            out = together[stream]
        else:
            generator = torch.Generator(device=device).manual_seed(stream)
            out = _sample(method, net_prior.model, obs, kernel, schedule, particles, generator,
                          mstep, rounds, guidance_scale, step_callback, runner)
            compile_times.append(out.compile_seconds)  # paid even when the restart diverged
        _check_finite(out, guidance_scale)
        samples, final_kernel, moved = out.particles, out.kernel, None
        if method in BLIND:  # the kernel's centre of mass onto its centre, the images along
            final_kernel, samples, moved = recentre(out.kernel, samples)
        return total_variation(frame.crop(samples)), (samples, final_kernel, moved,
                                                      out.fused_norms)

    try:
        if batched:  # every restart in one run of kernel groups, then each one's result
            generators = _restart_generators(seed, restarts, device)
            out = _sample(method, net_prior.model, (obs,) * restarts,
                          kernel.expand(restarts, -1, -1).contiguous(), schedule, particles,
                          list(generators.values()), mstep, rounds, guidance_scale,
                          step_callback, runner)
            compile_times.append(out.compile_seconds)
            together = {stream: replace(out, particles=part, kernel=k) for stream, part, k in
                        zip(generators, out.particles.chunk(restarts), out.kernel, strict=True)}
        (samples, final_kernel, moved, fused), restarts_report = keep_least(seed, restarts,
                                                                            restart)
    finally:
        reporter.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sample_seconds = time.perf_counter() - sample_start
    compiled = [t for t in compile_times if t is not None]
    compile_seconds = sum(compiled) if compiled else None
    reblur = frame.crop(blur_spectrum(samples.mean(0), psf2otf(final_kernel, grid.shape[-2:])))
    reblur_rmse = float((reblur - colour.to(device)).square().mean().sqrt())
    restored = frame.crop(samples)
    if image.shape[0] == 1:
        restored = restored.mean(dim=1, keepdim=True)
    restored, final_kernel = restored.float().cpu(), final_kernel.float().cpu()
    mean = restored.mean(0)
    info = {
        "method": method, "prior": net_prior.name, "particles": particles,
        "steps": len(schedule), "rounds": rounds if method == "diffem-pigdm" else 1,
        "sigma": sigma, "sigma_estimated": estimated, "kernel_size": kernel_size,
        "boundary": boundary, "grid": [frame.grid_h, frame.grid_w], "regularizer": mstep.kind,
        "r2": r2, "seed": seed,
        "restarts": {**restarts_report, "batched": batched} if method in BLIND else None,
        "engine": engine,
        "precision": precision if engine == "fast" else "fp32", "fused_norms": fused,
        "compiled": compile_seconds is not None, "device": describe_device(device),
        "source": loaded.source, "bits": loaded.bits,
        "reblur_rmse": reblur_rmse, "recentred": as_pixels(moved),
        "seconds_total": time.perf_counter() - started, "seconds_sampling": sample_seconds,
        # per step of one restart (batched: a share of the batch's step), comparable either way
        "seconds_per_step": (sample_seconds - (compile_seconds or 0.0)) / run_steps,
        "seconds_compile": compile_seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None, "path": "whole image",
    }
    return Result(restored[0], final_kernel, restored, mean, info)


def _run_on_crops(loaded, image: Tensor, sigma: float, estimated: bool, started: float, *,
                  method: str, net_prior: Prior, kernel: Tensor | None, kernel_size: int,
                  schedule: Schedule, tile_schedule: Schedule, particles: int, seed: int,
                  device: torch.device, progress: bool, mstep: HQSConfig, rounds: int,
                  guidance_scale: float, callback: StepCallback | None, runner: Runner,
                  working_size: int, crops: int, max_batch: int, fast: bool, restarts: int,
                  batched: bool, info: dict[str, Any]) -> Result:
    """``run()``'s crops path (``photo``): the kernel from crops (blind methods), then the
    frame by tiles or, ``fast``, by TV deconvolution. Arguments are checked by ``run()``."""
    height, width = image.shape[-2:]
    colour = (image.expand(3, -1, -1) if image.shape[0] == 1 else image).to(device)
    blind = method in BLIND
    multiple = net_prior.size_multiple
    plan = None if fast else tile_plan(height, width, working_size, kernel_size)
    crop_steps = len(schedule) * (rounds if method == "diffem-pigdm" else 1)
    total = (crop_steps * (1 if batched else restarts) if blind else 0) + (
        0 if fast else len(tile_schedule) * -(
        -len(plan) // max(1, max_batch // particles)))
    generator = torch.Generator(device=device).manual_seed(seed)
    reporter = StepProgress(total, Observation(colour, sigma), enabled=progress, desc=method)
    probed = set()

    def step_callback(i: int, x0: Tensor, k: Tensor | None) -> None:
        reporter(i, x0, k)
        if callback is not None:
            callback(i, x0, k)

    def observe(obs: Observation, sched: Schedule) -> None:
        reporter.observe(obs)
        shape = tuple(obs.y.shape)
        if shape not in probed:  # once per shape: a forward pass costs a step
            _probe_prior(net_prior, shape, sched, device)
            probed.add(shape)

    def sample(which: str, obs: Observation | tuple[Observation, ...], k: Tensor,
               sched: Schedule, n: int) -> SamplerOutput:
        observe(obs[0] if isinstance(obs, tuple) else obs, sched)
        return _sample(which, net_prior.model, obs, k, sched, n, generator, mstep, rounds,
                       guidance_scale, step_callback, runner)

    stages: dict[str, Any] = {}
    moved = None
    try:
        if blind:
            clock = time.perf_counter()
            initial = initial_kernel(kernel_size) if kernel is None else kernel
            initial = (initial / initial.sum()).to(device)

            def restart(stream: int) -> tuple[float, tuple[Tensor, list, torch.Generator]]:
                nonlocal generator  # sample() draws from it; the tiles go on with the kept one
                if batched:
                    estimate, boxes, score, generator = together[stream]
                else:
                    generator = torch.Generator(device=device).manual_seed(stream)
                    estimate, boxes, (score,) = estimate_on_crops(
                        colour, sample, method, initial, schedule, count=crops,
                        working_size=working_size, multiple=multiple, sigma=sigma,
                        particles=particles)
                _check_kernel_finite(estimate)
                return score, (estimate, boxes, generator)

            if batched:  # every restart in one run of kernel groups, each its own generator
                generators = _restart_generators(seed, restarts, device)
                generator = list(generators.values())
                estimates, boxes, scores = estimate_on_crops(
                    colour, sample, method, initial.expand(restarts, -1, -1).contiguous(),
                    schedule, count=crops, working_size=working_size, multiple=multiple,
                    sigma=sigma, particles=particles)
                together = {stream: (k, boxes, score, g) for (stream, g), k, score in
                            zip(generators.items(), estimates, scores, strict=True)}
            (kernel, boxes, generator), report = keep_least(seed, restarts, restart)
            info["restarts"] = {**report, "batched": batched}
            kernel, _, moved = recentre(kernel)  # the tiles then restore the frame in place
            stages["crops"] = {"boxes": [list(box) for box in boxes],
                               "window": list(crop_window(height, width, working_size,
                                                          kernel_size)),
                               "steps": crop_steps, "restarts": restarts,
                               "seconds": _elapsed(clock, device)}
        kernel = (kernel / kernel.sum()).to(device)
        clock = time.perf_counter()
        if fast:
            restored = deconvolve_tv(image.to(device), kernel, sigma)[None]
            stages["fast"] = {"method": "TV deconvolution", "seconds": _elapsed(clock, device)}
        else:
            restored = restore_tiles(
                colour, net_prior.model, NONBLIND[method], kernel, tile_schedule, plan,
                multiple=multiple, sigma=sigma, particles=particles, max_batch=max_batch,
                generator=generator, scale=guidance_scale,
                before_batch=lambda obs: observe(obs, tile_schedule), callback=step_callback)
            stages["tiles"] = {"count": len(plan), "window": [plan.window_h, plan.window_w],
                               "steps": len(tile_schedule), "max_batch": max_batch,
                               "seconds": _elapsed(clock, device)}
    finally:
        reporter.close()
    if not bool(torch.isfinite(restored).all()):
        raise Diverged("the restoration produced NaN or infinite values; nothing was returned")
    if image.shape[0] == 1 and restored.shape[1] == 3:
        restored = restored.mean(dim=1, keepdim=True)
    reblur = _reblur_rmse(restored.mean(0), image.to(device), kernel)
    restored, final_kernel = restored.float().cpu(), kernel.float().cpu()
    info.update({
        "method": method, "prior": net_prior.name, "particles": restored.shape[0],
        "steps": len(schedule) if blind else 0,
        "tile_steps": None if fast else len(tile_schedule),
        "rounds": rounds if method == "diffem-pigdm" else 1, "sigma": sigma,
        "sigma_estimated": estimated, "kernel_size": kernel_size, "boundary": "valid",
        "seed": seed, "device": describe_device(device), "source": loaded.source,
        "bits": loaded.bits, "reblur_rmse": reblur,
        "recentred": as_pixels(moved),
        "path": "crops + fast" if fast else ("crops + tiles" if blind else "tiles"),
        "working_size": working_size,
        "stages": stages, "seconds_total": time.perf_counter() - started,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None})
    return Result(restored[0], final_kernel, restored, restored.mean(0), info)


def _restart_generators(seed: int, restarts: int,
                        device: torch.device) -> dict[int, torch.Generator]:
    """Each restart's seed (``restarts.restart_seed``) and a generator seeded with it, in
    restart order: what ``keep_least`` gives each restart when they run one by one."""
    streams = (restart_seed(seed, index, restarts) for index in range(restarts))
    return {stream: torch.Generator(device=device).manual_seed(stream) for stream in streams}


def _elapsed(clock: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - clock


def _reblur_rmse(restored: Tensor, blurry: Tensor, kernel: Tensor) -> float:
    """RMSE of ``blurry − k ⊛ restored`` over the frame, ``restored`` extended by replication
    (the valid model's unknown surroundings, approximated)."""
    frame = Frame.plan(*blurry.shape[-2:], kernel.shape[-1], 1, "valid")
    grid, _ = frame.pad(restored)
    reblur = frame.crop(blur_spectrum(grid, psf2otf(kernel, grid.shape[-2:])))
    return float((reblur - blurry).square().mean().sqrt())


def _sample(method: str, model, obs: Observation | Sequence[Observation], kernel: Tensor,
            schedule: Schedule, particles: int, generator: Generators, mstep: HQSConfig,
            rounds: int, scale: float, callback, runner: Runner) -> SamplerOutput:
    guidance = "dps" if method.endswith("dps") else "pigdm"
    common = dict(schedule=schedule, particles=particles, generator=generator,
                  guidance=guidance, guidance_scale=scale, callback=callback, runner=runner)
    if method in ("pigdm", "dps"):
        return nonblind(model, obs, kernel, **common)
    if method == "diffem-pigdm":
        return diffusion_em(model, obs, kernel, mstep=mstep, rounds=rounds, **common)
    return fast_em(model, obs, kernel, mstep=mstep, **common)


def _probe_prior(prior: Prior, shape: tuple[int, ...], schedule: Schedule,
                 device: torch.device) -> None:
    """Call the prior once, at the run's first timestep on a noise input of the run's shape: a
    prior that fails, returns the wrong shape or non-finite values is reported here, by name,
    not as NaN images or an error deep inside the sampler."""
    x = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0),
                    device=device)
    t = torch.full((shape[0],), int(schedule.timesteps[-1]), dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            eps = prior.model(x, t)
    except Exception as err:  # a user's network: say which call failed, keep the cause
        raise ValueError(f"prior {prior.name!r} failed on an input of shape {list(shape)} at "
                         f"t = {int(t[0])}: {type(err).__name__}: {err}") from err
    channels = shape[1]
    if (not isinstance(eps, Tensor) or eps.dim() != 4 or eps.shape[0] != shape[0]
            or eps.shape[1] not in (channels, 2 * channels) or eps.shape[2:] != x.shape[2:]):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"prior {prior.name!r} must return eps of shape [n, {channels} or "
                         f"{2 * channels}, H, W] = {list(shape)}, got {got}")
    if not bool(torch.isfinite(eps[:, :channels]).all()):
        raise ValueError(f"prior {prior.name!r} returned NaN or infinite values at t = {int(t[0])}")


def _check_finite(out: SamplerOutput, guidance_scale: float) -> None:
    """No NaN or inf leaves ``run()``: say which stage produced it."""
    check_finite_result(out.particles, out.kernel, guidance_scale)


def check_finite_result(particles: Tensor, kernel: Tensor, guidance_scale: float) -> None:
    """``Diverged`` (a ``RuntimeError``) naming the stage when the sampled ``particles`` or the
    ``kernel`` hold NaN or inf (``run()``'s check; ``aot.Package.run`` makes it too)."""
    _check_kernel_finite(kernel)
    if not bool(torch.isfinite(particles).all()):
        raise Diverged(
            "sampling produced NaN or infinite values (the prior's output or the guidance "
            f"diverged during the run; guidance_scale={guidance_scale:g}); nothing was returned"
        )


def _check_kernel_finite(kernel: Tensor) -> None:
    if not bool(torch.isfinite(kernel).all()):
        raise Diverged("the M-step produced a kernel with NaN or infinite values (a kernel "
                       "denoiser or the prior diverged during the run); nothing was returned")
