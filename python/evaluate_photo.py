"""Large photos (issue 16): the crops + tiles path against the whole-image run on one Kodak
photo, and the fast mode; or the fast mode, a few tiles, or the whole default run (crops +
tiles) on a 12-megapixel photo made by up-scaling a training image.

The photo is blurred as in ``evaluate.py``: an EVAL-seed kernel (``--kernel-seed``, default the
first), valid convolution of the photo extended by reflection (so the blurry image keeps the
photo's size and the sharp reference is the photo itself), Gaussian noise σ. Writes one JSON per
measurement to ``--out`` (wall times, PSNR, kernel MSE, peak RSS, load average, threads).

    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage kodak
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage kodak-known
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage fast12mp
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage tiles12mp
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage full12mp
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage midsize --split tune \
        --size 256x384 --images 4 --out python/results/photo-midsize-tune
    OMP_NUM_THREADS=1 nice python python/evaluate_photo.py --stage tile-layout --split tune \
        --size 288x448 --images 4 --out python/results/tile-layout-tune

``midsize``: photos just above the working size, where ``run()``'s path is a choice: per image,
the default run (crops + tiles) and ``full_diffusion=True`` (whole image), same blur and seed.
``--split tune`` takes ``natural/train`` images (TUNE-seed kernels), ``val`` Kodak (EVAL seeds).
``tile-layout``: the same photos restored by the tiles alone with the true kernel (25 ΠGDM steps,
one seed, max_batch 8), in ``run()``'s tiles of the working size and as one tile, the whole frame
(the fewest grid pixels: no overlaps, one grid border), alternately in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from prior_common import train_files, val_files

from fastem_ext import metrics, motion_kernel, run
from fastem_ext.io import read_image
from fastem_ext.motion import EVAL_SEEDS, TUNE_SEEDS
from fastem_ext.photo import restore_tiles, tile_plan
from fastem_ext.physics import blur
from fastem_ext.priors import load_prior
from fastem_ext.schedule import Schedule
from fastem_ext.tiles import TilePlan

DATA = Path(os.environ.get("FASTEM_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def blurred(sharp: torch.Tensor, kernel: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    margin = kernel.shape[-1] // 2
    scene = F.pad(sharp[None], (margin,) * 4, mode="reflect")[0]
    noise = torch.randn(sharp.shape, generator=torch.Generator().manual_seed(seed))
    return blur(scene, kernel, "valid") + sigma * noise


def conditions() -> dict:
    return {"loadavg": os.getloadavg(), "threads": torch.get_num_threads(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def record(out: Path, name: str, entry: dict) -> None:
    entry = {**entry, **conditions()}
    (out / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    print(name, json.dumps(entry), flush=True)


def shifted_psnr(image: torch.Tensor, sharp: torch.Tensor, reach: int = 8) -> float:
    """The best PSNR over integer shifts ``|dy|, |dx| ≤ reach`` of ``image`` against ``sharp``,
    on the frame less ``reach`` pixels: blind deconvolution cannot tell a shifted kernel and an
    oppositely shifted image apart (``metrics.kernel_mse`` forgives the kernel the same way)."""
    height, width = sharp.shape[-2:]
    core = sharp[:, reach : height - reach, reach : width - reach]
    return max(float(metrics.psnr(image[:, reach + dy : height - reach + dy,
                                        reach + dx : width - reach + dx], core))
               for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1))


def border_and_interior_mse(image: torch.Tensor, sharp: torch.Tensor,
                            band: int = 16) -> tuple[float, float]:
    """Mean squared error on the frame's ``band``-pixel border and on the rest: where a
    restoration's errors sit (the valid boundary's edges or the interior)."""
    error = (image - sharp).square().mean(dim=0)
    border = torch.ones_like(error, dtype=torch.bool)
    border[band:-band, band:-band] = False
    return float(error[border].mean()), float(error[~border].mean())


def blurry_scores(y: torch.Tensor, sharp: torch.Tensor) -> dict:
    """The blurry input's PSNR and border/interior MSE: the baseline of ``scores``."""
    border, interior = border_and_interior_mse(y.clamp(0, 1), sharp)
    return {"psnr": float(metrics.psnr(y.clamp(0, 1), sharp)), "mse_border16": border,
            "mse_interior": interior}


def scores(result, sharp, kernel, seconds: float) -> dict:
    border, interior = border_and_interior_mse(result.image, sharp)
    return {"psnr": float(metrics.psnr(result.image, sharp)),
            "psnr_best_shift": shifted_psnr(result.image, sharp),
            "mse_border16": border, "mse_interior": interior,
            "kernel_mse": float(metrics.kernel_mse(result.kernel, kernel)),
            "seconds": seconds, "path": result.info["path"],
            "stages": result.info.get("stages"), "kernel": result.kernel.tolist()}


