"""``run()``'s settings: the methods, their defaults and limits, and the checks of the settings
that ``run()``, ``fastem batch`` (``batch``) and ``fastem export`` (``aot``) share, so that each
front end refuses a bad setting with the same message before any work."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .checks import check_int
from .mstep import HQSConfig, bundled_denoiser
from .photo import tile_plan
from .physics import initial_kernel
from .priors import Prior
from .restarts import MAX_RESTARTS, default_restarts
from .schedule import Schedule

METHODS = ("fastem-pigdm", "fastem-dps", "diffem-pigdm", "pigdm", "dps")
BLIND = ("fastem-pigdm", "fastem-dps", "diffem-pigdm")
GROUPED = ("fastem-pigdm", "fastem-dps")  # one run of one step: restarts can be kernel groups
DEFAULT_STEPS = {"fastem-pigdm": "100", "fastem-dps": "1000", "diffem-pigdm": "100",
                 "pigdm": "100", "dps": "1000"}
MAX_PARTICLES = 256
WORKING_SIZE = 256  # run()'s default working_size: larger photos take the crops + tiles path
DEFAULT_KERNEL_SIZE = 33  # run()'s K unless a kernel is given
MAX_ROUNDS = 100  # Diffusion EM's full runs (10 by default)
MAX_GUIDANCE_SCALE = 100.0  # far beyond any useful value; larger ones overflow the update
ENGINES = ("auto", "fast", "reference")
DEFAULT_MAX_BATCH = 8  # network inputs per call on the crops path, unless more are needed
NONBLIND = {"fastem-pigdm": "pigdm", "fastem-dps": "dps", "diffem-pigdm": "pigdm",
            "pigdm": "pigdm", "dps": "dps"}  # the tiles' method after the crops' kernel
DEFAULT_TILE_STEPS = {"pigdm": "25", "dps": "1000"}  # the kernel is known: fewer steps (README)
MAX_CROPS = 64
DEFAULT_CROPS = 3  # run()'s crops: the windows the kernel is estimated on


def on_crops_path(image_hw: tuple[int, int], *, working_size: int, crops: int, kernel_size: int,
                  boundary: str, full_diffusion: bool, fast: bool, blind: bool) -> bool:
    """Whether ``run()`` takes the crops path for a photo of ``image_hw`` (on the valid boundary,
    unless ``full_diffusion``): always with ``fast``; else when the photo is larger than the
    working size on a side and, for a blind method, has more pixels than its crops would cover
    (``crops`` windows of ``working_size − 2⌊K/2⌋`` squared: 3 × 224² by default). A photo
    that small is one the crops would see almost whole anyway, and the whole-image run restores
    it better for about 1.4× the time (python/results/photo-midsize-tune/). A non-blind method
    (no crops: the tiles alone, 25 steps) tiles every photo above the working size: at equal
    steps its tiles restore better than the whole frame as one grid, in twice the time
    (python/results/tile-layout-tune/: 288×448, 0.36 dB)."""
    if boundary != "valid" or full_diffusion:
        return False
    side = working_size - 2 * (kernel_size // 2)
    height, width = image_hw
    covered = blind and height * width <= crops * side * side
    return fast or (max(height, width) > working_size and not covered)


def check_restarts(restarts: int | None, method: str) -> int:
    """``restarts`` checked; ``None``: the method's default (``restarts.default_restarts``; a
    non-blind run has no kernel to go wrong: it takes no restarts)."""
    if restarts is None:
        return default_restarts(method)
    restarts = check_int("restarts", restarts, low=1, high=MAX_RESTARTS)
    if restarts > 1 and method not in BLIND:
        raise ValueError(f"restarts applies to the blind methods; {method!r} is non-blind and "
                         "runs once")
    return restarts


def batched_restarts(batch_restarts: object, method: str, restarts: int) -> int:
    """How many restarts run as one batch: ``restarts`` with ``batch_restarts`` (a boolean,
    only for the methods whose run is one loop of one step, ``GROUPED``), else 1."""
    if not isinstance(batch_restarts, bool):
        raise ValueError(f"batch_restarts must be True or False, got {batch_restarts!r}")
    if batch_restarts and method not in GROUPED:
        why = ("runs its restarts one after another" if method in BLIND
               else "is non-blind and runs once")
        raise ValueError(f"batch_restarts applies to {' and '.join(GROUPED)}; {method!r} {why}")
    return restarts if batch_restarts else 1


def check_path_flags(fast: object, full_diffusion: object, boundary: str) -> None:
    """``fast`` and ``full_diffusion``: booleans, not both; ``fast`` needs the valid boundary."""
    for name, flag in (("fast", fast), ("full_diffusion", full_diffusion)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if fast and full_diffusion:
        raise ValueError("fast=True restores the frame by deconvolution, full_diffusion=True by "
                         "one diffusion run over it: choose one")
    if fast and boundary != "valid":
        raise ValueError("fast=True works on real photos: it needs boundary='valid'")


def resolve_max_batch(max_batch: int | None, method: str, crops: int, particles: int,
                      runs: int = 1) -> int:
    """``max_batch`` checked, or by default (``None``) at least ``DEFAULT_MAX_BATCH`` and room
    for one call of the crops stage (crops × particles × ``runs``, the restarts batched
    together) or of one tile's particles."""
    if max_batch is None:
        return max(DEFAULT_MAX_BATCH, crops * particles * runs if method in BLIND else particles)
    return check_int("max_batch", max_batch, low=1, high=MAX_PARTICLES)


