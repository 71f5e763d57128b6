"""Non-blind kernel estimation vs noise level for each M-step regulariser (the paper's Figure 4).

    python python/figure4.py --out python/results/figure4   # ~2 min on a 2-core CPU

For each kernel size (33, 64): tune λ of every regulariser on ``natural/train`` crops with kernels
from the TUNE seed range; then run ``estimate_kernel`` with the true sharp image on 256×256 centre
crops of ``natural/val`` (Kodak) blurred by held-out EVAL-seed kernels, at σ ∈ {0, 5, 10, 15,
20}/255. Writes ``figure4.csv`` (one row per estimate), ``figure4.json`` (tuned λ, mean MSE per
cell, the device) and ``figure4.png`` (mean kernel MSE against σ). Needs matplotlib
(``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from prior_common import train_files, val_files

from fastem_ext.hardware import describe_device
from fastem_ext.io import center_crop, read_image
from fastem_ext.metrics import kernel_mse
from fastem_ext.models.kernel_denoiser import load_kernel_denoiser
from fastem_ext.motion import EVAL_SEEDS, TUNE_SEEDS, motion_kernel
from fastem_ext.mstep import estimate_kernel
from fastem_ext.physics import blur

REGULARIZERS = ("pnp", "l1", "l2", "none")
LAMBDA_GRID = {"pnp": [0.0, 0.003, 0.01, 0.03, 0.1, 0.3], "l1": [10, 30, 100, 300],
               "l2": [1e4, 1e5, 1e6], "none": [0.0]}
SIGMAS = (0, 5, 10, 15, 20)
# σ = 0 still needs a positive model noise level: the HQS coupling is nσ²β.
MODEL_SIGMA_FLOOR = 0.5 / 255


def load_crops(files: list[Path], count: int, size: int = 256) -> list[torch.Tensor]:
    files = files[:count]
    return [center_crop(read_image(f)[0], size) for f in files]


def observe(image: torch.Tensor, kernel: torch.Tensor, noise: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return blur(image, kernel) + noise / 255 * torch.randn(image.shape, generator=g)


def estimate(sharp, blurry, noise: int, size: int, regularizer: str, lam: float,
             denoiser) -> torch.Tensor:
    return estimate_kernel(sharp, blurry, max(noise / 255, MODEL_SIGMA_FLOOR), kernel_size=size,
                           regularizer=regularizer, lam=lam,
                           denoiser=denoiser if regularizer == "pnp" else None)


def mean_mse(images, kernels, sigmas, size, regularizer, lam, denoiser) -> float:
    errors = []
    for a, image in enumerate(images):
        for b, kernel in enumerate(kernels):
            for noise in sigmas:
                blurry = observe(image, kernel, noise, seed=1000 * a + 10 * b + noise)
                k = estimate(image, blurry, noise, size, regularizer, lam, denoiser)
                errors.append(float(kernel_mse(k, kernel)))
    return sum(errors) / len(errors)


def tune(size: int, denoiser, args) -> dict[str, float]:
    """λ per regulariser minimising the mean kernel MSE on train crops / TUNE-seed kernels."""
    images = load_crops(train_files(), args.tune_images)
    kernels = [motion_kernel(size, seed=TUNE_SEEDS.start + s) for s in range(args.tune_kernels)]
    best = {}
    for regularizer in REGULARIZERS:
        scores = {lam: mean_mse(images, kernels, (5, 10, 20), size, regularizer, lam, denoiser)
                  for lam in LAMBDA_GRID[regularizer]}
        best[regularizer] = min(scores, key=scores.get)
        print(f"  tune K={size} {regularizer:4s}: " + ", ".join(
            f"λ={lam:g}: {mse:.2e}" for lam, mse in scores.items()), flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="python/results/figure4")
    parser.add_argument("--sizes", type=int, nargs="+", default=[33, 64])
    parser.add_argument("--val-images", type=int, default=24)
    parser.add_argument("--kernels-per-image", type=int, default=2)
    parser.add_argument("--tune-images", type=int, default=6)
    parser.add_argument("--tune-kernels", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, summary = [], {"device": describe_device(torch.device("cpu")), "sizes": {}}
    val = load_crops(val_files(), args.val_images)
    for size in args.sizes:
        denoiser = load_kernel_denoiser(size)
        lams = tune(size, denoiser, args)
        cells: dict[str, dict[int, list[float]]] = {r: {s: [] for s in SIGMAS}
                                                     for r in REGULARIZERS}
        for a, image in enumerate(val):
            for j in range(args.kernels_per_image):
                seed = EVAL_SEEDS.start + args.kernels_per_image * a + j
                kernel = motion_kernel(size, seed=seed)
                for noise in SIGMAS:
                    blurry = observe(image, kernel, noise, seed=7919 * seed + noise)
                    for regularizer in REGULARIZERS:
                        k = estimate(image, blurry, noise, size, regularizer, lams[regularizer],
                                     denoiser)
                        mse = float(kernel_mse(k, kernel))
                        cells[regularizer][noise].append(mse)
                        rows.append({"size": size, "image": a, "kernel_seed": seed,
                                     "sigma": noise, "regularizer": regularizer,
                                     "lambda": lams[regularizer], "kernel_mse": mse})
        means = {r: {s: sum(v) / len(v) for s, v in by.items()} for r, by in cells.items()}
        summary["sizes"][size] = {"lambda": lams, "mean_kernel_mse": means}
        print(_table(size, means), flush=True)
    summary["seconds"] = time.perf_counter() - started
    with open(out / "figure4.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "figure4.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out / "figure4.png")


def _table(size: int, means: dict) -> str:
    lines = [f"K={size}: mean kernel MSE", "| σ (/255) | " + " | ".join(REGULARIZERS) + " |",
             "|---|" + "---|" * len(REGULARIZERS)]
    for noise in SIGMAS:
        lines.append(f"| {noise} | " + " | ".join(f"{means[r][noise]:.2e}"
                                                   for r in REGULARIZERS) + " |")
    return "\n".join(lines)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = summary["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, (size, data) in zip(axes[0], sizes.items(), strict=True):
        for regularizer, by_sigma in data["mean_kernel_mse"].items():
            ax.semilogy(list(by_sigma), list(by_sigma.values()), marker="o",
                        label=f"{regularizer} (λ={data['lambda'][regularizer]:g})")
        ax.set_title(f"kernel {size}×{size}")
        ax.set_xlabel("noise σ (/255)")
        ax.set_ylabel("kernel MSE")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
