"""``run()``: one blurry photo in, the kernel and restored images out."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Callable, Sequence
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
from .io import LoadedImage, load_image
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
    DEFAULT_CROPS,
    DEFAULT_STEPS,
    ENGINES,
    GROUPED,
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
    on_crops_path,
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
        callback: StepCallback | None = None, working_size: int = WORKING_SIZE,
        crops: int = DEFAULT_CROPS,
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
    (``x̂0`` of all, the kernels ``[R, K, K]``). ``info["images_together"]``: 1 here;
    ``run_together`` lets photos of one size share the calls.

    A photo larger than ``working_size`` (pixels, default 256) on either side, with more pixels
    than its crops would cover (``crops`` windows of ``working_size − 2⌊K/2⌋`` squared;
    ``settings.on_crops_path``), takes the crops path (``photo``): the blind method runs on its
    ``crops`` most informative windows as one batch sharing the kernel, then the full frame is
    restored with that kernel by non-blind ΠGDM/DPS over overlapping tiles (``tile_steps``:
    default 25 for ΠGDM, 1000 for DPS; at most ``max_batch`` network inputs, tiles ×
    particles, per call; default 8, or crops × particles where that is more, since the crops
    share one call), or, with ``fast=True``
    (this path at any size), by a TV deconvolution (``deconv``: no diffusion; one image).
    Non-blind methods skip the crops. ``full_diffusion=True`` keeps the whole-image run. On the
    crops path ``callback`` sees each batch's ``x̂0`` on its computation grids (crops or tiles
    × particles, window-major, the unobserved borders included) instead of the frame.
    ``info["path"]`` says which path ran; ``info["stages"]`` gives each stage's crops or tiles,
    steps and seconds (the crops path's timings; ``grid``, ``fused_norms``, ``compiled`` and the
    per-step seconds are the whole-image run's keys). Several photos with the same settings:
    ``run_together``.
    """
    options = {name: value for name, value in locals().items() if name not in ("blurry", "sigma")}
    (result,) = _run_images([blurry], sigma, **options)
    if isinstance(result, Exception):
        raise result
    return result


class SharedCallFailed(RuntimeWarning):
    """``run_together``: photos of one size could not share their network calls (out of memory,
    say); each ran alone."""


RUN_OPTIONS = {name: parameter.default for name, parameter in inspect.signature(run).parameters
               .items() if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
IMAGE_ERRORS = (ValueError, RuntimeError, OSError)  # one image fails; the others go on


def run_together(blurries: Sequence[object], sigma: float | None = None,
                 **options: Any) -> list[Result | Exception]:
    """Several photos with the same settings (``options``: ``run()``'s keyword arguments), each
    photo's result the one ``run()`` gives it alone, in the order given.

    Photos of one size that take the whole-image path share every network call (Fast EM
    methods: photos × restarts (with ``batch_restarts``) × particles inputs per call, each
    photo drawing its own random streams), so their results equal their single runs up to the
    float rounding of a larger batch, as with ``batch_restarts``; other photos run one after
    another. A photo that cannot be read or restored (too small, NaN, every restart diverged)
    gets its exception (``ValueError``, ``RuntimeError``, ``OSError``) in its place and the
    others go on; when a shared call fails, its photos run again one by one, so that a failure
    stays with its photo (a ``SharedCallFailed`` warning says so; the errors of several photos
    come without their tracebacks, which would hold the failed runs' memory; a
    ``RestartsDiverged`` warning names its photo: its place in the list and its source, a path
    where it was read from one). Errors of the settings raise. The callback sees the photos of
    a shared call at once (``x̂0`` of all, the kernels ``[G, K, K]``);
    ``info["images_together"]`` says how many photos shared the calls,
    ``info["seconds_total"]`` counts from the start of the call.
    """
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"run_together() got unknown settings {unknown}")
    if isinstance(blurries, (str, os.PathLike, Tensor)) or not isinstance(blurries, Sequence):
        raise ValueError("blurries must be a list of photos (paths, arrays or tensors)")
    return _run_images(list(blurries), sigma, **{**RUN_OPTIONS, **options})