def check_crops_path(method: str, kernel_size: int, working_size: int, crops: int,
                     particles: int, max_batch: int, fast: bool, runs: int = 1) -> None:
    """What the crops path needs beyond each argument's own range (``runs``: the restarts
    batched together, ``batch_restarts``)."""
    if working_size < 4 * kernel_size:  # room for a crop's blur footprint
        raise ValueError(f"working_size must be at least 4 × kernel_size = {4 * kernel_size} "
                         f"for the crops and tiles, got {working_size}")
    try:  # a tile's context and blend ramp, as the tile plan counts them
        tile_plan(working_size, working_size, working_size, kernel_size)
    except ValueError as err:
        raise ValueError(f"working_size {working_size} is too small for kernel_size "
                         f"{kernel_size}: {err}") from None
    blind = method in BLIND
    needed = crops * particles * runs if blind else (0 if fast else particles)  # fast: no tiles
    if max_batch < needed:
        batched = " × restarts (batch_restarts)" if blind and runs > 1 else ""
        raise ValueError(f"max_batch (--max-batch) must hold the {'crops × ' if blind else ''}"
                         f"particles{batched} of one network call ({needed}), got {max_batch}; "
                         f"raise it or lower {'crops (--crops) or ' if blind else ''}particles"
                         f"{' or restarts' if batched else ''}")


def tile_schedule_of(tile_steps: str | int | None, method: str,
                     r2: str = "reference") -> Schedule:
    """The tiles' schedule (``tile_steps``, default per method); its errors name tile_steps."""
    try:
        return Schedule(DEFAULT_TILE_STEPS[NONBLIND[method]] if tile_steps is None
                        else tile_steps, r2=r2)
    except ValueError as err:
        raise ValueError(f"tile_steps: {err}") from None


def kernel_size_or_default(kernel_size: int | None) -> int:
    """``run()``'s kernel size when none is given: ``DEFAULT_KERNEL_SIZE``."""
    return DEFAULT_KERNEL_SIZE if kernel_size is None else kernel_size


def check_working_multiple(working_size: int, net_prior: Prior) -> None:
    """The crops and tiles are network inputs: their size is a multiple of the prior's."""
    if working_size % net_prior.size_multiple:
        raise ValueError(f"working_size must be a multiple of {net_prior.size_multiple} for "
                         f"this prior, got {working_size}")


def mstep_config(regularizer: str, size: int, device: torch.device,
                 given: HQSConfig | None) -> HQSConfig:
    """The validated M-step settings: ``given`` (its regulariser wins), else the tuned ones for
    ``regularizer``; a plug-and-play regulariser without a denoiser gets the bundled one."""
    if given is None:
        given = HQSConfig(regularizer=regularizer)
    elif not isinstance(given, HQSConfig):
        raise ValueError(f"mstep must be an HQSConfig, got {type(given).__name__}")
    if given.kind == "pnp" and given.kernel_denoiser is None:
        given = replace(given, denoiser=bundled_denoiser(size, device))
    elif given.kind == "pnp":
        _probe_denoiser(given.kernel_denoiser, size, device)
    return given.validate(size)


def _probe_denoiser(denoiser, size: int, device: torch.device) -> None:
    """Call a user's kernel denoiser once on a Gaussian kernel: wrong shapes and non-finite
    values are reported here, by name, not as NaN images after the run."""
    kernel = initial_kernel(size, device=device)
    try:
        with torch.no_grad():
            out = denoiser(kernel, torch.tensor(0.01, device=device))
    except Exception as err:  # a user's callable: say which call failed, keep the cause
        raise ValueError(f"the kernel denoiser failed on a [{size}, {size}] kernel: "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or tuple(out.shape) != (size, size):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the kernel denoiser must return a [{size}, {size}] tensor, got {got}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("the kernel denoiser returned NaN or infinite values")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked (``cpu`` or an available ``cuda``); ``None``: CUDA if present."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device
