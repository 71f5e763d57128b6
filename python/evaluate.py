"""The paper's evaluation protocol: a seeded synthetic test set, several methods, one table.

    python python/evaluate.py --out results/eval                      # everything (GPU: ~1 h)
    python python/evaluate.py --images 4 --sigmas 10 --methods fastem-pigdm oracle none \\
        --out results/eval-small                                         # a CPU-sized subset

Test set: 256×256 centre crops of ``natural/val`` (never trained on), each blurred by its own
EVAL-seed camera-shake kernel (``--kernel-size``, default 33) with circular boundaries, plus white
noise for every σ in ``--sigmas`` (/255). Methods: ``fastem-pigdm`` with n = 1, 4, 16
(``fastem-pigdm-4`` …), ``fastem-dps``, ``diffem-pigdm``, ``oracle`` (non-blind ΠGDM with the true
kernel) and ``none`` (the blurry image and a Dirac kernel). Metrics: PSNR and SSIM of the first
particle, PSNR-SA of the particle mean, kernel MSE after the best shift, the reblur loss (Eq. 34),
seconds per image and the device. Writes ``results.csv``, ``summary.json``, ``table.md`` (Table 1
style), ``runtime_psnr.png`` (Figure 1 style) and ``grid_*.png`` for the first cases.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from prior_common import val_files
from tqdm import tqdm

from fastem_ext.api import describe_device, run
from fastem_ext.io import center_crop, read_image, write_image
from fastem_ext.metrics import kernel_mse, psnr, reblur_loss, ssim
from fastem_ext.motion import EVAL_SEEDS, motion_kernel
from fastem_ext.physics import blur, dirac_kernel

METHODS = ("fastem-pigdm", "fastem-pigdm-4", "fastem-pigdm-16", "fastem-dps", "diffem-pigdm",
           "oracle", "none")


def test_set(images: int, sigmas: list[int], kernel_size: int, size: int = 256):
    """Yields ``(case_id, sharp, kernel, sigma, blurry)``; deterministic."""
    files = val_files()[:images]
    for index, path in enumerate(files):
        sharp = center_crop(read_image(path)[0], size)
        kernel = motion_kernel(kernel_size, seed=EVAL_SEEDS.start + index)
        for noise in sigmas:
            g = torch.Generator().manual_seed(10_000 * index + noise)
            blurry = blur(sharp, kernel) + noise / 255 * torch.randn(sharp.shape, generator=g)
            yield f"{path.stem}_s{noise}", sharp, kernel, noise / 255, blurry


def restore(method: str, blurry, sigma: float, kernel, args) -> tuple[torch.Tensor, ...]:
    """``(image, mean, kernel, seconds)`` of one method on one case."""
    if method == "none":
        return blurry, blurry, dirac_kernel(kernel.shape[-1]), 0.0
    base, _, count = method.partition("-pigdm-")
    particles = int(count) if count else 1
    name = "fastem-pigdm" if base == "fastem" else method
    common = dict(prior=args.prior, particles=particles, seed=args.seed, device=args.device,
                  progress=False, boundary="circular", kernel_size=kernel.shape[-1],
                  steps=args.steps)
    if method == "oracle":
        result = run(blurry, sigma, method="pigdm", kernel=kernel, **common)
    else:
        result = run(blurry, sigma, method=name, **common)
    return result.image, result.mean, result.kernel, result.info["seconds_total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/eval")
    parser.add_argument("--prior", default="natural")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--sigmas", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--kernel-size", type=int, default=33)
    parser.add_argument("--steps", default=None, help="override every method's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--grids", type=int, default=3, help="image grids for the first cases")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(test_set(args.images, args.sigmas, args.kernel_size))
    rows = []
    bar = tqdm(total=len(cases) * len(args.methods), desc="evaluate", unit="run")
    for number, (case, sharp, kernel, sigma, blurry) in enumerate(cases):
        grid = [blurry]
        for method in args.methods:
            image, mean, estimate, seconds = restore(method, blurry, sigma, kernel, args)
            rows.append({
                "case": case, "sigma": round(sigma * 255), "method": method,
                "psnr": float(psnr(image.clamp(0, 1), sharp)),
                "ssim": float(ssim(image.clamp(0, 1), sharp)),
                "psnr_sa": float(psnr(mean.clamp(0, 1), sharp)),
                "kernel_mse": float(kernel_mse(estimate, kernel)),
                "reblur": float(reblur_loss(blurry, image, estimate)),
                "seconds": seconds,
            })
            grid.append(image)
            bar.update(1)
            bar.set_postfix_str(f"{case} {method} {rows[-1]['psnr']:.2f} dB")
        if number < args.grids:
            write_image(out / f"grid_{case}.png", torch.cat([*grid, sharp], dim=-1).clamp(0, 1))
    bar.close()
    summary = _summarise(rows, args)
    _write(out, rows, summary, args)
    print((out / "table.md").read_text())


def _summarise(rows: list[dict], args) -> dict:
    methods: dict[str, dict[str, float]] = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        methods[method] = {key: sum(r[key] for r in mine) / len(mine)
                           for key in ("psnr", "ssim", "psnr_sa", "kernel_mse", "reblur",
                                       "seconds")}
    return {"device": describe_device(torch.device(args.device or (
                "cuda" if torch.cuda.is_available() else "cpu"))),
            "date": time.strftime("%Y-%m-%d"), "prior": args.prior, "images": args.images,
            "sigmas": args.sigmas, "kernel_size": args.kernel_size, "methods": methods}


def _write(out: Path, rows: list[dict], summary: dict, args) -> None:
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"{summary['images']} images × σ {summary['sigmas']}/255, kernels "
             f"{summary['kernel_size']}×{summary['kernel_size']}, prior {summary['prior']}, "
             f"{summary['device']}, {summary['date']}", "",
             "| method | PSNR | SSIM | PSNR-SA | kernel MSE | reblur | s/image |",
             "|---|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {method} | {m['psnr']:.2f} | {m['ssim']:.3f} | {m['psnr_sa']:.2f} | "
                     f"{m['kernel_mse']:.2e} | {m['reblur']:.2e} | {m['seconds']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "runtime_psnr.png")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

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