@dataclass(frozen=True)
class _Setup:
    """``run()``'s settings once checked: what every photo of a call shares."""

    method: str
    particles: int
    rounds: int
    seed: int
    guidance_scale: float
    kernel: Tensor | None  # the given kernel (CPU, float32): blind methods start from it
    kernel_size: int
    restarts: int
    batched: bool  # the restarts run as kernel groups
    device: torch.device
    engine: str
    precision: str
    runner: Runner
    schedule: Schedule
    r2: str
    boundary: str
    progress: bool
    callback: StepCallback | None
    working_size: int
    crops: int
    max_batch: int
    tile_schedule: Schedule
    fast: bool
    net_prior: Prior | None = None
    mstep: HQSConfig | None = None


@dataclass(frozen=True)
class _Photo:
    """One photo of a call, read and checked: its noise level and path; label: which photo it
    is in warnings (its place and source where several run, else its file, if any)."""

    loaded: LoadedImage
    sigma: float
    estimated: bool
    on_crops: bool
    label: str | None

    @property
    def image(self) -> Tensor:
        return self.loaded.image


def _run_images(blurries: list[object], sigma: float | None, *, method: str, prior: object,
                particles: int, steps: str | int | None, kernel_size: int | None, seed: int,
                device: str | torch.device | None, progress: bool, kernel: Tensor | None,
                boundary: str, regularizer: str, rounds: int, r2: str, guidance_scale: float,
                engine: str, precision: str, compile: bool, mstep: HQSConfig | None,
                callback: StepCallback | None, working_size: int, crops: int,
                max_batch: int | None, tile_steps: str | int | None, fast: bool,
                full_diffusion: bool, restarts: int | None,
                batch_restarts: bool) -> list[Result | Exception]:
    """``run()`` and ``run_together()``: the settings checked (errors raise), then each photo
    read and checked (its errors in its place), then the photos run: one whole-image run per
    group of equal size (``_whole_image``), or each on the crops path."""
    started = time.perf_counter()
    loaded = [_attempt(load_image, blurry) for blurry in blurries]
    if all(isinstance(read, Exception) for read in loaded):
        return loaded  # nothing to run: the photos' own errors (run(): its read error first)
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
    kernel_size = check_int("kernel_size", kernel_size_or_default(kernel_size), low=3)
    if sigma is not None:
        sigma = check_sigma("sigma", sigma)
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
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")
    working_size = check_int("working_size", working_size, low=32)
    crops = check_int("crops", crops, low=1, high=MAX_CROPS)
    max_batch = resolve_max_batch(max_batch, method, crops, particles, runs)
    tile_schedule = tile_schedule_of(tile_steps, method, r2)
    check_path_flags(fast, full_diffusion, boundary)
    setup = _Setup(method, particles, rounds, seed, guidance_scale, kernel, kernel_size,
                   restarts, runs > 1, device, engine, precision if engine == "fast" else "fp32",
                   runner, schedule, r2, boundary, progress, callback, working_size, crops,
                   max_batch, tile_schedule, fast)
    photos = [read if isinstance(read, Exception) else _attempt(
        _photo, read, sigma, setup, full_diffusion,
        f"photo {index + 1} of {len(loaded)} ({read.source})" if len(loaded) > 1 else read.path)
        for index, read in enumerate(loaded)]
    checked = [photo for photo in photos if isinstance(photo, _Photo)]
    if not checked:
        return photos
    cropping = any(photo.on_crops for photo in checked)
    if cropping:
        check_crops_path(method, kernel_size, working_size, crops, particles, max_batch, fast,
                         runs)
    mstep = mstep_config(regularizer, kernel_size, device, mstep)
    net_prior = load_prior(prior, device)
    if cropping:
        check_working_multiple(working_size, net_prior)
    setup = replace(setup, net_prior=net_prior, mstep=mstep)
    results: list[Result | Exception] = list(photos)
    together: dict[object, list[int]] = {}  # photos of one size on the whole-image path
    for index, photo in enumerate(photos):
        if isinstance(photo, Exception):
            continue
        if photo.on_crops:
            results[index] = _light(_attempt(_run_on_crops, photo, setup, started), photos)
        else:
            key = tuple(photo.image.shape[-2:]) if method in GROUPED else index
            together.setdefault(key, []).append(index)
    for indices in together.values():
        group = [photos[index] for index in indices]
        for index, result in zip(indices, _whole_images(group, setup, started), strict=True):
            results[index] = _light(result, photos)
    return results


