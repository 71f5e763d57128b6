"""Export of the whole blind deblur for programs without Python (camera pipelines, C++).

``export(path, height, width, ...)`` writes a **package**, a folder of a manifest and three
programs compiled ahead of time by AOTInductor for one prior, photo size, particle count, method
and device (``PROGRAMS``; float32 unless said):

- ``observe.pt2`` (``_observe_program``): the photo ``[3, h, w]`` in [0, 1] (a grey photo
  repeated on the three channels) → ``y`` ``[3, H, W]`` and ``mask`` ``[1, H, W]``, the photo
  placed on the computation grid by ``boundary.Frame`` (``mask`` all ones and ignored for
  ``boundary="circular"``), and the estimated noise level (0-d float64, [0, 1] units:
  ``noise.noise_level``, the same for a grey photo and its repetition);
- ``step.pt2``: the guided step (``step.step_with_noise``: the network's forward pass and its
  input-VJP, the M-step with the bundled kernel denoiser, the guidance and the DDPM update, on
  the ``torch.ops.fastem`` ops), with the schedule's tables and every weight inside. Inputs
  ``x`` ``[n, 3, H, W]`` (network units), ``kernel`` ``[K, K]``, ``step`` (0-d int64, the
  respaced index), ``noise`` ``[n, 3, H, W]`` (standard normal), ``y``, ``mask``, ``sigma``
  (0-d); outputs ``(x_{t−1}, kernel)``;
- ``finish.pt2`` (``_finish_program``): ``x_0`` and the kernel → the particles
  ``(clamp(x_0, −1, 1) + 1)/2`` re-centred with the kernel (``centring``) and cropped to the
  frame, ``[n, 3, h, w]``; the re-centred kernel; how far the images moved (``[2]`` float64);
  the restart's score (0-d: ``restarts.variation`` of the frame);
- ``manifest.json``: the settings and what the loop around the programs needs (``manifest``).
  The same entries, as strings, are the step program's AOTInductor metadata, which the C++ API
  (``csrc/api/fastem.h``) reads.

The loop around them is ``run()``'s: ``observe`` once; then, per restart (the manifest's
``restarts``, ``R``), ``x_T`` and each step's noise drawn, in that order, from one generator
seeded with the restart's seed ``seed·R + r`` (``restarts.restart_seed``), ``step`` for
``step = S−1 … 0`` (``samplers.sample``), a NaN or inf result left out as ``run()`` leaves it
out, and ``finish``; the restart of the least score is kept (the first on a tie); a grey photo's
result is the channels' mean. ``Package.run`` is that loop in Python, the test oracle of the C++
one. Everything the loop computes from images is a program: the C++ API holds no copy of
Python's padding, noise estimate, re-centring or score.

**Route.** ``torch.export`` of a module that calls ``torch.func.vjp`` or ``torch.autograd.grad``
traces, but AOTInductor then fails on the lifted tensor constants ("Cannot access data pointer of
Tensor (FakeTensor)", torch 2.13). Tracing first with ``make_fx``, which records the backward pass
as plain ATen ops with the weights as constants, and exporting that graph works. The fused ops
stay ``torch.ops.fastem`` calls, which AOTInductor's proxy executor dispatches by name (the
program needs libfastem loaded), except ``pigdm_filter`` and ``wiener_z``: their kernels take σ
as a host float, which tracing would freeze, so with σ an input they run their pure-torch
references (``ops._backend.dispatch``). The FFTs have no AOTInductor C shim either and go through
the proxy executor as well. One package per image size: the grid, the frame's offsets, the
kernel's placement on the grid and the FFT sizes are Python integers in the traced step, so
dynamic sizes were not attempted. The observe and finish programs are traced the same way.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .api import Result, check_finite_result
from .boundary import BOUNDARIES, Frame
from .centring import as_pixels, recentre
from .checks import (
    ESTIMATED_SIGMA,
    LEAST_SIGMA,
    MAX_SIGMA,
    check_choice,
    check_int,
    check_kernel_size,
    check_positive,
    check_sigma,
)
from .io import MIN_SIDE, current_umask, load_image
from .mstep import REGULARIZERS
from .noise import noise_level
from .observation import Observation
from .physics import initial_kernel
from .priors import load_prior
from .restarts import SEEDS, keep_least, variation
from .schedule import R2_RULES, Schedule, to_image
from .settings import (
    DEFAULT_CROPS,
    DEFAULT_KERNEL_SIZE,
    DEFAULT_STEPS,
    MAX_GUIDANCE_SCALE,
    MAX_PARTICLES,
    WORKING_SIZE,
    check_restarts,
    mstep_config,
    on_crops_path,
    resolve_device,
)
from .step import StepConfig, plan_step, step_with_noise

FORMAT = 4  # 2 (2026-11-29): the guidance weighs the frame's outside; re-centred results;
# 3 (2026-11-29): restarts, the one with the least total variation kept; 4 (2026-11-29): the
# observation and the finish are programs of the package
PROGRAMS = ("observe", "step", "finish")


def program_file(name: str) -> str:
    """The file of the program ``name`` in a package folder."""
    return f"{name}.pt2"


STEP_FILE = program_file("step")  # the program that carries the manifest as metadata
MANIFEST_FILE = "manifest.json"
EXPORT_METHODS = ("fastem-pigdm", "fastem-dps")  # the blind methods whose loop is one step
CHANNELS = 3  # the network's; a grey photo is repeated on the three
MAX_SIDE = 8192


class WholeImageWarning(UserWarning):
    """``export`` of a photo size that ``run()`` restores by crops + tiles: the package runs the
    whole-image diffusion (``run(..., full_diffusion=True)``), not the crops + tiles path."""


@dataclass(frozen=True)
class ExportSettings:
    """What one package is compiled for (``export``'s arguments, checked)."""

    height: int
    width: int
    prior: str
    method: str
    particles: int
    steps: str
    kernel_size: int
    boundary: str
    regularizer: str
    r2: str
    guidance_scale: float
    restarts: int
    device: torch.device


def export(path: str | os.PathLike, height: int, width: int, *, prior: str = "natural",
           method: str = "fastem-pigdm", particles: int = 1, steps: str | int | None = None,
           kernel_size: int = DEFAULT_KERNEL_SIZE, boundary: str = "valid",
           regularizer: str = "pnp", r2: str = "reference", guidance_scale: float = 1.0,
           restarts: int | None = None,
           device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Compile a package for photos of ``height × width`` pixels into the new folder ``path``.

    The settings are ``run()``'s (same names, same defaults; ``method`` one of
    ``EXPORT_METHODS``), its whole-image run (``full_diffusion=True``: a larger photo's default
    crops + tiles path is not exported); ``prior`` is a name or a weights path (not a module:
    the package records it by name; the manifest's ``"path"`` is ``"whole image"``). A photo
    that ``run()`` would restore by crops + tiles (``settings.on_crops_path``) gets a
    ``UserWarning``: the package then matches ``run(..., full_diffusion=True)``, not ``run()``'s
    default crops + tiles path. Takes minutes for the natural prior on a CPU. The folder
    appears only when complete. Returns the manifest, with ``export_seconds``.
    """
    started = time.perf_counter()
    target = Path(path)
    if target.exists():
        raise ValueError(f"package path already exists: {target}")
    if not target.parent.is_dir():
        raise ValueError(f"output folder does not exist: {target.parent}")
    programs, manifest = trace(height, width, prior=prior, method=method, particles=particles,
                               steps=steps, kernel_size=kernel_size, boundary=boundary,
                               regularizer=regularizer, r2=r2, guidance_scale=guidance_scale,
                               restarts=restarts, device=device)
    if on_crops_path((manifest["height"], manifest["width"]), working_size=WORKING_SIZE,
                     crops=DEFAULT_CROPS, kernel_size=manifest["kernel_size"],
                     boundary=manifest["boundary"], full_diffusion=False, fast=False,
                     blind=True):
        warnings.warn(f"a {manifest['height']}x{manifest['width']} package runs the whole-image "
                      "diffusion: it matches run(..., full_diffusion=True), not run()'s default "
                      "crops + tiles path for a photo of this size", WholeImageWarning,
                      stacklevel=2)
    from torch._inductor import aoti_compile_and_package  # heavy: on use only

    staging = Path(tempfile.mkdtemp(prefix=".fastem-", dir=target.parent))
    try:
        for name, program in programs.items():
            aoti_compile_and_package(
                program, package_path=str(staging / program_file(name)),
                inductor_configs={"aot_inductor.metadata": _metadata(manifest)}
                if name == "step" else {})
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's folder is private
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def trace(height: int, width: int, *, prior: str = "natural", method: str = "fastem-pigdm",
          particles: int = 1, steps: str | int | None = None,
          kernel_size: int = DEFAULT_KERNEL_SIZE, boundary: str = "valid",
          regularizer: str = "pnp", r2: str = "reference", guidance_scale: float = 1.0,
          restarts: int | None = None, device: str | torch.device | None = "cpu",
          ) -> tuple[dict[str, torch.export.ExportedProgram], dict[str, Any]]:
    """The package's programs (``PROGRAMS``), exported but not compiled, and its manifest
    (``export``'s arguments). ``Package(manifest, modules(programs))`` runs them uncompiled, in
    seconds."""
    settings = _check_settings(height, width, prior, method, particles, steps, kernel_size,
                               boundary, regularizer, r2, guidance_scale, restarts, device)
    net_prior = load_prior(settings.prior, settings.device)
    frame = Frame.plan(settings.height, settings.width, settings.kernel_size,
                       net_prior.size_multiple, settings.boundary)
    schedule = Schedule(settings.steps, r2=settings.r2)
    from torch.fx.experimental.proxy_tensor import make_fx

    generator = torch.Generator(device=settings.device).manual_seed(0)
    photo = torch.rand(CHANNELS, frame.height, frame.width, generator=generator,
                       device=settings.device)
    observe = _observe_program(frame)
    y, mask, _ = observe(photo)
    step, example = _trace_step(net_prior.model, settings, frame, schedule, y, mask, generator)
    x, kernel = example[:2]
    graphs = {"observe": (make_fx(observe)(photo), (photo,)), "step": (step, example),
              "finish": (make_fx(_finish_program(frame))(x, kernel), (x, kernel))}
    return ({name: torch.export.export(*graphs[name]) for name in PROGRAMS},
            _manifest(settings, frame, schedule, step))


def modules(programs: dict[str, torch.export.ExportedProgram]) -> dict[str, Callable[..., Any]]:
    """``trace``'s programs as callables (uncompiled), for ``Package``."""
    return {name: program.module() for name, program in programs.items()}


def _observe_program(frame: Frame) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """The observe program (module docstring) of photos placed by ``frame``."""
    def observe(photo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, mask = frame.pad(photo)
        if mask is None:
            mask = torch.ones(1, frame.grid_h, frame.grid_w, dtype=photo.dtype,
                              device=photo.device)
        return y, mask, noise_level(photo)

    return observe


def _finish_program(frame: Frame) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """The finish program (module docstring) of a restart on ``frame``'s grid."""
    def finish(x: Tensor, kernel: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kernel, images, offset = recentre(kernel, to_image(x.clamp(-1.0, 1.0)))
        images = frame.crop(images)
        return images, kernel, offset, variation(images)

    return finish


def _check_settings(height, width, prior, method, particles, steps, kernel_size, boundary,
                    regularizer, r2, guidance_scale, restarts, device) -> ExportSettings:
    height = check_int("height", height, low=MIN_SIDE, high=MAX_SIDE)
    width = check_int("width", width, low=MIN_SIDE, high=MAX_SIDE)
    if not isinstance(prior, (str, os.PathLike)):
        raise ValueError(f"prior must be a name or a weights path to export, got "
                         f"{type(prior).__name__}")
    method = check_choice("method", method, EXPORT_METHODS)
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if len(Schedule(steps)) < 1:
        raise ValueError(f"steps {steps!r} gives no step")
    return ExportSettings(
        height, width, os.fspath(prior), method,
        check_int("particles", particles, low=1, high=MAX_PARTICLES), str(steps),
        check_kernel_size("kernel_size", kernel_size, (height, width)),
        check_choice("boundary", boundary, BOUNDARIES),
        check_choice("regularizer", regularizer, REGULARIZERS),
        check_choice("r2", r2, R2_RULES),
        check_positive("guidance_scale", guidance_scale, high=MAX_GUIDANCE_SCALE),
        check_restarts(restarts, method), resolve_device(device))


def _trace_step(model, settings: ExportSettings, frame: Frame, schedule: Schedule, y: Tensor,
                mask: Tensor, generator: torch.Generator,
                ) -> tuple[torch.fx.GraphModule, tuple[Tensor, ...]]:
    """``step_with_noise`` over the program's inputs (module docstring), traced by ``make_fx``
    on example inputs (the observation ``y``, ``mask``; random draws from ``generator``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    device = settings.device
    guidance = "dps" if settings.method.endswith("dps") else "pigdm"
    mstep = mstep_config(settings.regularizer, settings.kernel_size, device, None)
    config = StepConfig(guidance, mstep, settings.guidance_scale)
    tables = schedule.tables(device)

    def step_program(x: Tensor, kernel: Tensor, step: Tensor, noise: Tensor, y: Tensor,
                     mask: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        obs = Observation(y, sigma, mask if frame.masked else None)
        x_prev, kernel, _ = step_with_noise(model, plan_step(obs, tables, config), step, x,
                                            kernel, noise)
        return x_prev, kernel

    shape = (settings.particles, CHANNELS, frame.grid_h, frame.grid_w)
    example = (torch.randn(shape, generator=generator, device=device),
               initial_kernel(settings.kernel_size).to(device),
               torch.tensor(len(schedule) - 1, device=device),
               torch.randn(shape, generator=generator, device=device), y, mask,
               torch.tensor(10 / 255, device=device))
    return _take_as_index(make_fx(step_program)(*example)), example


def _take_as_index(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite the table reads ``aten.take(table [S], step)`` (``schedule.at``) as
    ``aten.index(table, [step])``, the same gather: Inductor's decomposition of ``take`` indexes
    with the 0-d tensor as a Python int, a data-dependent value it cannot compile."""
    for node in graph.graph.nodes:
        if node.target is torch.ops.aten.take.default:
            table, index = node.args
            if table.meta["val"].dim() != 1 or index.meta["val"].dim() != 0:
                raise RuntimeError(f"unexpected take in the step: {node.format_node()}")
            node.target, node.args = torch.ops.aten.index.Tensor, (table, [index])
    graph.recompile()
    return graph


def _manifest(settings: ExportSettings, frame: Frame, schedule: Schedule,
              graph: torch.fx.GraphModule) -> dict[str, Any]:
    fused = sorted({str(node.target).split(".")[1] for node in graph.graph.nodes
                    if str(node.target).startswith("fastem.")})
    return {
        "format": FORMAT, "torch_version": torch.__version__,
        "fastem_version": importlib.metadata.version("fastem"),
        "device": settings.device.type, "path": "whole image",
        "prior": settings.prior, "method": settings.method,
        "particles": settings.particles, "steps": len(schedule), "steps_spec": settings.steps,
        "kernel_size": settings.kernel_size, "boundary": settings.boundary,
        "regularizer": settings.regularizer, "r2": settings.r2,
        "guidance_scale": settings.guidance_scale, "restarts": settings.restarts,
        "channels": CHANNELS,
        "height": frame.height, "width": frame.width, "grid_height": frame.grid_h,
        "grid_width": frame.grid_w, "top": frame.top, "left": frame.left,
        "masked": int(frame.masked), "sigma_min": LEAST_SIGMA, "sigma_max": MAX_SIGMA,
        "sigma_estimator": "haar-mad (noise.estimate_noise, in observe.pt2)",
        "fastem_ops": " ".join(fused),
        "initial_kernel": initial_kernel(settings.kernel_size).flatten().tolist(),
    }


def _metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest as AOTInductor's string metadata: numbers in ``repr`` (exact), lists
    space-separated."""
    def text(value: Any) -> str:
        if isinstance(value, list):
            return " ".join(map(repr, value))
        return value if isinstance(value, str) else repr(value)

    return {key: text(value) for key, value in manifest.items()}


def torch_release(version: str) -> str:
    """The release part ``major.minor.patch`` of a version string, without a local part
    (``+cpu``) or a pre-release or development suffix (``a0``, ``.dev20250101``): packages are
    accepted by torch release, by this rule on both sides (C++: ``csrc/api/fastem.cpp``)."""
    match = re.match(r"\d+(?:\.\d+){0,2}", version)
    return match.group(0) if match else ""


# What Package.run and load_package read from a manifest: the counts (with their least
# values, checked as the C++ API checks them) and the rest.
COUNT_KEYS = {"height": MIN_SIDE, "width": MIN_SIDE, "grid_height": MIN_SIDE,
              "grid_width": MIN_SIDE, "kernel_size": 1, "particles": 1, "steps": 1,
              "restarts": 1}
RUN_KEYS = frozenset(COUNT_KEYS) | {"device", "fastem_ops", "initial_kernel", "guidance_scale"}


def load_package(path: str | os.PathLike) -> Package:
    """Load the package folder ``path`` (``export``'s output) on its device.

    ``ValueError`` for a folder that is not a package, one made by another torch release
    (``torch_release``: major.minor.patch; naming both full versions), or a device this
    machine lacks.
    """
    folder = Path(path)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file() or not (folder / STEP_FILE).is_file():
        raise ValueError(f"not a fastem package (needs {MANIFEST_FILE} and {STEP_FILE}): "
                         f"{folder}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"bad package manifest {manifest_path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"bad package manifest {manifest_path}: format is not {FORMAT} "
                         "(made by another fastem: export it again with this one)")
    lost = [file for file in map(program_file, PROGRAMS) if not (folder / file).is_file()]
    if lost:  # checked after the format, as the C++ API does: format 3 had step.pt2 alone
        raise ValueError(f"bad package {folder}: {', '.join(lost)} missing")
    if torch_release(str(manifest.get("torch_version"))) != torch_release(torch.__version__):
        raise ValueError(f"package {folder} was made by torch {manifest.get('torch_version')}; "
                         f"this is torch {torch.__version__}: export it again with this version")
    missing = sorted(RUN_KEYS - manifest.keys())
    if missing:
        raise ValueError(f"bad package manifest {manifest_path}: {', '.join(missing)} missing")
    for key, least in COUNT_KEYS.items():
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"bad package manifest {manifest_path}: {key} must be an integer "
                             f"of at least {least}, got {value!r}")
    resolve_device(manifest["device"])
    if manifest["fastem_ops"]:  # the program calls them by name
        from .ops import _backend

        _backend.load_extension()
    from torch._inductor import aoti_load_package  # heavy: on use only

    programs = {}
    for name in PROGRAMS:
        file = folder / program_file(name)
        try:
            programs[name] = aoti_load_package(str(file))
        except RuntimeError as err:  # a truncated or foreign program
            raise ValueError(f"bad package {name} program {file}: {err}") from None
    return Package(manifest, programs)


class Package:
    """A package in Python: its ``manifest`` and ``run``, the loop of the C++ API around its
    ``programs`` (``PROGRAMS`` by name: compiled by ``load_package``, or ``trace``'s
    uncompiled)."""

    def __init__(self, manifest: dict[str, Any], programs: dict[str, Callable[..., Any]]) -> None:
        if sorted(programs) != sorted(PROGRAMS):
            raise ValueError(f"a package needs the programs {', '.join(PROGRAMS)}, got "
                             f"{', '.join(sorted(programs)) or 'none'}")
        self.manifest = manifest
        self.device = torch.device(manifest["device"])
        self._programs = programs

    def run(self, blurry: object, sigma: float | None = None, *, seed: int = 0) -> Result:
        """Deblur ``blurry`` (as ``run()`` takes it; the package's size) with σ given or
        estimated. Returns a ``Result`` whose ``info`` holds σ, the restarts (as ``run()``'s
        ``info["restarts"]``) and the timings."""
        started = time.perf_counter()
        m = self.manifest
        image = load_image(blurry).image
        if tuple(image.shape[-2:]) != (m["height"], m["width"]):
            raise ValueError(f"blurry is {image.shape[-2]}x{image.shape[-1]}; the package is "
                             f"for {m['height']}x{m['width']} photos")
        seed = check_int("seed", seed, low=0, high=SEEDS - 1)
        colour = image.expand(CHANNELS, -1, -1) if image.shape[0] == 1 else image
        y, mask, level = self._programs["observe"](colour.to(self.device).contiguous())
        estimated = sigma is None
        sigma = check_sigma(ESTIMATED_SIGMA if estimated else "sigma",
                            float(level) if estimated else sigma)
        size = m["kernel_size"]
        kernel = torch.tensor(m["initial_kernel"], device=self.device).reshape(size, size)
        sigma_t = torch.tensor(sigma, device=self.device)
        shape = (m["particles"], CHANNELS, m["grid_height"], m["grid_width"])
        sampling = time.perf_counter()

        def restart(stream: int) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
            generator = torch.Generator(device=self.device).manual_seed(stream)
            x, k = torch.randn(shape, generator=generator, device=self.device), kernel
            for i in reversed(range(m["steps"])):
                noise = torch.randn(shape, generator=generator, device=self.device)
                step = torch.tensor(i, device=self.device)
                x, k = self._programs["step"](x, k, step, noise, y, mask, sigma_t)
            check_finite_result(x, k, m["guidance_scale"])  # as run(): no NaN or inf leaves
            # as run() for a blind method: re-centred, scored on the frame
            restored, k, moved, score = self._programs["finish"](x, k)
            return float(score), (k, restored, moved)

        (kernel, restored, moved), restarts = keep_least(seed, m["restarts"], restart)
        if image.shape[0] == 1:
            restored = restored.mean(dim=1, keepdim=True)
        restored, kernel = restored.float().cpu(), kernel.float().cpu()
        info = {"sigma": sigma, "sigma_estimated": estimated, "seed": seed,
                "restarts": restarts, "recentred": as_pixels(moved),
                "seconds_sampling": time.perf_counter() - sampling,
                "seconds_total": time.perf_counter() - started}
        return Result(restored[0], kernel, restored, restored.mean(0), info)
