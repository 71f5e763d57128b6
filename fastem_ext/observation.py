"""The measurement ``y = k ⊛ x + n`` on the computation grid, with or without a boundary mask.

``mask=None`` is the circular model: every grid pixel is observed and ``H`` is circulant.

With a ``mask`` (1 on observed pixels), the grid extends beyond the photo's frame by at least
``K//2`` pixels, so every observed pixel is a true (non-wrapped) convolution of the scene: the
``valid`` model of a real, non-periodic photo. The M-step treats the pixels outside the frame as
missing data: it sees them imputed with the current prediction ``k ⊛ x̂0`` (the EM treatment of
missing observations), which keeps every solve diagonal in the Fourier basis.

**The guidance observes the outside weakly** (``OUTSIDE_WEIGHT``): there ``y`` holds the frame's
edge replicated (``boundary.Frame.pad``), a rough guess of the blurred scene beyond the frame, and
its residual is weighted by ``OUTSIDE_WEIGHT`` (1 inside), as if observed with ``1/√w`` ≈ 4.5×
the noise. With no weight at all (the model until 2026-11-29) nothing holds the scene outside to
the photo's brightness: in the first steps the guidance overshoots near an edge and the outside
band compensates, darkens to black, and stays there; the frame's edge rows then carry a bright
streak that keeps the data fitted (seen in ``fastem demo`` and on many tuning crops; with the
true kernel too). Measured on 24 ``natural/train`` crops, TUNE kernels, σ = 10/255, blind Fast EM
with the defaults: mean gain over the blurry input +0.36 → +1.39 dB (better on 19 of 24; the
frame's central 224×224 gains +0.69 dB too, as the kernel estimate improves: mean kernel MSE
1.98e-5 → 1.61e-5); with ``centring``'s re-centring as well, ``w`` = 0.01 and 0.2 gained less
than ``w`` = 0.05 (+0.67 and +1.02 dB against +1.64; ``python/results/ablation-tune-outside/``).
DPS guidance weighs the outside the same way (not measured: 1000 steps per run).

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

OUTSIDE_WEIGHT = 0.05
"""The guidance's weight on the residual outside the frame of a masked observation (module
docstring)."""


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

    def misfit(self, spec_x: Tensor, otf: Tensor) -> Tensor:
        """``y − H x`` on every grid pixel, ``[n, C, H, W]``, from the half spectrum of ``x``
        (``[n, C, H, W//2+1]``) and the kernel's ``otf``."""
        return self.y - torch.fft.irfft2(otf * spec_x, s=self.y.shape[-2:])

    def residual(self, spec_x: Tensor, otf: Tensor) -> Tensor:
        """``y − H x`` on the observed pixels (zero elsewhere), ``[n, C, H, W]``."""
        misfit = self.misfit(spec_x, otf)
        return misfit if self.mask is None else misfit * self.mask

    @cached_property
    def guidance_weight(self) -> Tensor | None:
        """The guidance's per-pixel weight on the misfit, as if the noise variance there were
        ``σ²/w``: 1 on the observed pixels, ``OUTSIDE_WEIGHT`` elsewhere (module docstring);
        ``None`` without a mask (1 everywhere). Computed once (touch it outside a captured
        graph, as ``step.plan_step`` does)."""
        if self.mask is None:
            return None
        return self.mask * (1.0 - OUTSIDE_WEIGHT) + OUTSIDE_WEIGHT

    def target_spectrum(self, spec_x: Tensor, kernel: Tensor) -> Tensor:
        """The half spectrum of what the M-step fits: ``y``, with unobserved pixels imputed as
        ``k ⊛ x``. spec_x: ``rfft2(x)`` ``[n, C, H, W//2+1]``. Returns ``[C, H, W//2+1]`` (shared,
        no mask) or ``[n, C, H, W//2+1]``."""
        if self.mask is None:
            return self.spec_y
        shape = self.y.shape[-2:]
        predicted = torch.fft.irfft2(spec_x * psf2otf(kernel, shape), s=shape)
        return torch.fft.rfft2(self.mask * self.y + (1.0 - self.mask) * predicted)
