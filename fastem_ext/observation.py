"""The measurement ``y = k ⊛ x + n`` on the computation grid, with or without a boundary mask.

``mask=None`` is the circular model: every grid pixel is observed and ``H`` is circulant.

With a ``mask`` (1 on observed pixels), the grid extends beyond the photo's frame by at least
``K//2`` pixels, so every observed pixel is a true (non-wrapped) convolution of the scene: the
``valid`` model of a real, non-periodic photo. The unobserved pixels are handled as missing data:
they contribute no residual to the guidance, and the M-step sees them imputed with the current
prediction ``k ⊛ x̂0`` (the EM treatment of missing observations), which keeps every solve
diagonal in the Fourier basis.

A **batched** observation (``y`` ``[n, C, H, W]``, ``mask`` ``[n, 1, H, W]``) holds one image per
particle: particle ``i`` is guided by ``y[i]`` alone, and the M-step's sums over particles become
the joint least-squares fit of one kernel to all of them (several crops of one photo sharing its
camera shake; the tiles of a non-blind pass). A run over it has exactly ``n`` particles.

Everything here is in image units ([0, 1]); the network's units stop at ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .physics import psf2otf


@dataclass(frozen=True)
class Observation:
    """y: ``[C, H, W]`` (shared by every particle) or ``[n, C, H, W]`` (one per particle) in
    [0, 1] on the grid; sigma: noise std in [0, 1] units; mask: ``None``, ``[1, H, W]`` or, with
    a batched ``y``, ``[n, 1, H, W]`` (1 = observed)."""

    y: Tensor
    sigma: float
    mask: Tensor | None = None

    def particle_shape(self, particles: int) -> tuple[int, int, int, int]:
        """The shape ``(n, C, H, W)`` of ``particles`` samples of this observation; a batched
        observation needs exactly one particle per image."""
        if self.y.dim() == 3:
            return (particles, *self.y.shape)
        if particles != self.y.shape[0]:
            raise ValueError(f"a batched observation of {self.y.shape[0]} images needs "
                             f"particles={self.y.shape[0]} (one per image), got {particles}")
        return tuple(self.y.shape)

    @cached_property
    def spec_y(self) -> Tensor:
        """``rfft2(y)`` ``[(n,) C, H, W//2+1]``, computed once (touch it outside a captured
        graph)."""
        return torch.fft.rfft2(self.y)

    def residual(self, spec_x: Tensor, otf: Tensor) -> Tensor:
        """``y − H x`` on the observed pixels (zero elsewhere), ``[n, C, H, W]``, from the half
        spectrum of ``x`` (``[n, C, H, W//2+1]``) and the kernel's ``otf``."""
        residual = self.y - torch.fft.irfft2(otf * spec_x, s=self.y.shape[-2:])
        return residual if self.mask is None else residual * self.mask

    def target_spectrum(self, spec_x: Tensor, kernel: Tensor) -> Tensor:
        """The half spectrum of what the M-step fits: ``y``, with unobserved pixels imputed as
        ``k ⊛ x``. spec_x: ``rfft2(x)`` ``[n, C, H, W//2+1]``. Returns ``[C, H, W//2+1]`` (shared,
        no mask) or ``[n, C, H, W//2+1]``."""
        if self.mask is None:
            return self.spec_y
        shape = self.y.shape[-2:]
        predicted = torch.fft.irfft2(spec_x * psf2otf(kernel, shape), s=shape)
        return torch.fft.rfft2(self.mask * self.y + (1.0 - self.mask) * predicted)
