"""The measurement ``y = k ⊛ x + n`` on the computation grid, with or without a boundary mask.

``mask=None`` is the circular model: every grid pixel is observed and ``H`` is circulant.

With a ``mask`` (1 on observed pixels), the grid extends beyond the photo's frame by at least
``K//2`` pixels, so every observed pixel is a true (non-wrapped) convolution of the scene: the
``valid`` model of a real, non-periodic photo. The unobserved pixels are handled as missing data:
they contribute no residual to the guidance, and the M-step sees them imputed with the current
prediction ``k ⊛ x̂0`` (the EM treatment of missing observations), which keeps every solve
diagonal in the Fourier basis.

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
    """y: ``[C, H, W]`` in [0, 1] on the grid; sigma: noise std in [0, 1] units; mask:
    ``None`` or ``[1, H, W]`` (1 = observed)."""

    y: Tensor
    sigma: float
    mask: Tensor | None = None

    @cached_property
    def spec_y(self) -> Tensor:
        """``rfft2(y)`` ``[C, H, W//2+1]``, computed once (touch it outside a captured graph)."""
        return torch.fft.rfft2(self.y)

    def residual(self, spec_x: Tensor, otf: Tensor) -> Tensor:
        """``y − H x`` on the observed pixels (zero elsewhere), ``[n, C, H, W]``, from the half
        spectrum of ``x`` (``[n, C, H, W//2+1]``) and the kernel's ``otf``."""
        residual = self.y - torch.fft.irfft2(otf * spec_x, s=self.y.shape[-2:])
        return residual if self.mask is None else residual * self.mask

    def target_spectrum(self, spec_x: Tensor, kernel: Tensor) -> Tensor:
        """The half spectrum of what the M-step fits: ``y``, with unobserved pixels imputed as
        ``k ⊛ x``. spec_x: ``rfft2(x)`` ``[n, C, H, W//2+1]``. Returns ``[C, H, W//2+1]`` (no
        mask) or ``[n, C, H, W//2+1]``."""
        if self.mask is None:
            return self.spec_y
        shape = self.y.shape[-2:]
        predicted = torch.fft.irfft2(spec_x * psf2otf(kernel, shape), s=shape)
        return torch.fft.rfft2(self.mask * self.y + (1.0 - self.mask) * predicted)
