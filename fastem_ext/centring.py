r"""Sub-pixel re-centring of a blind estimate: the kernel's centre of mass onto its centre pixel,
the image moved along, so that ``k ⊛ x`` (what the data fit) is unchanged.

Blind deconvolution cannot tell a shifted kernel from an oppositely shifted image. The M-step
re-centres its kernel by whole pixels (``mstep``), which leaves the centre of mass up to half a
pixel off the centre ``(K//2, K//2)``, and the image sits that far from where the convention
puts it: the photo's sharp scene at the time-average of the camera's path (the centre of mass of
the blur, as ``motion`` draws kernels). Half a pixel costs a sharp image dB of PSNR against any
reference and misaligns a restored frame against its blurry input. ``recentre`` moves the final
kernel by ``−c`` and the images by ``+c`` (``c`` the centre of mass's offset, sub-pixel) with a
Fourier phase ramp: exact for band-limited content, and the images are reflect-padded first so
that the ramp's wrap-around sees no jump at their edges. The kernel's ramp rings a little at its
sharp edges; the ringing below 0 is clamped and the kernel renormalised, which leaves its centre
of mass a few hundredths of a pixel off for a smooth kernel (0.08 px for a spiky 5×5 ℓ2
estimate). Further ramps would centre the kernel exactly but move the images by what is only
the clamp's artefact: measured below, one ramp restores better (+0.12 / +0.24 dB against +0.05
/ +0.14 dB with three).

Measured (blind Fast EM, 24 ``natural/train`` crops, TUNE kernels; each run's frame and kernel
without and with ``recentre``): mean gain over the blurry input +0.12 ± 0.08 dB at σ = 10/255
(better on 15 of 24), +0.24 ± 0.07 dB at σ = 5/255 (18 of 24), mean kernel MSE 1.98e-5 →
1.81e-5 and 1.47e-5 → 1.32e-5; with the guidance's weak observation of the outside
(``observation.OUTSIDE_WEIGHT``) at σ = 10/255: +0.25 ± 0.11 dB (17 of 24), 1.61e-5 → 1.39e-5
(``python/results/ablation-tune-outside/``).

Everything runs in float64 on the tensors' device; an exported package runs this code as its
finish program (``aot``), which is how the C++ API re-centres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_PAD = 16
"""Reflect padding of the images before the phase ramp (pixels on every side)."""

KERNEL_PAD = 2
"""Zero padding of the kernel before its ramp: room for the half pixel it moves."""
def centroid_offset(kernel: Tensor) -> Tensor:
    """The centre of mass of ``kernel`` ``[K, K]`` (non-negative, sum > 0) minus its centre
    ``(K//2, K//2)``: ``[dy, dx]`` float64 on the kernel's device (the sub-pixel value of
    what ``ops.kernel_project`` rounds for the M-step's whole-pixel re-centring)."""
    size = kernel.shape[-1]
    weights = kernel.double()
    index = torch.arange(size, dtype=torch.float64, device=kernel.device) - size // 2
    total = weights.sum()
    return torch.stack([(weights.sum(1) * index).sum(), (weights.sum(0) * index).sum()]) / total


def shift(images: Tensor, offset: Tensor) -> Tensor:
    """``images`` ``[..., H, W]`` moved by ``offset`` ``[dy, dx]`` pixels (what was at ``p``
    is then at ``p + offset``) by a Fourier phase ramp on the circular grid, float64."""
    height, width = images.shape[-2:]
    device = images.device
    fy = torch.fft.fftfreq(height, dtype=torch.float64, device=device)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64, device=device)[None, :]
    ramp = torch.polar(torch.ones_like(fy * fx), -2 * math.pi * (fy * offset[0] + fx * offset[1]))
    return torch.fft.ifft2(torch.fft.fft2(images.double()) * ramp).real


def recentre(kernel: Tensor, images: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The kernel ``[K, K]`` moved so that its centre of mass is its centre pixel, and
    ``images`` ``[..., C, H, W]`` in [0, 1] (or ``None``) moved the opposite way, clamped to
    [0, 1]. Returns ``(kernel, images, offset)`` in the inputs' dtypes; ``offset`` ``[dy, dx]``
    (float64) is how far the images moved. A kernel whose mass reaches its support's edge loses
    what the move pushes off it (renormalised): the one case where ``k ⊛ x`` changes by more
    than the ringing."""
    offset = centroid_offset(kernel)
    padded = F.pad(kernel.double(), (KERNEL_PAD,) * 4)
    moved = shift(padded, -offset)[KERNEL_PAD:-KERNEL_PAD, KERNEL_PAD:-KERNEL_PAD].clamp_min(0.0)
    new_kernel = (moved / moved.sum()).to(kernel.dtype)
    if images is None:
        return new_kernel, None, offset
    height, width = images.shape[-2:]
    pad = min(IMAGE_PAD, height - 1, width - 1)  # reflection needs fewer than the side
    flat = F.pad(images.reshape(-1, 1, height, width).double(), (pad,) * 4, mode="reflect")
    moved = torch.stack([shift(image, offset)[..., pad:pad + height, pad:pad + width]
                         for image in flat])  # one image at a time: complex128 is 16 B/pixel
    return new_kernel, moved.clamp(0.0, 1.0).reshape(images.shape).to(images.dtype), offset


def as_pixels(offset: Tensor | None) -> list[float] | None:
    """``recentre``'s offset for a report (``info["recentred"]``): ``[dy, dx]`` in pixels, or
    ``None`` where nothing was re-centred (a given kernel)."""
    return None if offset is None else [round(float(value), 4) for value in offset]
