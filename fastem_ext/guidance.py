"""Likelihood guidance ``g = ∇_{x_t} log p(y | x_t, k)`` (Eqs. 16–17), in the network's units.

The samplers map ``y ↦ 2y − 1`` and ``σ ↦ 2σ`` so that ``y' = k ⊛ x' + n'`` holds in [-1, 1] units
(a kernel summing to 1 preserves constants). The log-likelihood is a scalar, so its gradient with
respect to ``x_t`` is the same in either unit system.

``x0`` below is the *clamped* estimate with a straight-through gradient (see ``samplers``): the
residual uses the clamped values; the VJP goes through the network's unclamped Tweedie estimate,
because the clamp's zero gradient would freeze every saturated pixel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pigdm_vector(spec_residual: Tensor, otf: Tensor, r2: Tensor | float,
                 sigma: Tensor | float, shape: tuple[int, int]) -> Tensor:
    """``v = Hᵀ (r² HHᵀ + σ² I)⁻¹ (y − H x̂0)`` for a circulant ``H`` (Eq. 17).

    spec_residual: ``rfft2(y − H x̂0)`` ``[n, C, H, W//2+1]``; otf: ``[H, W//2+1]``. ``H`` has the
    eigenvalues ``otf``, so the inverse is the per-frequency filter
    ``conj(K) R / (r² |K|² + σ²)``. shape: ``(H, W)``. Returns ``[n, C, H, W]``.
    """
    return torch.fft.irfft2(pigdm_spectrum(spec_residual, otf, r2, sigma), s=shape)


def pigdm_spectrum(spec_residual: Tensor, otf: Tensor, r2: Tensor | float,
                   sigma: Tensor | float) -> Tensor:
    """The ΠGDM filter per frequency, ``conj(K) R / (r² |K|² + σ²)``; shapes as ``pigdm_vector``."""
    gain = otf.real.square() + otf.imag.square()
    return otf.conj() * spec_residual / (r2 * gain + sigma**2)


def pigdm_guidance(x_t: Tensor, x0: Tensor, spec_residual: Tensor, otf: Tensor,
                   r2: Tensor | float, sigma: Tensor | float) -> Tensor:
    """ΠGDM: ``g = (∂x̂0/∂x_t)ᵀ v`` — one vector-Jacobian product through the network.

    x_t: ``[n, C, H, W]`` with ``requires_grad``; x0: ``[n, C, H, W]`` computed from it;
    spec_residual: the spectrum of ``y − H x̂0`` (see ``pigdm_vector``).
    """
    v = pigdm_vector(spec_residual, otf, r2, sigma, x_t.shape[-2:])
    (grad,) = torch.autograd.grad(x0, x_t, grad_outputs=v)
    return grad


def dps_guidance(x_t: Tensor, residual: Tensor) -> Tensor:
    """DPS: ``g = −∇_{x_t} ‖y − H x̂0^i‖₂`` with one norm **per particle** (Eq. 16).

    residual: ``y − H x̂0`` ``[n, C, H, W]``, a differentiable function of ``x_t``. The particles
    are independent, so the gradient of the sum of their norms gives each particle the gradient
    of its own norm.
    """
    norms = residual.flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norms.sum(), x_t)
    return -grad
