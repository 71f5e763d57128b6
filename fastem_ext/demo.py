"""``fastem demo``: blur a sample with a generated camera-shake kernel, restore it, and write one
side-by-side PNG (blurry | restored | sharp, true | estimated kernel) with the scores."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .api import run
from .checks import check_int
from .io import atomic_write, center_crop, check_outputs, kernel_tile, load_image
from .metrics import kernel_mse, psnr
from .motion import SEED_LIMIT, motion_kernel
from .physics import blur
from .restarts import SEEDS
from .settings import BLIND, kernel_size_or_default


def sample_image(size: int = 256, seed: int = 0) -> Tensor:
    """A built-in sharp test scene ``[3, size, size]`` in [0, 1] (no data file): a shaded
    background, overlapping discs and bars with hard edges, and a fine texture patch."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.stack([0.35 + 0.3 * xx, 0.4 + 0.2 * yy, 0.55 - 0.25 * xx * yy])
    for _ in range(14):
        colour = torch.rand(3, 1, 1, generator=g) * 0.8 + 0.1
        cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.18]) + 0.04).tolist()
        if torch.rand(1, generator=g) < 0.5:
            shape = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        else:
            angle = float(torch.rand(1, generator=g)) * math.pi
            u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
            v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
            shape = (u.abs() < r) & (v.abs() < r / 3)
        image = torch.where(shape, colour, image)
    patch = (yy > 0.62) & (yy < 0.92) & (xx > 0.08) & (xx < 0.38)
    texture = 0.5 + 0.35 * torch.sin(2 * math.pi * (size / 6) * (xx + 0.3 * yy) ** 1.3)
    return torch.where(patch, texture.expand(3, -1, -1), image).clamp(0, 1)


def run_demo(args: argparse.Namespace) -> str:
    """Run the demo described by the CLI arguments; returns a one-line summary."""
    size = check_int("--size", args.size, low=64, high=4096)
    kernel_size = check_int("--kernel-size", kernel_size_or_default(args.kernel_size), low=9,
                            high=min(128, size // 2))
    seed = check_int("--seed", args.seed, low=0, high=SEEDS - 1)
    kernel_seed = check_int("--kernel-seed", args.kernel_seed, low=0, high=SEED_LIMIT - 1)
    output = check_outputs({"-o/--output": args.output}, {"-o/--output": (".png",)},
                           (args.image,))["-o/--output"]
    if args.image is None:
        sharp = sample_image(size)
    else:
        sharp = load_image(args.image, name="image").image
        sharp = center_crop(sharp.expand(3, -1, -1), size)
    if not 0 <= args.noise <= 50:
        raise ValueError(f"--noise must be in [0, 50] (/255 units), got {args.noise}")
    kernel = motion_kernel(kernel_size, seed=kernel_seed)
    sigma = max(args.noise, 0.5) / 255
    # A real photo is a window onto a larger scene: blur a reflected extension linearly, keep
    # the frame (no circular wrap-around anywhere).
    low, high = kernel_size // 2, (kernel_size - 1) // 2  # K − 1 in all: the frame's size back
    extended = F.pad(sharp[None], (low, high, low, high), mode="reflect")[0]
    noise = torch.randn(sharp.shape,
                        generator=torch.Generator().manual_seed((seed + 1) % SEEDS))
    blurry = (blur(extended, kernel, "valid") + args.noise / 255 * noise).clamp(0, 1)
    blind = args.method in BLIND  # a non-blind method restores with the true kernel
    result = run(blurry, sigma, method=args.method, prior=args.prior, particles=args.particles,
                 steps=args.steps, kernel_size=kernel_size, seed=seed,
                 restarts=args.restarts, batch_restarts=args.batch_restarts,
                 kernel=None if blind else kernel,
                 device=args.device, progress=not args.quiet, regularizer=args.regularizer)
    scores = {
        "blurry": float(psnr(blurry, sharp)),
        "restored": float(psnr(result.image, sharp)),
        "kernel_mse": float(kernel_mse(result.kernel, kernel)),
    }
    caption = (f"blurry {scores['blurry']:.2f} dB | restored {scores['restored']:.2f} dB | "
               f"kernel MSE {scores['kernel_mse']:.2e} | {result.info['method']}, prior "
               f"{result.info['prior']}, {result.info['seconds_total']:.0f} s")
    _write_panel(output, [blurry, result.image, sharp], kernel, result.kernel,
                 caption, "estimated kernel" if blind else "kernel used (the true one)")
    return f"{args.output}: {caption}"


def _write_panel(path: Path, images: list[Tensor], true_kernel: Tensor, estimate: Tensor,
                 caption: str, estimate_label: str) -> None:
    from PIL import Image, ImageDraw

    size = images[0].shape[-1]
    row = torch.cat([img.expand(3, -1, -1) for img in images], dim=-1)
    kernels = [kernel_tile(k, size) for k in (true_kernel, estimate)]
    blank = torch.ones(3, size, size)
    canvas = torch.cat([row, torch.cat([*kernels, blank], dim=-1)], dim=-2)
    pixels = (canvas.clamp(0, 1).numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    parts = caption.split(" | ")
    lines = [" | ".join(parts[: len(parts) // 2]), " | ".join(parts[len(parts) // 2 :])]
    full = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + 16 * len(lines) + 8), "white")
    full.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(full)
    for index, line in enumerate(lines):
        draw.text((6, pixels.shape[0] + 4 + 16 * index), line, fill="black")
    labels = ["blurry", "restored", "sharp", "true kernel", estimate_label]
    for index, label in enumerate(labels):
        draw.text(((index % 3) * size + 4, (index // 3) * size + 4), label, fill="red")
    buffer = io.BytesIO()
    full.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
