"""Overlapping tiles of a photo and their seamless blend (a partition of unity).

Each tile is a ``window_h × window_w`` window of the photo, restored on its own computation grid
(``boundary.Frame``: the valid model, so nothing beyond the window is assumed). A pixel near a
window's edge sees less of its blur footprint than one ``context`` pixels inside, so a tile's
weight is zero within ``context`` of every edge that borders another tile, and the weights of two
neighbours cross over a raised-cosine ramp in the rest of their overlap::

    tile i−1:  1 ───────╮1−sin²
    tile i:        sin²╭─────── 1        (the two sum to 1 on the ramp, 1 elsewhere)
                  |ctx|ramp|ctx|
                  └─ overlap ─┘

At the photo's own edges a tile keeps its weight up to the frame (there the valid model is the
truth). The 2-D weight is the product of the two 1-D weights, so the weights sum to 1 over every
pixel; ``TileBlend`` still divides by the accumulated weight, which makes a blend of identical
content exact to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _axis_starts(length: int, window: int, overlap: int) -> tuple[int, tuple[int, ...]]:
    """The fewest windows of at most ``window`` pixels covering ``[0, length)`` with neighbours
    overlapping by at least ``overlap``: their common size and starts."""
    if length <= window:
        return length, (0,)
    count = math.ceil((length - overlap) / (window - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)  # ≤ window (see the count)
    return size, tuple(i * (length - size) // (count - 1) for i in range(count))


def _axis_weights(starts: tuple[int, ...], size: int, context: int) -> Tensor:
    """``[len(starts), size]`` 1-D weights (module docstring); float64."""
    ramps = [(nxt + context, end - context)  # the crossover between tile i and tile i+1
             for nxt, end in zip(starts[1:], (s + size for s in starts[:-1]), strict=True)]
    positions = torch.arange(size, dtype=torch.float64) + 0.5
    weights = torch.ones(len(starts), size, dtype=torch.float64)
    for i, start in enumerate(starts):
        for j in (i - 1, i):  # the ramp in (from the previous tile) and the ramp out
            if 0 <= j < len(ramps):
                low, high = ramps[j]
                angle = 0.5 * torch.pi * ((positions + start - low) / (high - low)).clamp(0, 1)
                rising = angle.sin().square()  # exactly 0 and 1 at the ramp's ends
                weights[i] *= rising if j < i else 1.0 - rising
    return weights


@dataclass(frozen=True)
class TilePlan:
    """Tiles of a ``height × width`` photo: windows of ``window_h × window_w`` at every
    ``(top, left)`` of ``tops × lefts``, in row-major order; ``context``: pixels of each
    inner edge that get no weight."""

    height: int
    width: int
    window_h: int
    window_w: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]
    context: int

    @classmethod
    def plan(cls, height: int, width: int, window: int, context: int, ramp: int) -> TilePlan:
        """The fewest tiles of at most ``window × window`` pixels whose neighbours overlap by
        ``2·context + ramp``. Raises ``ValueError`` when the window is too small for that."""
        overlap = 2 * context + ramp
        if context < 0 or ramp < 1 or window < 2 * overlap:
            raise ValueError(f"a tile window of {window} px is too small for {context} px of "
                             f"context and a {ramp} px blend (it needs ≥ {2 * overlap})")
        window_h, tops = _axis_starts(height, window, overlap)
        window_w, lefts = _axis_starts(width, window, overlap)
        return cls(height, width, window_h, window_w, tops, lefts, context)

    def __len__(self) -> int:
        return len(self.tops) * len(self.lefts)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """``(top, left, window_h, window_w)`` of every tile, row-major."""
        return [(top, left, self.window_h, self.window_w)
                for top in self.tops for left in self.lefts]

    def windows(self, image: Tensor, indices: range) -> Tensor:
        """The windows ``[len(indices), C, window_h, window_w]`` of ``image`` ``[C, H, W]``."""
        boxes = self.boxes()
        return torch.stack([image[..., t : t + h, lf : lf + w]
                            for t, lf, h, w in (boxes[i] for i in indices)])

    def weight(self, index: int) -> Tensor:
        """The blend weight ``[window_h, window_w]`` (float64) of tile ``index``."""
        row, column = divmod(index, len(self.lefts))
        rows = _axis_weights(self.tops, self.window_h, self.context)[row]
        columns = _axis_weights(self.lefts, self.window_w, self.context)[column]
        return rows[:, None] * columns[None, :]


class TileBlend:
    """Accumulates restored tiles into one image (float32, on ``device``), weighted by
    ``TilePlan.weight``; reusable (``result`` starts the next blend).

    Without a ``border`` the tiles are the windows ``[n, C, window_h, window_w]`` and the image is
    the photo ``[n, C, H, W]``. With ``border = (top, left, grid_h, grid_w)`` (where a
    ``boundary.Frame`` puts a window on its computation grid) each tile is its whole grid, the
    image is the *canvas*: the photo extended by the grids' borders, ``[n, C, H + grid_h −
    window_h, W + grid_w − window_w]``, the photo at ``(top, left)``, so tile ``i``'s grid sits at
    its window's own ``(top_i, left_i)``; a tile's weight continues its window's edge values into
    its border (zero beside an inner edge, where the neighbour's weight takes over).

    The boxes, the weights (on the device) and their sum are computed once: a blend repeated at
    every sampling step costs the accumulation only, and no host synchronisation."""

    def __init__(self, plan: TilePlan, particles: int, channels: int,
                 device: torch.device | str = "cpu",
                 border: tuple[int, int, int, int] | None = None) -> None:
        self.plan, self.border = plan, border
        height, width = self.shape()
        self.boxes = [self._box(box) for box in plan.boxes()]
        weights = [self.weight(index) for index in range(len(plan))]
        total = torch.zeros(height, width, dtype=torch.float64)
        for (top, left, h, w), weight in zip(self.boxes, weights, strict=True):
            total[top : top + h, left : left + w] += weight
        if not bool((total > 0).all()):
            raise ValueError("the tiles do not cover every pixel of the photo")
        self._weights = [weight.float().to(device) for weight in weights]
        self.total = total.float().to(device)
        self.sum = torch.zeros(particles, channels, height, width, device=device)
        self.added: set[int] = set()

    def shape(self) -> tuple[int, int]:
        """The blended image's ``(height, width)``: the photo's, or the canvas's."""
        if self.border is None:
            return self.plan.height, self.plan.width
        _, _, grid_h, grid_w = self.border
        return (self.plan.height + grid_h - self.plan.window_h,
                self.plan.width + grid_w - self.plan.window_w)

    def _box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        top, left, height, width = box
        if self.border is None:
            return top, left, height, width
        return top, left, self.border[2], self.border[3]

    def weight(self, index: int) -> Tensor:
        """Tile ``index``'s weight ``[height, width]`` over its box (float64, on the CPU)."""
        weight = self.plan.weight(index)
        if self.border is None:
            return weight
        top, left, grid_h, grid_w = self.border
        pads = (left, grid_w - self.plan.window_w - left, top, grid_h - self.plan.window_h - top)
        return F.pad(weight[None, None], pads, mode="replicate")[0, 0]

    def add(self, index: int, tile: Tensor) -> None:
        top, left, h, w = self.boxes[index]
        self.sum[..., top : top + h, left : left + w] += self._weights[index] * tile.to(self.sum)
        self.added.add(index)

    def result(self) -> Tensor:
        """The blend ``[n, C, height, width]``; the accumulation starts over. Raises
        ``ValueError`` unless every tile was added."""
        if len(self.added) != len(self.boxes):
            raise ValueError(f"the blend misses tiles ({len(self.added)} of {len(self.boxes)} "
                             "added): they would not cover every pixel")
        out = self.sum / self.total
        self.sum = torch.zeros_like(self.sum)
        self.added = set()
        return out
