"""Choosing the crops of a photo that say the most about its blur.

A blur kernel is seen through the image's edges: an edge of one orientation constrains the
kernel's profile across it only, flat regions constrain nothing, and clipped pixels (saturated
highlights, crushed shadows) break the linear model ``y = k ⊛ x + n``. A window's score is the
smaller eigenvalue of its summed gradient structure tensor ``Σ [gx², gx·gy; gx·gy, gy²]`` (per
pixel, on the grey image, clipped pixels and their ``margin`` neighbourhood left out): large only
where strong edges of several orientations meet. Window sums come from integral images, so
scoring a 12-megapixel photo costs a few passes over it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIPPED = (0.5 / 255, 1 - 0.5 / 255)  # values at or beyond these are taken as clipped


def _box_sums(values: Tensor, height: int, width: int, stride: int) -> Tensor:
    """Sums of ``values`` ``[H, W]`` over every ``height × width`` window whose top-left corner
    lies on the ``stride`` grid: ``[(H−height)//stride + 1, (W−width)//stride + 1]`` (float64)."""
    integral = F.pad(values.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    rows = torch.arange(0, values.shape[0] - height + 1, stride)
    cols = torch.arange(0, values.shape[1] - width + 1, stride)
    r0, c0 = rows[:, None], cols[None, :]
    return (integral[r0 + height, c0 + width] - integral[r0, c0 + width]
            - integral[r0 + height, c0] + integral[r0, c0])


def usable_pixels(image: Tensor, margin: int) -> Tensor:
    """``[H, W]`` bool: pixels at least ``margin`` pixels (Chebyshev) from any clipped one."""
    clipped = ((image <= CLIPPED[0]) | (image >= CLIPPED[1])).any(dim=0).float()[None, None]
    side = 2 * margin + 1  # a separable max filter: 2·side comparisons per pixel
    near = F.max_pool2d(clipped, (side, 1), stride=1, padding=(margin, 0))
    near = F.max_pool2d(near, (1, side), stride=1, padding=(0, margin))
    return near[0, 0] == 0


def crop_scores(image: Tensor, window: tuple[int, int], stride: int,
                margin: int) -> Tensor:
    """Score per window position (module docstring) ``[rows, cols]``, top-left corners on the
    ``stride`` grid of ``image`` ``[C, H, W]`` in [0, 1]; in squared image units per pixel."""
    grey = image.mean(dim=0)
    gx = (grey[1:, 1:] - grey[1:, :-1])
    gy = (grey[1:, 1:] - grey[:-1, 1:])
    keep = usable_pixels(image, margin)[1:, 1:]
    gx, gy = gx * keep, gy * keep
    height, width = window[0] - 1, window[1] - 1  # the gradients of a window's own pixels
    a, b, c = (_box_sums(v, height, width, stride) for v in (gx * gx, gx * gy, gy * gy))
    smaller = 0.5 * (a + c) - (0.25 * (a - c).square() + b.square()).sqrt()
    return (smaller / (height * width)).clamp_min(0.0)


def choose_crops(image: Tensor, window: tuple[int, int], count: int, *, margin: int,
                 max_overlap: float = 0.25) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` windows ``(top, left, height, width)`` of ``image`` ``[C, H, W]``, best
    score first, none sharing more than ``max_overlap`` of its area with a better one."""
    height, width = window
    stride = max(1, min(height, width) // 4)
    scores = crop_scores(image, window, stride, margin)
    chosen: list[tuple[int, int, int, int]] = []
    for flat in scores.flatten().argsort(descending=True).tolist():
        top, left = divmod(flat, scores.shape[1])
        top, left = top * stride, left * stride
        if all(max(0, min(top, t) + height - max(top, t)) * max(0, min(left, lf) + width
               - max(left, lf)) <= max_overlap * height * width for t, lf, _, _ in chosen):
            chosen.append((top, left, height, width))
            if len(chosen) == count:
                break
    return chosen