def kodak(args, out: Path) -> None:
    sharp = read_image(DATA / "natural/val/kodak_01.png")[0]
    kernel = motion_kernel(33, seed=EVAL_SEEDS.start + args.kernel_seed)
    sigma = 10 / 255
    y = blurred(sharp, kernel, sigma, 1)
    record(out, "kodak_blurry", {**blurry_scores(y, sharp), "size": list(sharp.shape)})
    clock = time.perf_counter()
    tiled = run(y, sigma, progress=False)
    record(out, "kodak_crops_tiles", scores(tiled, sharp, kernel, time.perf_counter() - clock))
    found = tiled.kernel
    for steps in ("10", "50"):
        clock = time.perf_counter()
        res = run(y, sigma, method="pigdm", kernel=found, tile_steps=steps, progress=False)
        record(out, f"kodak_tiles{steps}_crop_kernel",
               scores(res, sharp, kernel, time.perf_counter() - clock))
        if steps == "10":
            clock = time.perf_counter()
            res = run(y, sigma, method="pigdm", kernel=found, fast=True, progress=False)
            record(out, "kodak_fast_crop_kernel",
                   scores(res, sharp, kernel, time.perf_counter() - clock))
            clock = time.perf_counter()
            whole = run(y, sigma, full_diffusion=True, progress=False)
            record(out, "kodak_whole", scores(whole, sharp, kernel, time.perf_counter() - clock))


def kodak_known(args, out: Path) -> None:
    """The tiles alone, with the true kernel (no blind stage): non-blind ΠGDM over the whole
    image (100 steps) against the default tiles (25 steps), same photo, kernel and noise."""
    sharp = read_image(DATA / "natural/val/kodak_01.png")[0]
    kernel = motion_kernel(33, seed=EVAL_SEEDS.start + args.kernel_seed)
    sigma = 10 / 255
    y = blurred(sharp, kernel, sigma, 1)
    record(out, "kodak_known_blurry", blurry_scores(y, sharp))
    for name, options in (("tiles", {}), ("whole", {"full_diffusion": True})):
        clock = time.perf_counter()
        res = run(y, sigma, method="pigdm", kernel=kernel, progress=False, **options)
        record(out, f"kodak_known_{name}", scores(res, sharp, kernel, time.perf_counter() - clock))


