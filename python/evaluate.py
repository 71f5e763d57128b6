"""The paper's evaluation protocol: a seeded synthetic test set, several methods, one table.

    python python/evaluate.py --out results/eval                      # everything (GPU: > 1 h)
    python python/evaluate.py --images 24 --sigmas 10 --methods fastem-pigdm oracle \\
        --out results/eval-val                                          # the README's figures
    python python/evaluate.py --split tune --images 8 --sigmas 10 --methods fastem-pigdm \\
        --variants default ridge=1 gradient=0 --out results/ablation   # an ablation

Test set: 256×256 crops, each blurred by its own camera-shake kernel (``--kernel-size``, default
33), plus white noise for every σ in ``--sigmas`` (/255). ``--split eval``: ``natural/val`` with
EVAL-seed kernels (reported figures); ``--split tune``: ``natural/train`` with TUNE-seed kernels
(choosing settings). ``--boundary valid`` (default, as ``run()``): the blurry image is the valid
convolution of a larger window of the photo, restored with ``boundary="valid"``; ``circular``:
circular blur and model. Methods: ``fastem-pigdm`` with n = 1, 4, 16 (``fastem-pigdm-4`` …),
``fastem2-pigdm`` (two Fast EM runs, the second started from the first's kernel),
``fastem-dps``, ``diffem-pigdm``, ``oracle`` (non-blind ΠGDM with the true kernel) and ``none``
(the blurry image and a Dirac kernel). ``--variants``: M-step settings for the blind methods,
each ``default`` or ``key=value,...`` over ``HQSConfig``'s fields (``ridge``, ``gradient``,
``lam``, ``beta``, ``iters``). Metrics: PSNR, its gain over the blurry input, SSIM
of the first particle, PSNR-SA of the particle mean, kernel MSE after the best shift, seconds per
image. Writes ``results.csv``, ``summary.json``, ``table.md`` (Table 1 style), ``runtime_psnr.png``
(Figure 1 style), ``grid_*.png`` for the first cases and, with ``--trace``, per case and blind
method ``trace_*.png`` (x̂0 above the kernel every 10 steps, the true kernel last) and
``trace_*.json`` (the kernel MSE at every step; the strip is the kept restart's, the JSON holds
every restart's errors, a list per restart, and which was kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from prior_common import train_files, val_files
from tqdm import tqdm

from fastem_ext.api import run
from fastem_ext.hardware import describe_device
from fastem_ext.io import center_crop, kernel_tile, read_image, write_image
from fastem_ext.metrics import kernel_mse, psnr, ssim
from fastem_ext.motion import EVAL_SEEDS, TUNE_SEEDS, motion_kernel
from fastem_ext.mstep import HQSConfig
from fastem_ext.physics import blur, dirac_kernel

METHODS = ("fastem-pigdm", "fastem-pigdm-4", "fastem-pigdm-16", "fastem2-pigdm", "fastem-dps",
           "diffem-pigdm", "oracle", "none")
BLIND = ("fastem-pigdm", "fastem-pigdm-4", "fastem-pigdm-16", "fastem2-pigdm", "fastem-dps",
         "diffem-pigdm")
TRACE_EVERY = 10


def case_files(split: str, images: int) -> list[Path]:
    """``eval``: the first ``images`` of ``natural/val``; ``tune``: ``images`` of
    ``natural/train`` evenly spaced in name order (tuning never sees the validation set)."""
    if split == "eval":
        return val_files()[:images]
    files = train_files()
    step = max(1, len(files) // images)
    return files[::step][:images]


def test_set(images: int, sigmas: list[int], kernel_size: int, size: int = 256,
             split: str = "eval", boundary: str = "valid"):
    """Yields ``(case_id, sharp, kernel, sigma, blurry)``; deterministic.

    Kernels: EVAL seeds for ``eval``, TUNE seeds for ``tune``. ``valid``: the blurry image is the
    valid convolution of the ``size + K − 1`` centre window (a photo is a window onto a larger
    scene) and the reference is its central ``size × size``; ``circular``: the centre crop
    blurred circularly.
    """
    seeds = EVAL_SEEDS if split == "eval" else TUNE_SEEDS
    for index, path in enumerate(case_files(split, images)):
        image = read_image(path)[0]
        kernel = motion_kernel(kernel_size, seed=seeds.start + index)
        if boundary == "valid":
            scene = center_crop(image, size + kernel_size - 1)
            sharp, clean = center_crop(scene, size), blur(scene, kernel, boundary="valid")
        else:
            sharp = center_crop(image, size)
            clean = blur(sharp, kernel)
        for noise in sigmas:
            g = torch.Generator().manual_seed(10_000 * index + noise)
            blurry = clean + noise / 255 * torch.randn(sharp.shape, generator=g)
            yield f"{path.stem}_s{noise}", sharp, kernel, noise / 255, blurry


def parse_variant(text: str) -> dict:
    """``default`` → {}; ``ridge=1,iters=20`` → {"ridge": 1.0, "iters": 20} (typed by the
    ``HQSConfig`` field's default)."""
    if text == "default":
        return {}
    known = {f.name: f for f in fields(HQSConfig)}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in known or key in ("regularizer", "denoiser"):
            raise SystemExit(f"--variants: unknown M-step setting {key!r} in {text!r}")
        default = known[key].default
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


class Trace:
    """Step callback of ``run()``: the kernel MSE at every step, x̂0 and the kernel every
    ``TRACE_EVERY`` steps, per restart (a step index that goes up again starts the next)."""

    def __init__(self, truth: torch.Tensor) -> None:
        self.truth, self.errors, self.frames = truth, [], []

    def __call__(self, i: int, x0: torch.Tensor, kernel: torch.Tensor | None) -> None:
        if kernel is None:
            return
        if not self.errors or i > self.errors[-1][-1][0]:
            self.errors.append([])
            self.frames.append([])
        kernel = kernel.float().cpu()
        self.errors[-1].append([i, float(kernel_mse(kernel, self.truth))])
        if i % TRACE_EVERY == 0:
            self.frames[-1].append((i, x0[0].float().cpu().clamp(0, 1), kernel))

    def write(self, stem: Path, kept: int) -> None:
        """The kept restart's strip; every restart's kernel errors."""
        tile = 128
        columns = []
        for _, image, kernel in self.frames[kept]:
            small = F.interpolate(image[None], size=(tile, tile), mode="area")[0]
            columns.append(torch.cat([small, kernel_tile(kernel, tile)], dim=-2))
        truth = torch.cat([torch.ones(3, tile, tile), kernel_tile(self.truth, tile)], dim=-2)
        write_image(stem.with_suffix(".png"), torch.cat([*columns, truth], dim=-1))
        stem.with_suffix(".json").write_text(json.dumps(
            {"steps": [i for i, *_ in self.frames[kept]], "kept": kept,
             "kernel_mse": self.errors}) + "\n")


def restore(method: str, variant: dict, blurry, sigma: float, kernel, args,
            callback=None) -> tuple[torch.Tensor, ...]:
    """``(image, mean, kernel, seconds, kept)`` of one method on one case (``kept``: the kept
    restart of the traced run, 0 for the others)."""
    if method == "none":
        return blurry, blurry, dirac_kernel(kernel.shape[-1]), 0.0, 0
    base, _, count = method.partition("-pigdm-")
    particles = int(count) if count else 1
    name = "fastem-pigdm" if base == "fastem" else method
    common = dict(prior=args.prior, particles=particles, seed=args.seed, device=args.device,
                  progress=False, boundary=args.boundary, kernel_size=kernel.shape[-1],
                  steps=args.steps)
    if method == "oracle":
        result = run(blurry, sigma, method="pigdm", kernel=kernel, **common)
        return result.image, result.mean, result.kernel, result.info["seconds_total"], 0
    common["restarts"] = args.restarts  # blind methods from here on
    if method == "fastem2-pigdm":  # a second blind run started from the first one's kernel
        mstep = replace(HQSConfig(), **variant) if variant else None
        first = run(blurry, sigma, method="fastem-pigdm", mstep=mstep, **common)
        result = run(blurry, sigma, method="fastem-pigdm", mstep=mstep, kernel=first.kernel,
                     callback=callback, **common)
        return (result.image, result.mean, result.kernel,
                first.info["seconds_total"] + result.info["seconds_total"],
                result.info["restarts"]["kept"])
    mstep = replace(HQSConfig(), **variant) if variant else None
    result = run(blurry, sigma, method=name, mstep=mstep, callback=callback, **common)
    return (result.image, result.mean, result.kernel, result.info["seconds_total"],
            result.info["restarts"]["kept"])


def runs_of(args) -> list[tuple[str, str, dict]]:
    """``(label, method, variant)`` for every method (blind ones × every variant)."""
    out = []
    for method in args.methods:
        for text in (args.variants if method in BLIND else ["default"]):
            label = method if text == "default" else f"{method}[{text}]"
            out.append((label, method, parse_variant(text)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/eval")
    parser.add_argument("--prior", default="natural")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variants", nargs="+", default=["default"],
                        help="M-step settings of the blind methods: default or key=value,...")
    parser.add_argument("--split", choices=("eval", "tune"), default="eval")
    parser.add_argument("--boundary", choices=("valid", "circular"), default="valid")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sigmas", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--kernel-size", type=int, default=33)
    parser.add_argument("--steps", default=None, help="override every method's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restarts", type=int, default=None,
                        help="blind runs per case, the least total variation kept (default: "
                        "run()'s, 3)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--grids", type=int, default=3, help="image grids for the first cases")
    parser.add_argument("--trace", action="store_true",
                        help="write x̂0/kernel strips and per-step kernel errors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(test_set(args.images, args.sigmas, args.kernel_size, split=args.split,
                          boundary=args.boundary))
    plan = runs_of(args)
    rows = []
    bar = tqdm(total=len(cases) * len(plan), desc="evaluate", unit="run")
    for number, (case, sharp, kernel, sigma, blurry) in enumerate(cases):
        grid = [blurry]
        blurry_psnr = float(psnr(blurry.clamp(0, 1), sharp))
        for label, method, variant in plan:
            trace = Trace(kernel) if args.trace and method in BLIND else None
            image, mean, estimate, seconds, kept = restore(method, variant, blurry, sigma,
                                                           kernel, args, trace)
            if trace is not None:
                trace.write(out / f"trace_{case}_{label}", kept)
            rows.append({
                "case": case, "sigma": round(sigma * 255), "method": label,
                "psnr": float(psnr(image.clamp(0, 1), sharp)),
                "gain": float(psnr(image.clamp(0, 1), sharp)) - blurry_psnr,
                "ssim": float(ssim(image.clamp(0, 1), sharp)),
                "psnr_sa": float(psnr(mean.clamp(0, 1), sharp)),
                "kernel_mse": float(kernel_mse(estimate, kernel)),
                "seconds": seconds,
            })
            grid.append(image)
            bar.update(1)
            bar.set_postfix_str(f"{case} {label} {rows[-1]['psnr']:.2f} dB")
        if number < args.grids:
            write_image(out / f"grid_{case}.png", torch.cat([*grid, sharp], dim=-1).clamp(0, 1))
    bar.close()
    summary = _summarise(rows, plan, args)
    _write(out, rows, summary)
    print((out / "table.md").read_text())


