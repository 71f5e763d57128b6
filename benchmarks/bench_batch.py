"""Throughput of many photos: a shell loop of ``fastem deblur`` vs ``fastem batch`` (one process)
vs ``fastem batch`` under ``torchrun --nproc-per-node P``, in one run, on the CPU.

    python benchmarks/bench_batch.py --images 16 --steps 20 --out bench_batch.json

The inputs are ``natural/val`` (Kodak) 256×256 windows blurred by EVAL-seed 33×33 camera-shake
kernels (valid convolution) with σ = 5/255 noise, saved as 8-bit PNGs in a temporary folder.
Every process runs one torch thread (``OMP_NUM_THREADS=1``), the bundled natural prior, σ
estimated per image. The variants run in ``--order`` (default loop, batch, torchrun, torchrun,
batch, loop: a linear drift of the machine's load cancels in each variant's mean); each run
writes to a fresh folder, and the batch outputs are compared byte for byte with the loop's.
Writes JSON: per run the wall time, images per minute and the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastem_ext.hardware import describe_device
from fastem_ext.io import center_crop, read_image, write_image
from fastem_ext.motion import EVAL_SEEDS, motion_kernel
from fastem_ext.physics import blur

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTEM_DATA", REPO.parent / "shared" / "data"))


def make_inputs(folder: Path, count: int, size: int = 256, kernel_size: int = 33) -> list[Path]:
    """``count`` blurry, noisy 8-bit PNGs of ``size``² from ``natural/val``."""
    files = sorted((DATA / "natural" / "val").glob("*.png"))[:count]
    if len(files) < count:
        raise SystemExit(f"--images: natural/val holds only {len(files)} images")
    paths = []
    for index, file in enumerate(files):
        scene = center_crop(read_image(file)[0], size + kernel_size - 1)
        kernel = motion_kernel(kernel_size, seed=EVAL_SEEDS.start + index)
        noise = torch.randn((3, size, size), generator=torch.Generator().manual_seed(index))
        blurry = (blur(scene, kernel, boundary="valid") + 5 / 255 * noise).clamp(0, 1)
        paths.append(folder / f"{file.stem}.png")
        write_image(paths[-1], blurry)
    return paths


def commands(variant: str, inputs: list[Path], out: Path, options: list[str],
             processes: int) -> list[list[str]]:
    """The command lines of one run of ``variant``, run one after the other."""
    launch = [sys.executable, "-m", "fastem_ext.launch"]
    if variant == "loop":
        return [[*launch, "deblur", str(path), "-o", str(out / path.name), *options]
                for path in inputs]
    job = ["batch", str(inputs[0].parent), "-o", str(out), *options]
    if variant == "batch":
        return [[*launch, *job]]
    return [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             str(processes), "-m", "fastem_ext.launch", *job]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", default="100")
    parser.add_argument("--processes", type=int, default=2, help="torchrun --nproc-per-node")
    parser.add_argument("--order", default="loop,batch,torchrun,torchrun,batch,loop")
    parser.add_argument("--out", type=Path, default=Path("bench_batch.json"))
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    options = ["--steps", args.steps, "--quiet", "--device", "cpu"]
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        inputs = make_inputs(folder, args.images)
        for index, variant in enumerate(args.order.split(",")):
            out = Path(tmp) / f"out{index}-{variant}"
            out.mkdir()
            load_before = os.getloadavg()
            start = time.perf_counter()
            for command in commands(variant, inputs, out, options, args.processes):
                subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            runs.append({"variant": variant, "seconds": seconds,
                         "images_per_minute": 60 * args.images / seconds,
                         "load_before": load_before, "load_after": os.getloadavg(),
                         "out": out.name})
            print(f"{variant:9s} {seconds:7.1f} s  {runs[-1]['images_per_minute']:6.2f} images/min"
                  f"  load {load_before[0]:.2f} -> {runs[-1]['load_after'][0]:.2f}", flush=True)
        loop = next(Path(tmp) / r["out"] for r in runs if r["variant"] == "loop")
        identical = all((Path(tmp) / r["out"] / p.name).read_bytes() == (loop / p.name).read_bytes()
                        for r in runs for p in inputs)
    means = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rates = [r["images_per_minute"] for r in runs if r["variant"] == variant]
        means[variant] = sum(rates) / len(rates)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": describe_device("cpu"), "images": args.images, "size": 256,
              "steps": args.steps, "threads_per_process": 1, "processes": args.processes,
              "command": " ".join(sys.argv), "runs": runs, "mean_images_per_minute": means,
              "outputs_identical_to_loop": identical}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(means), "identical outputs:", identical)


if __name__ == "__main__":
    main()
