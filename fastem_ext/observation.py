"""The measurement ``y = k ⊛ x + n`` on the computation grid, with or without a boundary mask.

``mask=None`` is the circular model: every grid pixel is observed and ``H`` is circulant.

With a ``mask`` (1 on observed pixels), the grid extends beyond the photo's frame by at least
``K//2`` pixels, so every observed pixel is a true (non-wrapped) convolution of the scene: the
``valid`` model of a real, non-periodic photo. The unobserved pixels are handled as missing data:
they contribute no residual to the guidance, and the M-step sees them imputed with the current
prediction ``k ⊛ x̂0`` (the EM treatment of missing observations), which keeps every solve
diagonal in the Fourier basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .physics import blur_spectrum, psf2otf


@dataclass(frozen=True)
class Observation:
    """y: ``[C, H, W]`` in [0, 1] on the grid; sigma: noise std in [0, 1] units; mask:
    ``None`` or ``[1, H, W]`` (1 = observed). The ``*_net`` forms are in the network's [-1, 1]
    units (``2y − 1``, ``2σ``): a kernel summing to 1 maps ``2x − 1`` to ``2(k ⊛ x) − 1``."""

    y: Tensor
    sigma: float
    mask: Tensor | None = None

    @cached_property
    def y_net(self) -> Tensor:
        return 2.0 * self.y - 1.0

    @property
    def sigma_net(self) -> float:
        return 2.0 * self.sigma

    @cached_property
    def spec_y_net(self) -> Tensor:
        return torch.fft.rfft2(self.y_net)

    def residual_net(self, x0_net: Tensor, otf: Tensor) -> Tensor:
        """``y − H x̂0`` on the observed pixels (zero elsewhere). x0_net: ``[n, C, H, W]``."""
        residual = self.y_net - blur_spectrum(x0_net, otf)
        return residual if self.mask is None else residual * self.mask

    def residual_spectrum_net(self, x0_net: Tensor, otf: Tensor) -> Tensor:
        """``rfft2(y − H x̂0)``; the circular model needs a single forward FFT of ``x̂0``."""
        if self.mask is None:
            return self.spec_y_net - otf * torch.fft.rfft2(x0_net)
        return torch.fft.rfft2(self.residual_net(x0_net, otf))

    def mstep_target(self, x0: Tensor, kernel: Tensor) -> Tensor:
        """What the M-step fits: ``y``, with unobserved pixels imputed as ``k ⊛ x̂0``.

        x0: ``[n, C, H, W]`` in [0, 1]. Returns ``[C, H, W]`` or ``[n, C, H, W]``.
        """
        if self.mask is None:
            return self.y
        predicted = blur_spectrum(x0, psf2otf(kernel, x0.shape[-2:]))
        return self.mask * self.y + (1.0 - self.mask) * predicted