def _attempt(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, or the photo's error (``IMAGE_ERRORS``) in place of its result."""
    try:
        return function(*args)
    except IMAGE_ERRORS as err:
        return err


def _light(result: Result | Exception, photos: list) -> Result | Exception:
    """A photo's error without its traceback where other photos run after it (the traceback's
    frames would keep the failed run's tensors, device memory included, alive); ``run()``'s
    single photo keeps it."""
    if isinstance(result, Exception) and len(photos) > 1:
        result.__traceback__ = None
    return result


def _photo(loaded: LoadedImage, sigma: float | None, setup: _Setup, full_diffusion: bool,
           label: str | None) -> _Photo:
    """A photo's own checks: the kernel fits it, its noise level (estimated when ``None``),
    and its path (crops + tiles above the working size, or with ``fast``)."""
    image = loaded.image
    check_kernel_size("kernel_size", setup.kernel_size, tuple(image.shape[-2:]))
    estimated = sigma is None
    if estimated:
        sigma = check_sigma(ESTIMATED_SIGMA, estimate_noise(image))
    return _Photo(loaded, sigma, estimated, on_crops_path(
        tuple(image.shape[-2:]), working_size=setup.working_size, crops=setup.crops,
        kernel_size=setup.kernel_size, boundary=setup.boundary, full_diffusion=full_diffusion,
        fast=setup.fast, blind=setup.method in BLIND), label)


def _whole_images(photos: list[_Photo], setup: _Setup,
                  started: float) -> list[Result | Exception]:
    """``_whole_image`` for photos of one size, together; when a shared call fails, each photo
    alone, so that the failure stays with the photo that caused it."""
    if len(photos) > 1:
        try:
            return _whole_image(photos, setup, started)
        except IMAGE_ERRORS as err:
            warnings.warn(f"{len(photos)} photos could not share their network calls "
                          f"({type(err).__name__}: {err}); each runs alone", SharedCallFailed,
                          stacklevel=3)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory error, for the photos alone
    return [_attempt(lambda one: _whole_image([one], setup, started)[0], photo)
            for photo in photos]


def _whole_image(photos: list[_Photo], setup: _Setup,
                 started: float) -> list[Result | Exception]:
    """The whole-image path for photos of one size: each restart's sampling of every photo in
    one run of kernel groups (photo-major; with ``batched`` restarts, every restart's too), then
    each photo's kept restart (``keep_least``) and its result, or its error (every restart
    diverged). Errors of the shared sampling raise."""
    s = setup
    height, width = photos[0].image.shape[-2:]
    frame = Frame.plan(height, width, s.kernel_size, s.net_prior.size_multiple, s.boundary)
    colours = [photo.image.expand(3, -1, -1) if photo.image.shape[0] == 1 else photo.image
               for photo in photos]
    observations = []
    for colour, photo in zip(colours, photos, strict=True):
        grid, mask = frame.pad(colour.to(s.device))
        observations.append(Observation(grid, photo.sigma, mask))
    kernel = initial_kernel(s.kernel_size) if s.kernel is None else s.kernel
    kernel = (kernel / kernel.sum()).to(s.device)
    streams = [restart_seed(s.seed, index, s.restarts) for index in range(s.restarts)]
    run_steps = len(s.schedule) * (s.rounds if s.method == "diffem-pigdm" else 1) * s.restarts
    total = run_steps // s.restarts if s.batched else run_steps  # the steps the loop takes
    reporter = StepProgress(total, observations[0], enabled=s.progress, desc=s.method)
    step_callback = reporter
    if s.callback is not None:
        def step_callback(i: int, x0: Tensor, k: Tensor | None) -> None:
            reporter(i, x0, k)
            s.callback(i, frame.crop(x0), k)

    _probe_prior(s.net_prior, (s.particles, 3, frame.grid_h, frame.grid_w), s.schedule,
                 s.device)
    if torch.cuda.is_available() and s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    sample_start = time.perf_counter()
    compile_times = []  # per call: the fast engine's compilation, or None
    outputs: dict[tuple[int, int], SamplerOutput] = {}  # (photo, stream): its sampling

    def sample_streams(chosen: list[int]) -> None:
        """One sampling run of every photo × the ``chosen`` streams into ``outputs``."""
        groups = [(index, stream) for index in range(len(photos)) for stream in chosen]
        obs = tuple(observations[index] for index, _ in groups)
        generators = [_generator(stream, s.device) for _, stream in groups]
        grouped = len(groups) > 1  # one group runs as the plain loop, as run() always did
        out = _sample(s.method, s.net_prior.model, obs if grouped else obs[0],
                      kernel.expand(len(groups), -1, -1).contiguous() if grouped else kernel,
                      s.schedule, s.particles, generators if grouped else generators[0],
                      s.mstep, s.rounds, s.guidance_scale, step_callback, s.runner)
        compile_times.append(out.compile_seconds)  # paid even when the restart diverged
        if not grouped:
            outputs[groups[0]] = out
            return
        for group, part, k in zip(groups, out.particles.chunk(len(groups)), out.kernel,
                                  strict=True):
            outputs[group] = replace(out, particles=part, kernel=k)

    try:
        if s.batched:  # every restart of every photo in one run
            sample_streams(streams)
        elif len(photos) > 1:  # restart by restart, the photos together
            for stream in streams:
                sample_streams([stream])
        kept = [_attempt(keep_least, s.seed, s.restarts, partial(
            _whole_restart, photo=index, outputs=outputs, sample_streams=sample_streams,
            frame=frame, setup=s), photo.label) for index, photo in enumerate(photos)]
    finally:
        reporter.close()
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    sample_seconds = time.perf_counter() - sample_start
    compiled = [t for t in compile_times if t is not None]
    compile_seconds = sum(compiled) if compiled else None
    return [outcome if isinstance(outcome, Exception) else _whole_result(
        photo, colour, *outcome, frame=frame, setup=s, started=started, together=len(photos),
        sample_seconds=sample_seconds, compile_seconds=compile_seconds, run_steps=run_steps)
        for photo, colour, outcome in zip(photos, colours, kept, strict=True)]


def _whole_restart(stream: int, *, photo: int, outputs: dict, sample_streams, frame: Frame,
                   setup: _Setup) -> tuple[float, tuple[Tensor, Tensor, Tensor | None, bool]]:
    """One restart of one photo for ``keep_least``: its sampling (run now if not yet run: a
    single photo's restarts one after another), checked, re-centred and scored."""
    if (photo, stream) not in outputs:
        sample_streams([stream])
    out = outputs.pop((photo, stream))  # the kept one stays with keep_least only
    _check_finite(out, setup.guidance_scale)
    samples, final_kernel, moved = out.particles, out.kernel, None
    if setup.method in BLIND:  # the kernel's centre of mass onto its centre, the images along
        final_kernel, samples, moved = recentre(out.kernel, samples)
    return total_variation(frame.crop(samples)), (samples, final_kernel, moved, out.fused_norms)


def _whole_result(photo: _Photo, colour: Tensor, kept: tuple, report: dict, *, frame: Frame,
                  setup: _Setup, started: float, together: int, sample_seconds: float,
                  compile_seconds: float | None, run_steps: int) -> Result:
    """A photo's ``Result`` from its kept restart (``_whole_image``)."""
    s = setup
    samples, final_kernel, moved, fused = kept
    grid_hw = (frame.grid_h, frame.grid_w)
    reblur = frame.crop(blur_spectrum(samples.mean(0), psf2otf(final_kernel, grid_hw)))
    reblur_rmse = float((reblur - colour.to(s.device)).square().mean().sqrt())
    restored = frame.crop(samples)
    if photo.image.shape[0] == 1:
        restored = restored.mean(dim=1, keepdim=True)
    restored, final_kernel = restored.float().cpu(), final_kernel.float().cpu()
    info = {
        "method": s.method, "prior": s.net_prior.name, "particles": s.particles,
        "steps": len(s.schedule), "rounds": s.rounds if s.method == "diffem-pigdm" else 1,
        "sigma": photo.sigma, "sigma_estimated": photo.estimated, "kernel_size": s.kernel_size,
        "boundary": s.boundary, "grid": list(grid_hw), "regularizer": s.mstep.kind,
        "r2": s.r2, "seed": s.seed,
        "restarts": {**report, "batched": s.batched} if s.method in BLIND else None,
        "engine": s.engine, "precision": s.precision, "fused_norms": fused,
        "compiled": compile_seconds is not None, "device": describe_device(s.device),
        "source": photo.loaded.source, "bits": photo.loaded.bits,
        "reblur_rmse": reblur_rmse, "recentred": as_pixels(moved),
        "images_together": together,
        "seconds_total": time.perf_counter() - started, "seconds_sampling": sample_seconds,
        # per step of one restart of one photo (batched or together: a share of the batch's
        # step), comparable either way
        "seconds_per_step": (sample_seconds - (compile_seconds or 0.0)) / (run_steps * together),
        "seconds_compile": compile_seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(s.device)
        if s.device.type == "cuda" else None, "path": "whole image",
    }
    return Result(restored[0], final_kernel, restored, restored.mean(0), info)


def _run_on_crops(photo: _Photo, setup: _Setup, started: float) -> Result:
    """``run()``'s crops path (``photo``): the kernel from crops (blind methods), then the
    frame by tiles or, ``fast``, by TV deconvolution."""
    loaded, image, sigma, estimated = photo.loaded, photo.image, photo.sigma, photo.estimated
    method, net_prior, kernel, kernel_size = (setup.method, setup.net_prior, setup.kernel,
                                              setup.kernel_size)
    schedule, tile_schedule, particles, seed = (setup.schedule, setup.tile_schedule,
                                                setup.particles, setup.seed)
    device, progress, mstep, rounds = setup.device, setup.progress, setup.mstep, setup.rounds
    guidance_scale, callback, runner = setup.guidance_scale, setup.callback, setup.runner
    working_size, crops, max_batch, fast = (setup.working_size, setup.crops, setup.max_batch,
                                            setup.fast)
    restarts, batched = setup.restarts, setup.batched
    info: dict[str, Any] = {"restarts": None, "r2": setup.r2, "engine": setup.engine,
                            "precision": setup.precision, "regularizer": mstep.kind}
    height, width = image.shape[-2:]
    colour = (image.expand(3, -1, -1) if image.shape[0] == 1 else image).to(device)
    blind = method in BLIND
    multiple = net_prior.size_multiple
    plan = None if fast else tile_plan(height, width, working_size, kernel_size)
    crop_steps = len(schedule) * (rounds if method == "diffem-pigdm" else 1)
    total = (crop_steps * (1 if batched else restarts) if blind else 0) + (
        0 if fast else len(tile_schedule) * -(
        -len(plan) // max(1, max_batch // particles)))
    generator = _generator(seed, device)
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
                    generator = _generator(stream, device)
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
            (kernel, boxes, generator), report = keep_least(seed, restarts, restart,
                                                            photo.label)
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
        "path": ("crops + fast" if blind else "fast") if fast else (
            "crops + tiles" if blind else "tiles"),
        "working_size": working_size, "images_together": 1,
        "stages": stages, "seconds_total": time.perf_counter() - started,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda" else None})
    return Result(restored[0], final_kernel, restored, restored.mean(0), info)


def _restart_generators(seed: int, restarts: int,
                        device: torch.device) -> dict[int, torch.Generator]:
    """Each restart's seed (``restarts.restart_seed``) and a generator seeded with it, in
    restart order: what ``keep_least`` gives each restart when they run one by one."""
    streams = (restart_seed(seed, index, restarts) for index in range(restarts))
    return {stream: _generator(stream, device) for stream in streams}


def _generator(stream: int, device: torch.device) -> torch.Generator:
    """A restart's random stream: a generator on ``device`` seeded with ``stream``."""
    return torch.Generator(device=device).manual_seed(stream)


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
