"""Restarts one after another vs as one batch (``run(..., batch_restarts=True)``, kernel groups):
the wall time of a default blind run, one device, interleaved repeats.

GPU (the bundled prior at 256×256, 100 steps, three restarts; a stage of run_gpu.sh, not yet
run on a GPU):

    python benchmarks/bench_restarts.py --device cuda --out $OUT/bench_restarts.json

CPU smoke: ``--device cpu --size 64 --steps 5``. Each mode runs once untimed first (CUDA
initialisation, the first capture), then ``--repeats`` times, alternating. Prints each mode's
best sampling time, the ratio, and the restart each kept (the same restart and nearly the same
result are expected: a larger batch may round differently); the JSON holds every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastem_ext.api import run
from fastem_ext.demo import sample_image
from fastem_ext.hardware import describe_device
from fastem_ext.metrics import psnr
from fastem_ext.motion import motion_kernel
from fastem_ext.physics import blur

MODES = {"one after another": False, "batched": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sharp = sample_image(args.size)
    kernel = motion_kernel(33 if args.size >= 128 else 9, seed=7)
    blurry = (blur(sharp, kernel) + 5 / 255 * torch.randn(
        sharp.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    settings = dict(steps=str(args.steps), restarts=args.restarts, device=args.device,
                    kernel_size=kernel.shape[-1], progress=False, seed=0)
    runs = []
    for repeat in range(args.repeats + 1):  # repeat 0: untimed warm-up
        for mode, batched in MODES.items():
            result = run(blurry, 5 / 255, batch_restarts=batched, **settings)
            if repeat:
                runs.append({"mode": mode, "seconds": result.info["seconds_sampling"],
                             "kept": result.info["restarts"]["kept"],
                             "psnr": float(psnr(result.image, sharp)),
                             "engine": result.info["engine"]})
    best = {mode: min(r["seconds"] for r in runs if r["mode"] == mode) for mode in MODES}
    device = describe_device(args.device)
    print(f"{device}: {args.size}x{args.size}, {args.steps} steps, {args.restarts} restarts, "
          f"engine {runs[0]['engine']}")
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        print(f"  {mode:18s} {best[mode]:8.2f} s (best of {len(mine)}), kept "
              f"{sorted({r['kept'] for r in mine})}, PSNR {mine[0]['psnr']:.2f} dB")
    ratio = best["one after another"] / best["batched"]
    print(f"  batched is {ratio:.2f}x as fast")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"device": device, "settings": {k: str(v) for k, v in settings.items()},
             "size": args.size, "runs": runs, "speedup": ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
