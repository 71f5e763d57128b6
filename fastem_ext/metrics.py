"""Image and kernel quality metrics. Images ``[C, H, W]`` or ``[N, C, H, W]`` in [0, 1].

Each returns a tensor: 0-d for one image, ``[N]`` for a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_image, check_kernel, check_tensor
from .physics import blur, gaussian_kernel


def _pair(name: str, x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    x = check_image(name, x, batched=None)
    ref = check_image("reference", ref, batched=None)
    if x.shape != ref.shape:
        raise ValueError(f"{name} {tuple(x.shape)} and reference {tuple(ref.shape)} differ")
    return x, ref


def psnr(x: Tensor, reference: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(range² / MSE)``."""
    x, reference = _pair("x", x, reference)
    mse = (x - reference).square().flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def ssim(x: Tensor, reference: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01,
    K2 = 0.03, statistics over the valid region, averaged over pixels and channels."""
    x, reference = _pair("x", x, reference)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    batch = x.reshape(-1, 1, *x.shape[-2:])
    ref = reference.reshape(-1, 1, *x.shape[-2:])
    window = gaussian_kernel(11, 1.5, device=x.device, dtype=x.dtype)[None, None]

    def local_mean(img: Tensor) -> Tensor:
        return F.conv2d(img, window)

    mu_x, mu_r = local_mean(batch), local_mean(ref)
    var_x = local_mean(batch * batch) - mu_x.square()
    var_r = local_mean(ref * ref) - mu_r.square()
    cov = local_mean(batch * ref) - mu_x * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / (
        (mu_x.square() + mu_r.square() + c1) * (var_x + var_r + c2)
    )
    return index.reshape(*x.shape[:-2], -1).mean(-1).mean(-1)


def kernel_mse(estimate: Tensor, truth: Tensor, max_shift: int | None = None) -> Tensor:
    """Mean squared error between two ``[K, K]`` kernels after the best integer shift.

    The shift (``|dy|, |dx| ≤ max_shift``, default ``K//4``) is the blind-deconvolution ambiguity:
    a shifted kernel with an oppositely shifted image explains the data equally well. Pixels
    shifted in from outside are zero.
    """
    estimate, truth = check_kernel("estimate", estimate), check_kernel("truth", truth)
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and truth {tuple(truth.shape)} differ")
    size = truth.shape[-1]
    shift = size // 4 if max_shift is None else int(max_shift)
    if not 0 <= shift < size:
        raise ValueError(f"max_shift must be in [0, {size - 1}], got {max_shift}")
    padded = F.pad(estimate, (shift, shift, shift, shift))
    windows = padded.unfold(0, size, 1).unfold(1, size, 1)  # [2s+1, 2s+1, K, K]
    return (windows - truth).square().mean(dim=(-2, -1)).min()


def reblur_loss(blurry: Tensor, restored: Tensor, kernel: Tensor) -> Tensor:
    """The reblur loss (Eq. 34): ``mean((y − k̂ ⊛ x̂)²)`` with circular boundaries.

    Needs no ground truth; a consistent estimate gives about ``σ²``.
    """
    restored, blurry = _pair("restored", restored, blurry)
    check_tensor("kernel", kernel, (2,))
    return (blurry - blur(restored, kernel)).square().flatten(-3).mean(-1)
