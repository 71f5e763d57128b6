"""A progress bar over sampling steps that never stalls the device.

Each step's reblur residual ``RMSE(y − k ⊛ x̂0)`` on the observed pixels is computed on the device;
on CUDA it is copied to pinned host memory asynchronously and shown once its copy has completed
(``Event.query()`` does not block), so the bar lags by a step or two instead of synchronising.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .observation import Observation
from .physics import psf2otf


class StepProgress:
    """Callable ``(i, x0 [n, C, H, W] in [0, 1], kernel [K, K] or None)`` for the samplers; in
    kernel groups (``kernel`` ``[G, K, K]``) the bar shows the first group's residual."""

    def __init__(self, total: int, obs: Observation, *, enabled: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.obs = obs
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
        self.cuda = obs.y.is_cuda
        self.host = torch.zeros(1, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def observe(self, obs: Observation) -> None:
        """Measure the residual against ``obs`` from now on (the next stage of a run)."""
        self.obs = obs

    def __call__(self, i: int, x0: Tensor, kernel: Tensor | None) -> None:
        if self.bar.disable:
            return
        if kernel is not None:
            if self.pending and (self.event is None or self.event.query()):
                value = float(self.host)  # the copy has completed: no stall
                self.bar.set_postfix_str(f"reblur RMSE {255 * value:.2f}/255", refresh=False)
                self.pending = False
            if not self.pending:
                self.host.copy_(self._residual(x0, kernel).reshape(1), non_blocking=self.cuda)
                if self.event is not None:
                    self.event.record()
                self.pending = True
        self.bar.update(1)

    def _residual(self, x0: Tensor, kernel: Tensor) -> Tensor:
        if kernel.dim() == 3:  # kernel groups (step): the first group's
            x0, kernel = x0[: x0.shape[0] // len(kernel)], kernel[0]
        residual = self.obs.residual(torch.fft.rfft2(x0), psf2otf(kernel, x0.shape[-2:]))
        if self.obs.mask is None:
            return residual.square().mean().sqrt()
        weight = self.obs.mask.mean() * x0.shape[0] * x0.shape[1]
        return (residual.square().mean(dim=(-2, -1)).sum() / weight).sqrt()

    def close(self) -> None:
        self.bar.close()
