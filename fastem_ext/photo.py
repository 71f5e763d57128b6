"""Photos larger than the working size: the kernel from a few crops, the frame in tiles.

Camera shake is one kernel for the whole frame, so a large photo needs no giant diffusion run:

1. **Crops** (``estimate_on_crops``): the ``count`` windows that say the most about the blur
   (``crops.choose_crops``) are stacked as one batched ``Observation`` (one image per particle,
   each on its own valid-model grid of the working size) and the blind method runs once on
   them: its M-step fits one kernel to all crops jointly (the sums of Eq. 24 run over them).
2. **Tiles** (``restore_tiles``): non-blind ΠGDM/DPS with that kernel over overlapping tiles of
   the working size (``tiles.TilePlan``), ``max_batch`` network inputs (tiles × particles) per
   call, so memory does not grow with the photo; the tiles' cores are blended seamlessly
   (``tiles.TileBlend``). Each tile uses the valid model on its own window: at the photo's edges
   that is the truth, inside it the tile's unobserved border is covered by its neighbour.

``sample(method, obs, kernel, schedule, particles)`` is the caller's sampler (``api.run`` binds
the prior, the generator, the M-step settings and the progress bar).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .boundary import Frame
from .crops import choose_crops
from .observation import Observation
from .samplers import SamplerOutput
from .schedule import Schedule
from .tiles import TileBlend, TilePlan

Sampler = Callable[[str, Observation, Tensor, Schedule, int], SamplerOutput]


def crop_window(height: int, width: int, working_size: int, kernel_size: int) -> tuple[int, int]:
    """The photo window whose valid-model grid is ``working_size`` (at most) on each side."""
    side = working_size - 2 * (kernel_size // 2)
    return min(height, side), min(width, side)


def tile_plan(height: int, width: int, working_size: int, kernel_size: int) -> TilePlan:
    """Tiles whose grids are at most ``working_size``; ``K//2`` pixels of context on inner edges
    (a pixel that far in sees its whole blur footprint) and a blend ramp of ``max(8, K//2)``."""
    margin = kernel_size // 2
    return TilePlan.plan(height, width, working_size - 2 * margin, margin, max(8, margin))


def batched_observation(windows: Tensor, frame: Frame, sigma: float,
                        particles: int) -> Observation:
    """``windows`` ``[b, C, h, w]`` placed on ``frame``'s grid, each repeated for its
    ``particles``: an ``Observation`` of ``b·particles`` images (window-major)."""
    padded = [frame.pad(window) for window in windows]
    y = torch.stack([grid for grid, _ in padded]).repeat_interleave(particles, dim=0)
    mask = torch.stack([mask for _, mask in padded]).repeat_interleave(particles, dim=0)
    return Observation(y, sigma, mask)


def estimate_on_crops(image: Tensor, sample: Sampler, method: str, kernel: Tensor,
                      schedule: Schedule, *, count: int, working_size: int, multiple: int,
                      sigma: float, particles: int) -> tuple[Tensor, list[tuple[int, ...]]]:
    """The blind method on the best ``count`` crops of ``image`` ``[3, H, W]`` (on the run's
    device) as one batch of ``count·particles``. Returns the kernel ``[K, K]`` and the crops
    ``(top, left, height, width)``."""
    size = kernel.shape[-1]
    window = crop_window(*image.shape[-2:], working_size, size)
    boxes = choose_crops(image, window, count, margin=size // 2)
    frame = Frame.plan(*window, size, multiple, "valid")
    windows = torch.stack([image[:, t : t + h, lf : lf + w] for t, lf, h, w in boxes])
    obs = batched_observation(windows, frame, sigma, particles)
    out = sample(method, obs, kernel, schedule, len(boxes) * particles)
    return out.kernel, boxes


def restore_tiles(image: Tensor, sample: Sampler, method: str, kernel: Tensor,
                  schedule: Schedule, plan: TilePlan, *, multiple: int, sigma: float,
                  particles: int, max_batch: int) -> Tensor:
    """Non-blind ``method`` with ``kernel`` over the tiles of ``plan``, ``max_batch //
    particles`` tiles per call, blended. image: ``[3, H, W]`` on the
    run's device. Returns ``[particles, 3, H, W]`` (on the device, float32)."""
    frame = Frame.plan(plan.window_h, plan.window_w, kernel.shape[-1], multiple, "valid")
    blend = TileBlend(plan, particles, image.shape[0], image.device)
    indices = range(len(plan))
    per_call = max(1, max_batch // particles)
    for first in range(0, len(indices), per_call):
        batch = indices[first : first + per_call]
        obs = batched_observation(plan.windows(image, batch), frame, sigma, particles)
        out = sample(method, obs, kernel, schedule, len(batch) * particles)
        restored = frame.crop(out.particles).unflatten(0, (len(batch), particles))
        for index, tile in zip(batch, restored, strict=True):
            blend.add(index, tile)
    return blend.result()
