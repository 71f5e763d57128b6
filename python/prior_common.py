"""Pieces shared by ``train_prior.py``, ``evaluate_prior.py`` and the prior's tests: the data
split, image loading, the σ ↔ t map of the linear schedule and the x̂0 denoising metric.

The metric (the issue's acceptance figure): for a clean image ``img`` in [0, 1], ``x0 = 2·img − 1``,
``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε``, ``x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t`` clamped to [-1, 1] and mapped
back to [0, 1]; PSNR(x̂0, img) with peak 1, averaged over images (dB). The timestep of a noise
level σ (in [0, 1] units) is the integer t whose ``√((1−ᾱ_t)/ᾱ_t)`` is nearest to ``2σ``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastem_ext.io import center_crop, read_image  # noqa: E402
from fastem_ext.metrics import psnr  # noqa: E402
from fastem_ext.schedule import Schedule  # noqa: E402

DATA = Path(os.environ.get("FASTEM_DATA", REPO.parent / "shared" / "data"))
CURVE_SIGMAS_255 = (5, 10, 15, 25, 50)
CURVE_TIMESTEPS = (100, 250, 500, 750, 900, 999)
ACCEPT_SIGMA_255 = 25
EVAL_SEED = 2024  # noise of the validation metric: the same for every model and device
CLAMP_MARGIN = 0.02  # x̂0 counts as clamped beyond ±(1 + margin), network units (x0_stats)

EpsModel = Callable[[Tensor, Tensor], Tensor]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: Path) -> list[Path]:
    """The PNG and JPEG files of ``folder``, sorted by name (a stable order for a deterministic
    run)."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no PNG or JPEG images in {folder}")
    return files


def train_files(data_dir: Path = DATA) -> list[Path]:
    """``natural/train`` only. Raises ``ValueError`` if any file resolves into ``natural/val`` or
    shares a name with a validation image (a copied Kodak image would leak the metric)."""
    files = image_files(data_dir / "natural" / "train")
    val_dir = (data_dir / "natural" / "val").resolve()
    val_names = {p.stem for p in val_dir.glob("*")}  # a re-encoded copy keeps the stem
    leaked = [p for p in files if val_dir in p.resolve().parents or p.stem in val_names]
    if leaked:
        raise ValueError(f"validation images in the training list: {[str(p) for p in leaked]}")
    return files


def val_files(data_dir: Path = DATA) -> list[Path]:
    """``natural/val`` (Kodak, 24 images): validation only, never trained on."""
    return image_files(data_dir / "natural" / "val")


def load_uint8(path: Path) -> Tensor:
    """An 8-bit RGB image as ``[3, H, W]`` uint8 (a quarter of float32's memory)."""
    image, bits = read_image(path)
    if bits != 8 or image.shape[0] != 3:
        raise ValueError(f"{path}: expected 8-bit RGB, got {bits}-bit with {image.shape[0]} ch")
    return (image * 255).round().to(torch.uint8)


def val_crops(count: int | None = None, size: int = 256, data_dir: Path = DATA) -> Tensor:
    """Centre crops ``[N, 3, size, size]`` float32 in [0, 1] of the first ``count`` val images."""
    files = val_files(data_dir)[:count]
    return torch.stack([center_crop(load_uint8(p), size).float() / 255 for p in files])


def _alphas_cumprod() -> Tensor:
    return Schedule("1").base_alphas_cumprod  # float64 [1000]


def sigma_of_timestep(t: int) -> float:
    """Noise level of ``x_t/√ᾱ_t`` in [0, 1] image units: ``√((1−ᾱ_t)/ᾱ_t) / 2``."""
    ac = _alphas_cumprod()[t]
    return float(((1 - ac) / ac).sqrt() / 2)


def timestep_of_sigma(sigma: float) -> int:
    """The integer t whose noise level (in [0, 1] units) is nearest to ``sigma``."""
    ac = _alphas_cumprod()
    return int(((((1 - ac) / ac).sqrt() - 2 * sigma).abs()).argmin())


