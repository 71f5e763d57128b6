"""``run_batch()``: many photos, one job — resumable, and spread over ``torchrun``'s processes.

One process loads the prior once and calls ``run()`` for each of its images with the same
settings and the same seed, so an image's result is the one ``run()`` / ``fastem deblur`` gives
alone; with ``batch_images`` above 1, up to that many images of one size on the whole-image
path share each network call (``run_together``: the same results up to float rounding). Each
finished image is one manifest line (``manifest``); a rerun skips an input whose bytes and
settings (fastem version included) have an ``ok`` line and whose outputs exist, not empty, and
redoes failed or changed ones. Under ``torchrun`` each process takes the inputs whose content
hash modulo the world size is its rank, and rank 0 merges the processes' manifests once all
have finished.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .api import IMAGE_ERRORS, Result, run, run_together
from .batch_plan import BatchItem, expand_inputs, plan_items
from .boundary import BOUNDARIES
from .checks import check_choice, check_int, check_sigma
from .distributed import ProcessGroup, Ranks, rank_device, ranks_from_env
from .io import LoadedImage, commit_files, encode_image, encode_kernel, load_image
from .manifest import (
    append_record,
    file_sha256,
    latest_by_content,
    merge,
    rank_manifest,
    read_records,
    settings_hash,
)
from .mstep import REGULARIZERS
from .priors import Prior, load_prior
from .restarts import SEEDS
from .schedule import Schedule
from .settings import (
    BLIND,
    DEFAULT_CROPS,
    DEFAULT_KERNEL_SIZE,
    DEFAULT_STEPS,
    GROUPED,
    MAX_CROPS,
    MAX_PARTICLES,
    batched_restarts,
    check_crops_path,
    check_path_flags,
    check_restarts,
    check_working_multiple,
    on_crops_path,
    resolve_device,
    resolve_max_batch,
    tile_schedule_of,
)

MAX_BATCH_IMAGES = 64
UNKNOWN_VERSION = "unknown"  # the settings' version where the package metadata is missing


@dataclass
class BatchResult:
    """The whole job's outcome (the same on every ``torchrun`` rank).

    records: the latest manifest record of each input (``manifest.RECORD_KEYS``); processed:
    images run now, by all processes; skipped: found done by an earlier run; failed: the records
    whose status is ``failed``; duplicates: ``{input: the input with the same bytes}`` (processed
    once).
    """

    records: list[dict]
    processed: int
    skipped: int
    duplicates: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [record for record in self.records if record["status"] != "ok"]


def run_batch(inputs: list[str | os.PathLike], out_dir: str | os.PathLike,
              sigma: float | None = None, *, method: str = "fastem-pigdm",
              prior: object = "natural", particles: int = 1, steps: str | int | None = None,
              kernel_size: int = DEFAULT_KERNEL_SIZE, seed: int = 0, restarts: int | None = None,
              batch_restarts: bool = False, device: str | None = None, boundary: str = "valid",
              regularizer: str = "pnp", working_size: int = 256,
              crops: int = DEFAULT_CROPS, max_batch: int | None = None,
              tile_steps: str | int | None = None,
              fast: bool = False, full_diffusion: bool = False, batch_images: int = 1,
              progress: bool = True) -> BatchResult:
    """Deblur every image of ``inputs`` (files, folders, glob patterns) into ``out_dir``.

    For an input ``x.jpg``: ``out_dir/x.png`` (the restored image, 16-bit where the input is)
    and ``out_dir/x.kernel.npy`` (the ``[K, K]`` kernel); names that two inputs would share get
    a content-hash suffix (``batch_plan``). Every image gets the same ``seed`` and settings,
    which are ``run()``'s (blind methods only; ``working_size`` … ``full_diffusion``: the crops
    + tiles path of larger photos, ``settings.on_crops_path``); ``sigma=None`` estimates each
    image's noise level. ``batch_images``: up to this many images of one size on the
    whole-image path share each network call (Fast EM methods; ``run_together``), the images
    batched as they come in input order; at most N images wait for their call (when N wait, the
    largest group of one size runs), and a killed job loses them. A rerun redoes an image whose
    settings or fastem version differ. An image that cannot be read or restored (not an image,
    too small, NaN, a failed run) is recorded as failed and the job goes on; errors of the
    settings or the inputs' paths raise ``ValueError`` before any work. ``progress``: a bar
    over this process's images
    (rate, time left; under ``torchrun`` rank 0's only) and a line per failure on stderr.
    Ctrl-C stops after the outputs of the finished images; nothing partial is written.
    """
    method = check_choice("method", method, BLIND)
    settings = {
        "method": method,
        "particles": check_int("particles", particles, low=1, high=MAX_PARTICLES),
        "steps": str(DEFAULT_STEPS[method] if steps is None else steps),
        "kernel_size": check_int("kernel_size", kernel_size, low=3),
        "seed": check_int("seed", seed, low=0, high=SEEDS - 1),
        "restarts": check_restarts(restarts, method),
        "batch_restarts": batch_restarts,
        "boundary": check_choice("boundary", boundary, BOUNDARIES),
        "regularizer": check_choice("regularizer", regularizer, REGULARIZERS),
        "sigma": None if sigma is None else check_sigma("sigma", sigma),
        "working_size": check_int("working_size", working_size, low=32),
        "crops": check_int("crops", crops, low=1, high=MAX_CROPS),
        "tile_steps": None if tile_steps is None else str(tile_steps),
        "fast": fast,
        "full_diffusion": full_diffusion,
        "version": fastem_version(),
    }
    images = check_int("batch_images", batch_images, low=1, high=MAX_BATCH_IMAGES)
    if images > 1:  # absent at 1, so the manifests of jobs before the option still match
        if method not in GROUPED:
            raise ValueError(f"batch_images applies to {' and '.join(GROUPED)}; {method!r} "
                             "runs each image alone")
        settings["batch_images"] = images
    runs = batched_restarts(batch_restarts, method, settings["restarts"])
    settings["max_batch"] = resolve_max_batch(max_batch, method, settings["crops"],
                                              settings["particles"], runs)
    # errors that every image would raise are errors of the job, not of each image
    Schedule(settings["steps"])
    tile_schedule_of(settings["tile_steps"], method)
    check_path_flags(fast, full_diffusion, settings["boundary"])
    if settings["boundary"] == "valid" and not full_diffusion:  # any image may take it
        check_crops_path(method, settings["kernel_size"], settings["working_size"],
                         settings["crops"], settings["particles"], settings["max_batch"], fast,
                         runs)
    ranks = ranks_from_env()
    device = resolve_device(rank_device(device, ranks))
    with ProcessGroup(ranks, device) as group:
        net_prior = load_prior(prior, device)  # every rank: its errors are the same on each
        if settings["boundary"] == "valid" and not full_diffusion:
            check_working_multiple(settings["working_size"], net_prior)
        out_dir = _prepare_out_dir(out_dir)
        plan = group.broadcast(_plan(inputs, out_dir) if ranks.rank == 0 else None)
        if isinstance(plan, str):
            raise ValueError(plan)
        items, duplicates = plan
        settings["prior"] = _prior_identity(prior, net_prior)
        job = _Job(out_dir, settings, settings_hash(settings), ranks, str(device), net_prior)
        mine = [item for item in items if item.shard(ranks.world_size) == ranks.rank]
        todo = [item for item in mine if not job.done(item)]
        job.process(todo, progress)
        counts = group.gather((len(todo), len(mine) - len(todo)))  # all ranks have finished
        if ranks.rank == 0:
            merge(out_dir)
        group.barrier()  # the merged manifest is complete for every reader
    return BatchResult(_job_records(items, read_records(out_dir)),
                       sum(done for done, _ in counts), sum(before for _, before in counts),
                       {str(k): str(v) for k, v in duplicates.items()})


def _job_records(items: list[BatchItem], records: list[dict]) -> list[dict]:
    """The latest record of each item: by content hash, or by path for an unreadable file."""
    by_content = latest_by_content(records)
    unreadable = {record["input"]: record for record in records if record["sha256"] is None}
    found = [by_content.get(item.sha256) if item.sha256 is not None
             else unreadable.get(str(item.path)) for item in items]
    return [record for record in found if record is not None]


class _Job:
    """The per-image loop of one process: run, write the outputs, append the record."""

    def __init__(self, out_dir: Path, settings: dict, key: str, ranks: Ranks, device: str,
                 net_prior: Prior) -> None:
        self.out_dir, self.settings, self.key, self.ranks = out_dir, settings, key, ranks
        self.device, self.prior = device, net_prior
        self.manifest = rank_manifest(out_dir, ranks.rank, ranks.world_size)
        self.previous = latest_by_content(read_records(out_dir))

    def done(self, item: BatchItem) -> bool:
        """Finished by an earlier run with these settings, its outputs still there and not
        empty (a power loss may leave an ok line and empty files where the system did not
        keep the renames' order)."""
        record = self.previous.get(item.sha256)
        return (record is not None and record["status"] == "ok" and record["settings"] == self.key
                and all(_non_empty_file(self.out_dir / name)
                        for name in (record["output"], record["kernel"])))

    def process(self, items: list[BatchItem], progress: bool) -> None:
        from tqdm.auto import tqdm

        desc = "batch" if self.ranks.world_size == 1 else f"rank {self.ranks.rank}"
        show = progress and self.ranks.rank == 0
        together = self.settings.get("batch_images", 1)
        waiting: dict[tuple[int, ...], list[tuple[BatchItem, LoadedImage]]] = {}
        failed = 0
        with tqdm(total=len(items), desc=desc, unit="image", disable=not show,
                  dynamic_ncols=True) as bar:
            def finish(records: list[dict]) -> None:
                nonlocal failed
                for record in records:
                    append_record(self.manifest, record)
                    bar.update(1)
                    if record["status"] != "ok":
                        failed += 1
                        if progress:
                            bar.write(f"fastem: {record['input']}: failed: {record['error']}",
                                      file=sys.stderr)
                        bar.set_postfix_str(f"{failed} failed", refresh=False)

            for item in items:
                loaded = None if item.error is not None else self._load(item)
                if (together > 1 and isinstance(loaded, LoadedImage)
                        and not self._on_crops(loaded)):
                    waiting.setdefault(tuple(loaded.image.shape[-2:]), []).append((item, loaded))
                    if sum(map(len, waiting.values())) == together:  # at most N images wait
                        largest = max(waiting, key=lambda size: len(waiting[size]))
                        finish(self._together(waiting.pop(largest)))
                else:
                    finish([self._one(item, loaded)])
            for group in waiting.values():
                finish(self._together(group))

    def _one(self, item: BatchItem, loaded: LoadedImage | Exception | None) -> dict:
        """Deblur one input (``loaded``: read, the error of reading it, or ``None`` for an
        input that failed planning) and commit its outputs; its manifest record."""
        started = time.perf_counter()
        result = loaded
        if isinstance(loaded, LoadedImage):
            try:
                result = run(loaded, self.settings["sigma"], **self._options())
            except IMAGE_ERRORS as err:
                result = err
        return self._record(item, loaded, result, time.perf_counter() - started)

    def _together(self, group: list[tuple[BatchItem, LoadedImage]]) -> list[dict]:
        """Deblur images of one size in shared network calls (``run_together``); their
        records, each ok or failed on its own. ``seconds``: the shared calls' wall time."""
        started = time.perf_counter()
        results = run_together([loaded for _, loaded in group], self.settings["sigma"],
                               **self._options())
        seconds = time.perf_counter() - started
        return [self._record(item, loaded, result, seconds)
                for (item, loaded), result in zip(group, results, strict=True)]

    def _record(self, item: BatchItem, loaded: LoadedImage | Exception | None,
                result: Result | Exception | None, seconds: float) -> dict:
        """``item``'s manifest record: ``ok`` once its outputs are committed, else failed with
        the reason (the planning's, the read's, the run's or the commit's)."""
        record = {"input": str(item.path), "sha256": item.sha256, "settings": self.key,
                  "status": "failed", "error": item.error, "rank": self.ranks.rank}
        if item.sha256 is not None:  # a failed image keeps its names reserved (batch_plan)
            record.update(output=item.output, kernel=item.kernel)
        try:
            if isinstance(result, Exception):
                raise result
            if result is not None:
                record.update(self._commit(item, loaded, result))
                record["status"] = "ok"
        except IMAGE_ERRORS as err:
            record["error"] = _reason(err)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()  # after an out-of-memory error, for the next one
        record["seconds"] = seconds
        record["finished"] = time.time()
        return record

    def _load(self, item: BatchItem) -> LoadedImage | Exception:
        """The input read and checked against the hash it was planned with (or the error)."""
        try:
            loaded = load_image(item.path, name="input")
            if file_sha256(item.path) != item.sha256:
                raise ValueError("the file changed while the job ran; run the job again")
            return loaded
        except IMAGE_ERRORS as err:
            return err

    def _on_crops(self, loaded: LoadedImage) -> bool:
        s = self.settings
        return on_crops_path(tuple(loaded.image.shape[-2:]), working_size=s["working_size"],
                             crops=s["crops"], kernel_size=s["kernel_size"],
                             boundary=s["boundary"], full_diffusion=s["full_diffusion"],
                             fast=s["fast"], blind=True)

    def _options(self) -> dict:
        """``run()``'s keyword arguments for this job's settings."""
        s = self.settings
        return dict(method=s["method"], prior=self.prior, particles=s["particles"],
                    steps=s["steps"], kernel_size=s["kernel_size"], seed=s["seed"],
                    restarts=s["restarts"], batch_restarts=s["batch_restarts"],
                    device=self.device, progress=False, boundary=s["boundary"],
                    regularizer=s["regularizer"], working_size=s["working_size"],
                    crops=s["crops"], max_batch=s["max_batch"], tile_steps=s["tile_steps"],
                    fast=s["fast"], full_diffusion=s["full_diffusion"])

    def _commit(self, item: BatchItem, loaded: LoadedImage, result: Result) -> dict:
        """Write the image and the kernel atomically; the record's fields of a success."""
        output, kernel = self.out_dir / item.output, self.out_dir / item.kernel
        commit_files({output: encode_image(output, result.image, loaded.bits, loaded.icc),
                      kernel: encode_kernel(kernel, result.kernel)})
        return {"sigma": result.info["sigma"], "sigma_estimated": result.info["sigma_estimated"],
                "output": item.output, "kernel": item.kernel}


def _reason(err: Exception) -> str:
    """A failure's manifest text: a ``ValueError``'s message, else the type and message."""
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


def _plan(inputs: list[str | os.PathLike], out_dir: Path) -> tuple | str:
    """The job's items and duplicates, or the message of the inputs' error (sent to every rank,
    each raises it)."""
    try:
        paths = expand_inputs(inputs, out_dir)
        return plan_items(paths, read_records(out_dir))
    except ValueError as err:
        return str(err)


def fastem_version() -> str:
    """The installed fastem's version, part of the settings hash (so a new version redoes the
    outputs); ``UNKNOWN_VERSION`` where the package metadata is missing (a bare checkout)."""
    try:
        return importlib.metadata.version("fastem")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def _non_empty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir``, created if missing (its parent must exist), checked to be a writable folder."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir: {path} exists and is not a folder")
    if not path.exists():
        if not path.parent.is_dir():
            raise ValueError(f"out_dir: the folder above it does not exist: {path.parent}")
        path.mkdir(exist_ok=True)  # several ranks may create it at once
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir: folder is not writable: {path}")
    return path


def _prior_identity(spec: object, net_prior: Prior) -> str:
    """What names the prior in the settings hash: a name, or a weights file by its bytes (a
    module or a callable by its name only)."""
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        return f"{Path(spec).name}:{file_sha256(Path(spec))}"
    return os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else net_prior.name