def twelve_mp(kernel_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4032×3024 photo: ``kodak``-style blur of a training image up-scaled bicubically."""
    image = read_image(DATA / "natural/train/mcmaster_01.png")[0]
    sharp = F.interpolate(image[None], size=(3024, 4032), mode="bicubic",
                          align_corners=False)[0].clamp(0, 1)
    kernel = motion_kernel(33, seed=EVAL_SEEDS.start + kernel_seed)
    return sharp, kernel, blurred(sharp, kernel, 10 / 255, 2)


def fast12mp(args, out: Path) -> None:
    sharp, kernel, y = twelve_mp(args.kernel_seed)
    clock = time.perf_counter()
    res = run(y, 10 / 255, fast=True, progress=False)
    entry = scores(res, sharp, kernel, time.perf_counter() - clock)
    entry["blurry_psnr"] = float(metrics.psnr(y.clamp(0, 1), sharp))
    record(out, "12mp_fast", entry)


def full12mp(args, out: Path) -> None:
    """The default path (crops, then diffusion tiles) on the whole 12 MP frame, with progress."""
    sharp, kernel, y = twelve_mp(args.kernel_seed)
    clock = time.perf_counter()
    res = run(y, 10 / 255, progress=True)
    entry = scores(res, sharp, kernel, time.perf_counter() - clock)
    entry["blurry_psnr"] = float(metrics.psnr(y.clamp(0, 1), sharp))
    record(out, "12mp_default", entry)


def tiles12mp(args, out: Path) -> None:
    """``restore_tiles`` on a 4×? block of tiles of the 12 MP photo at the default 25 steps,
    max_batch 8, with the true kernel: time per tile and peak memory (extrapolated by the
    caller to the whole frame, whose tile count is printed)."""
    sharp, kernel, y = twelve_mp(args.kernel_seed)
    full = tile_plan(3024, 4032, 256, 33)
    region = y[:, :420, :1100]  # 2 rows × 6 columns of tiles
    plan = tile_plan(*region.shape[-2:], 256, 33)
    prior = load_prior("natural", "cpu")
    clock = time.perf_counter()
    restore_tiles(region, prior.model, "pigdm", kernel, Schedule("25"), plan,
                  multiple=prior.size_multiple, sigma=10 / 255, particles=1, max_batch=8,
                  generator=torch.Generator().manual_seed(0), scale=1.0,
                  before_batch=lambda obs: None, callback=lambda i, x0, k: None)
    seconds = time.perf_counter() - clock
    record(out, "12mp_tiles_sample", {
        "tiles_run": len(plan), "window": [plan.window_h, plan.window_w], "seconds": seconds,
        "seconds_per_tile": seconds / len(plan), "tiles_full_frame": len(full),
        "extrapolated_full_frame_tile_seconds": seconds / len(plan) * len(full)})


def tile_layout(args, out: Path) -> None:
    size = tuple(int(side) for side in args.size.split("x"))
    prior = load_prior("natural", "cpu")
    layouts = {"working_size": tile_plan(*size, 256, 33),
               "whole_frame": TilePlan.plan(*size, max(size), context=16, ramp=16)}  # one tile
    for name, sharp, kernel, y in midsize_cases(args.split, size, args.images):
        record(out, f"{name}_blurry", blurry_scores(y, sharp))
        for layout, plan in layouts.items():
            clock = time.perf_counter()
            image = restore_tiles(y, prior.model, "pigdm", kernel, Schedule("25"), plan,
                                  multiple=prior.size_multiple, sigma=10 / 255, particles=1,
                                  max_batch=8, generator=torch.Generator().manual_seed(0),
                                  scale=1.0, before_batch=lambda obs: None,
                                  callback=lambda i, x0, k: None)[0]
            border, interior = border_and_interior_mse(image, sharp)
            record(out, f"{name}_{layout}", {
                "psnr": float(metrics.psnr(image, sharp)), "mse_border16": border,
                "mse_interior": interior, "tiles": len(plan),
                "window": [plan.window_h, plan.window_w],
                "seconds": time.perf_counter() - clock})


def midsize_cases(split: str, size: tuple[int, int], images: int):
    """``images`` photos of ``split`` large enough for a ``size`` window plus the blur's margin,
    evenly spaced in name order (turned to landscape when ``size`` is); yields ``(name, sharp,
    kernel, blurry)``: the centre window blurred like ``evaluate.py``'s valid cases, σ 10/255."""
    height, width = size
    files = train_files() if split == "tune" else val_files()
    seeds = TUNE_SEEDS if split == "tune" else EVAL_SEEDS
    fitting = []
    for path in files:
        image = read_image(path)[0]
        if (image.shape[-2] > image.shape[-1]) != (height > width):
            image = image.transpose(-2, -1)
        if image.shape[-2] >= height + 32 and image.shape[-1] >= width + 32:
            fitting.append((path, image))
    if len(fitting) < images:
        raise SystemExit(f"only {len(fitting)} {split} images fit a {height}x{width} window")
    chosen = fitting[:: len(fitting) // images][:images]
    for index, (path, image) in enumerate(chosen):
        kernel = motion_kernel(33, seed=seeds.start + index)
        top, left = (image.shape[-2] - height - 32) // 2, (image.shape[-1] - width - 32) // 2
        scene = image[:, top : top + height + 32, left : left + width + 32]
        noise = torch.randn((3, height, width),
                            generator=torch.Generator().manual_seed(10_000 * index + 10))
        yield (path.stem, scene[:, 16:-16, 16:-16], kernel,
               blur(scene, kernel, "valid") + 10 / 255 * noise)


def midsize(args, out: Path) -> None:
    size = tuple(int(side) for side in args.size.split("x"))
    for name, sharp, kernel, y in midsize_cases(args.split, size, args.images):
        record(out, f"{name}_blurry", blurry_scores(y, sharp))
        for path, options in (("crops", {}), ("whole", {"full_diffusion": True})):
            clock = time.perf_counter()
            res = run(y, 10 / 255, kernel_size=33, seed=0, progress=False, **options)
            record(out, f"{name}_{path}",
                   scores(res, sharp, kernel, time.perf_counter() - clock))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True,
                        choices=("kodak", "kodak-known", "fast12mp", "tiles12mp", "full12mp",
                                 "midsize", "tile-layout"))
    parser.add_argument("--kernel-seed", type=int, default=0)
    parser.add_argument("--split", choices=("tune", "val"), default="tune",
                        help="midsize, tile-layout")
    parser.add_argument("--size", default="256x384", help="midsize, tile-layout: HxW")
    parser.add_argument("--images", type=int, default=4, help="midsize, tile-layout")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/photo")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"kodak": kodak, "kodak-known": kodak_known, "fast12mp": fast12mp,
              "tiles12mp": tiles12mp, "full12mp": full12mp, "midsize": midsize,
              "tile-layout": tile_layout}
    stages[args.stage](args, args.out)


if __name__ == "__main__":
    main()