@torch.no_grad()
def x0_stats(
    model: EpsModel, images: Tensor, t: int, device: torch.device | str = "cpu", batch: int = 4
) -> dict[str, float]:
    """``{psnr, psnr_noisy, clamped}`` at timestep t: the mean PSNR of the x̂0 estimate, of the
    (clamped) noisy input ``x_t/√ᾱ``, and the share of x̂0's values that the clamp moves by more
    than ``CLAMP_MARGIN`` (a saturated x̂0 is what misleads the M-step at high noise). The margin:
    2.4 % of the Kodak crops' values are exactly 0 or 255, where any error of a correct estimate
    crosses ±1; 0.02 (2.55 grey levels) counts saturation, not rounding at the bounds.

    images: ``[N, 3, H, W]`` in [0, 1] (CPU). The noise comes from a CPU generator seeded with
    ``EVAL_SEED + t``, so every model and device sees the same noisy images.
    """
    ac = float(_alphas_cumprod()[t])
    gen = torch.Generator().manual_seed(EVAL_SEED + t)
    noise = torch.randn(images.shape, generator=gen)
    ours, noisy, clamped = [], [], 0
    for img, eps in zip(images.split(batch), noise.split(batch), strict=True):
        x0 = 2 * img.to(device) - 1
        xt = ac**0.5 * x0 + (1 - ac) ** 0.5 * eps.to(device)
        tt = torch.full((img.shape[0],), t, dtype=torch.int64, device=device)
        eps_hat = model(xt, tt).float()
        x0_raw = (xt - (1 - ac) ** 0.5 * eps_hat) / ac**0.5
        clamped += int((x0_raw.abs() > 1 + CLAMP_MARGIN).sum())
        ours.append(psnr((x0_raw.clamp(-1, 1).cpu() + 1) / 2, img))
        noisy.append(psnr(((xt / ac**0.5).clamp(-1, 1).cpu() + 1) / 2, img))
    return {"psnr": torch.cat(ours).mean().item(), "psnr_noisy": torch.cat(noisy).mean().item(),
            "clamped": clamped / images.numel()}


def x0_psnr(
    model: EpsModel, images: Tensor, t: int, device: torch.device | str = "cpu", batch: int = 4
) -> tuple[float, float]:
    """Mean PSNR of the x̂0 estimate and of the (clamped) noisy input at timestep t
    (``x0_stats``)."""
    stats = x0_stats(model, images, t, device, batch)
    return stats["psnr"], stats["psnr_noisy"]


def denoising_curve(
    model: EpsModel, images: Tensor, device: torch.device | str = "cpu",
    sigmas_255: Sequence[float] = CURVE_SIGMAS_255, timesteps: Sequence[int] = CURVE_TIMESTEPS,
) -> list[dict]:
    """Rows ``{t, sigma_255, psnr, psnr_noisy, clamped}`` at the timesteps of ``sigmas_255``
    (/255 in [0, 1] units) and at ``timesteps``, sorted by t."""
    ts = sorted({timestep_of_sigma(s / 255) for s in sigmas_255} | set(timesteps))
    rows = []
    for t in ts:
        stats = x0_stats(model, images, t, device)
        rows.append({"t": t, "sigma_255": round(255 * sigma_of_timestep(t), 2),
                     "psnr": round(stats["psnr"], 2), "psnr_noisy": round(stats["psnr_noisy"], 2),
                     "clamped": round(stats["clamped"], 5)})
    return rows


def curve_table(rows: Sequence[dict]) -> str:
    """Markdown table of ``denoising_curve`` rows."""
    lines = ["| t | σ·255 (noise of x_t/√ᾱ) | PSNR x̂0 (dB) | PSNR noisy input (dB) | gain (dB) "
             "| x̂0 clamped (%) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['t']} | {r['sigma_255']:.2f} | {r['psnr']:.2f} | {r['psnr_noisy']:.2f} "
              f"| {r['psnr'] - r['psnr_noisy']:+.2f} | {100 * r['clamped']:.2f} |" for r in rows]
    return "\n".join(lines)