def _summarise(rows: list[dict], plan: list, args) -> dict:
    methods: dict[str, dict[str, float]] = {}
    for label, *_ in plan:
        mine = [r for r in rows if r["method"] == label]
        methods[label] = {key: sum(r[key] for r in mine) / len(mine)
                          for key in ("psnr", "gain", "ssim", "psnr_sa", "kernel_mse", "seconds")}
        methods[label]["worst_gain"] = min(r["gain"] for r in mine)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {"device": describe_device(device), "date": time.strftime("%Y-%m-%d"),
            "prior": args.prior, "split": args.split, "boundary": args.boundary,
            "images": args.images, "sigmas": args.sigmas, "kernel_size": args.kernel_size,
            "steps": args.steps, "methods": methods}


def _write(out: Path, rows: list[dict], summary: dict) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"{summary['split']} split, {summary['images']} images × σ {summary['sigmas']}/255, "
             f"kernels {summary['kernel_size']}×{summary['kernel_size']}, {summary['boundary']} "
             f"boundary, prior {summary['prior']}, {summary['device']}, {summary['date']}", "",
             "| method | PSNR | gain over blurry | worst gain | SSIM | PSNR-SA | kernel MSE "
             "| s/image |",
             "|---|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {method} | {m['psnr']:.2f} | {m['gain']:+.2f} | {m['worst_gain']:+.2f} "
                     f"| {m['ssim']:.3f} | {m['psnr_sa']:.2f} | {m['kernel_mse']:.2e} "
                     f"| {m['seconds']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "runtime_psnr.png")


def _plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for method, m in summary["methods"].items():
        ax.scatter(max(m["seconds"], 1e-2), m["psnr"], label=method)
    ax.set_xscale("log")
    ax.set_xlabel(f"seconds per image ({summary['device']})")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
