"""Noise-level estimation from a single image."""

from __future__ import annotations

from torch import Tensor

# Below this the diffusion guidance degenerates (σ → 0 makes the likelihood a hard constraint);
# 8-bit quantisation alone is 1/255/√12 ≈ 0.3/255.
MIN_SIGMA = 0.5 / 255
MAD_TO_STD = 0.6744897501960817  # median(|N(0, 1)|)


def estimate_noise(image: Tensor) -> float:
    """σ̂ = median(|HH|) / 0.6745 on the finest diagonal Haar band (Donoho & Johnstone 1994).

    image: ``[C, H, W]`` in [0, 1]. The orthonormal Haar diagonal coefficient
    ``(a − b − c + d)/2`` of white noise has the noise's standard deviation, while a blurred
    image has almost no energy there. Returns at least ``MIN_SIGMA``.
    """
    return float(noise_level(image))


def noise_level(image: Tensor) -> Tensor:
    """``estimate_noise`` as a 0-d float64 tensor on the image's device, with no host read: the
    form an exported package traces (``aot``). A grey image repeated on three channels gives the
    grey image's value (the lower median of a multiset is unchanged when every element is
    repeated)."""
    height, width = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    x = image[..., :height, :width].double()
    diagonal = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2]
                + x[..., 1::2, 1::2]) / 2
    return (diagonal.abs().median() / MAD_TO_STD).clamp_min(MIN_SIGMA)
