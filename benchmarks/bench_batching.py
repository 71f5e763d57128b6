"""What to batch into one network call: a default blind run's restarts (``run(...,
batch_restarts=True)``), several photos of one size (``run_together``), or both (kernel groups,
``step``), against one photo at a time with its restarts one after another; one device,
interleaved repeats.

GPU (the bundled prior at 256×256, 100 steps, three restarts, four photos; a stage of
run_gpu.sh):

    python benchmarks/bench_batching.py --device cuda --out $OUT/bench_batching.json

CPU smoke: ``--device cpu --size 64 --steps 5``. On CUDA every mode runs once untimed first
(initialisation, the first capture of each batch size), then ``--repeats`` times, the modes
alternating. Prints each mode's best wall time per photo, images per minute and the speed-up
over one at a time, and the PSNR of each mode's first photo (nearly the same in every mode: a
larger batch may round differently); the JSON holds every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastem_ext.api import run, run_together
from fastem_ext.demo import sample_image
from fastem_ext.hardware import describe_device
from fastem_ext.metrics import psnr
from fastem_ext.motion import motion_kernel
from fastem_ext.physics import blur

MODES = {  # (photos share calls, restarts share calls)
    "one at a time": (False, False),
    "restarts batched": (False, True),
    "photos together": (True, False),
    "photos and restarts": (True, True),
}


def photos(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (sharp, blurry) pairs: the sample image in its eight flips and rotations, each
    blurred by its own kernel, σ = 5/255."""
    sharp = sample_image(size)
    pairs = []
    for index in range(count):
        turned = sharp.rot90(index % 4, dims=(-2, -1))
        turned = turned.flip(-1) if index % 8 >= 4 else turned
        kernel = motion_kernel(33 if size >= 128 else 9, seed=7 + index)
        blurry = blur(turned, kernel) + 5 / 255 * torch.randn(
            turned.shape, generator=torch.Generator().manual_seed(index))
        pairs.append((turned, blurry.clamp(0, 1)))
    return pairs


def timed(mode: str, pairs, settings: dict, device: str) -> dict:
    together, batched = MODES[mode]
    blurries = [blurry for _, blurry in pairs]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    clock = time.perf_counter()
    if together:
        results = run_together(blurries, 5 / 255, batch_restarts=batched, **settings)
    else:
        results = [run(blurry, 5 / 255, batch_restarts=batched, **settings)
                   for blurry in blurries]
    seconds = time.perf_counter() - clock
    for result in results:
        if isinstance(result, Exception):  # run_together's in place of a photo's result
            raise result
    return {"mode": mode, "seconds": seconds, "seconds_per_photo": seconds / len(pairs),
            "psnr": [float(psnr(result.image, sharp))
                     for result, (sharp, _) in zip(results, pairs, strict=True)],
            "kept": [r.info["restarts"]["kept"] for r in results],
            "images_together": [r.info["images_together"] for r in results],
            "engine": results[0].info["engine"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pairs = photos(args.photos, args.size)
    settings = dict(steps=str(args.steps), restarts=args.restarts, device=args.device,
                    kernel_size=33 if args.size >= 128 else 9, progress=False, seed=0)
    warm = args.device.startswith("cuda")
    runs = []
    for repeat in range(args.repeats + warm):
        for mode in args.modes:
            result = timed(mode, pairs, settings, args.device)
            if repeat >= warm:
                runs.append(result)
    best = {mode: min(r["seconds_per_photo"] for r in runs if r["mode"] == mode)
            for mode in args.modes}
    device = describe_device(args.device)
    print(f"{device}: {args.photos} photos of {args.size}x{args.size}, {args.steps} steps, "
          f"{args.restarts} restarts, engine {runs[0]['engine']}")
    base = best.get("one at a time")
    for mode in args.modes:
        first = next(r for r in runs if r["mode"] == mode)
        ratio = f", {base / best[mode]:.2f}x one at a time" if base else ""
        print(f"  {mode:20s} {best[mode]:8.2f} s/photo, {60 / best[mode]:6.2f} images/min"
              f"{ratio}; PSNR of photo 1 {first['psnr'][0]:.2f} dB, kept {first['kept']}, "
              f"photos per call {first['images_together']}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"device": device, "settings": {k: str(v) for k, v in settings.items()},
             "size": args.size, "photos": args.photos, "runs": runs,
             "seconds_per_photo": best}, indent=1) + "\n")


if __name__ == "__main__":
    main()
