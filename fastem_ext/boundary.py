"""Placing a photo on the computation grid: padding for the network and the boundary model.

``circular``: the photo *is* the grid (synthetic data blurred circularly); its size must be a
multiple of the network's.

``valid`` (real photos): the grid extends at least ``K//2`` pixels beyond the frame on every side,
rounded up to the network's multiple, so that every observed pixel is a non-wrapped convolution
of the scene. The extension holds the frame's edge replicated: the M-step treats it as missing
and the guidance observes it only weakly (see ``observation``); the sampler fills it in from the
prior, and no wrap-around ringing reaches the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .physics import BOUNDARIES

__all__ = ["BOUNDARIES", "Frame"]



@dataclass(frozen=True)
class Frame:
    """The photo ``[height, width]`` sits at ``(top, left)`` in a ``[grid_h, grid_w]`` grid."""

    height: int
    width: int
    top: int
    left: int
    grid_h: int
    grid_w: int
    masked: bool

    @classmethod
    def plan(cls, height: int, width: int, kernel_size: int, multiple: int,
             boundary: str) -> Frame:
        if boundary == "circular":
            if height % multiple or width % multiple:
                raise ValueError(
                    f"boundary='circular' needs H and W to be multiples of {multiple} for this "
                    f"prior, got {height}x{width}; use boundary='valid' (any size)"
                )
            return cls(height, width, 0, 0, height, width, masked=False)
        margin = kernel_size // 2
        grid_h = -(-(height + 2 * margin) // multiple) * multiple
        grid_w = -(-(width + 2 * margin) // multiple) * multiple
        return cls(height, width, (grid_h - height) // 2, (grid_w - width) // 2, grid_h, grid_w,
                   masked=True)

    def pad(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[C, H, W]`` → the grid image ``[C, grid_h, grid_w]`` and its mask (or None)."""
        if not self.masked:
            return image, None
        bottom = self.grid_h - self.height - self.top
        right = self.grid_w - self.width - self.left
        grid = F.pad(image[None], (self.left, right, self.top, bottom), mode="replicate")[0]
        mask = torch.zeros(1, self.grid_h, self.grid_w, dtype=image.dtype, device=image.device)
        mask[:, self.top : self.top + self.height, self.left : self.left + self.width] = 1.0
        return grid, mask

    def crop(self, grid: Tensor) -> Tensor:
        """The frame of ``[..., grid_h, grid_w]``."""
        return grid[..., self.top : self.top + self.height, self.left : self.left + self.width]
