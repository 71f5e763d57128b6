"""Photos larger than the working size: the kernel from a few crops, the frame in tiles.

Camera shake is one kernel for the whole frame, so a large photo needs no giant diffusion run:

1. **Crops** (``estimate_on_crops``): the ``count`` windows that say the most about the blur
   (``crops.choose_crops``) are stacked as one batched ``Observation`` (one image per particle,
   each on its own valid-model grid of the working size) and the blind method runs once on
   them: its M-step fits one kernel to all crops jointly (the sums of Eq. 24 run over them).
2. **Tiles** (``restore_tiles``): non-blind ΠGDM/DPS with that kernel over overlapping tiles of
   the working size (``tiles.TilePlan``), ``max_batch`` network inputs (tiles × particles) per
   call, so the network's memory does not grow with the photo (the canvas state does: three
   frame-sized buffers per particle). The tiles step in lockstep and are blended at every step
   (``tiles.TileBlend`` on the canvas), so the result is one sample without seams. Each tile
   uses the valid model on its own window: at the photo's edges that is the truth, inside it
   the tile's border beyond its window (weakly observed as the replicated edge, see
   ``observation``) is covered by its neighbour.

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
from .restarts import total_variation
from .samplers import SamplerOutput, StepCallback
from .schedule import Schedule, to_image
from .step import EpsModel, StepConfig, plan_step, step_with_noise
from .tiles import TileBlend, TilePlan

Sampler = Callable[[str, Observation | tuple[Observation, ...], Tensor, Schedule, int],
                   SamplerOutput]


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
                      sigma: float,
                      particles: int) -> tuple[Tensor, list[tuple[int, ...]], list[float]]:
    """The blind method on the best ``count`` crops of ``image`` ``[3, H, W]`` (on the run's
    device) as one batch of ``count·particles``; with a kernel ``[R, K, K]``, ``R`` such runs
    at once as kernel groups (``step``; ``sample`` then gets ``R`` observations and draws from
    one generator per run). Returns the kernel (``[K, K]`` or ``[R, K, K]``), the crops
    ``(top, left, height, width)`` and each run's restored crops' total variation
    (``restarts``)."""
    size = kernel.shape[-1]
    window = crop_window(*image.shape[-2:], working_size, size)
    boxes = choose_crops(image, window, count, margin=size // 2)
    frame = Frame.plan(*window, size, multiple, "valid")
    windows = torch.stack([image[:, t : t + h, lf : lf + w] for t, lf, h, w in boxes])
    obs = batched_observation(windows, frame, sigma, particles)
    runs = 1 if kernel.dim() == 2 else len(kernel)
    out = sample(method, obs if kernel.dim() == 2 else (obs,) * runs, kernel, schedule,
                 len(boxes) * particles)
    return out.kernel, boxes, [total_variation(part)
                               for part in frame.crop(out.particles).chunk(runs)]


def restore_tiles(image: Tensor, model: EpsModel, guidance: str, kernel: Tensor,
                  schedule: Schedule, plan: TilePlan, *, multiple: int, sigma: float,
                  particles: int, max_batch: int, generator: torch.Generator, scale: float,
                  before_batch: Callable[[Observation], None],
                  callback: StepCallback) -> Tensor:
    """Non-blind ``guidance`` (``"pigdm"``/``"dps"``) with ``kernel`` over the tiles of ``plan``,
    all tiles in lockstep: one ``x_t`` on the canvas (``TileBlend`` with a border: the photo and
    the tiles' grid borders), one noise draw on it per step; at every step each batch of
    ``max_batch // particles`` tiles takes its grids from the canvas and the blend of their
    ``x_{t−1}`` is the canvas's next state. Neighbours therefore share their state in the
    overlap at every step and the final sample is one image: no tile ends as an independent
    sample whose texture a final blend would average away. image: ``[3, H, W]`` on the run's
    device. ``before_batch(obs)`` runs before each batch's step, ``callback(i, x0, kernel)``
    after it. Returns ``[particles, 3, H, W]`` in [0, 1] (on the device, float32)."""
    frame = Frame.plan(plan.window_h, plan.window_w, kernel.shape[-1], multiple, "valid")
    border = (frame.top, frame.left, frame.grid_h, frame.grid_w)
    device = image.device
    tables = schedule.tables(device, torch.float32)
    config = StepConfig(guidance, None, scale)
    per_call = max(1, max_batch // particles)
    batches = [range(first, min(first + per_call, len(plan)))
               for first in range(0, len(plan), per_call)]
    blend = TileBlend(plan, particles, image.shape[0], device, border)
    x = torch.randn(blend.sum.shape, generator=generator, device=device)
    index = torch.full((), len(tables) - 1, dtype=torch.int64, device=device)
    for i in reversed(range(len(tables))):
        noise = torch.randn(x.shape, generator=generator, device=device)
        for batch in batches:
            # rebuilt at each step (a few FFTs beside the network): caching every batch's
            # observation would make memory grow with the photo
            obs = batched_observation(plan.windows(image, batch), frame, sigma, particles)
            before_batch(obs)
            grids = [blend.boxes[tile] for tile in batch]
            x_prev, _, x0 = step_with_noise(
                model, plan_step(obs, tables, config), index, _grids(x, grids), kernel,
                _grids(noise, grids))
            for tile, grid in zip(batch, x_prev.unflatten(0, (len(batch), particles)),
                                  strict=True):
                blend.add(tile, grid)
            callback(i, x0, kernel)
        x = blend.result()
        index.sub_(1)
    photo = x[..., frame.top : frame.top + plan.height, frame.left : frame.left + plan.width]
    return to_image(photo.clamp(-1.0, 1.0))


def _grids(canvas: Tensor, boxes: list[tuple[int, int, int, int]]) -> Tensor:
    """The boxes of ``canvas`` ``[n, C, H, W]`` stacked tile-major: ``[len(boxes)·n, C, h, w]``."""
    return torch.cat([canvas[..., t : t + h, lf : lf + w] for t, lf, h, w in boxes])
