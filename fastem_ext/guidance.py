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

from .physics import blur_spectrum

GUIDANCES = ("pigdm", "dps")


def pigdm_vector(spec_y: Tensor, otf: Tensor, x0: Tensor, r2: Tensor | float,
                 sigma: Tensor | float) -> Tensor:
    """``v = Hᵀ (r² HHᵀ + σ² I)⁻¹ (y − H x̂0)`` for a circulant ``H`` (Eq. 17).

    spec_y: ``rfft2(y)`` ``[C, H, W//2+1]``; otf: ``[H, W//2+1]``; x0: ``[n, C, H, W]``.
    ``H`` has the eigenvalues ``otf``, so the inverse is the per-frequency filter
    ``conj(K) (Y − K X̂0) / (r² |K|² + σ²)``. Returns ``[n, C, H, W]``.
    """
    spec_x0 = torch.fft.rfft2(x0)
    gain = otf.real.square() + otf.imag.square()
    filtered = otf.conj() * (spec_y - otf * spec_x0) / (r2 * gain + sigma**2)
    return torch.fft.irfft2(filtered, s=x0.shape[-2:])


def pigdm_guidance(x_t: Tensor, x0: Tensor, spec_y: Tensor, otf: Tensor, r2: Tensor | float,
                   sigma: Tensor | float) -> Tensor:
    """ΠGDM: ``g = (∂x̂0/∂x_t)ᵀ v`` — one vector-Jacobian product through the network.

    x_t: ``[n, C, H, W]`` with ``requires_grad``; x0: ``[n, C, H, W]`` computed from it.
    """
    v = pigdm_vector(spec_y, otf, x0.detach(), r2, sigma)
    (grad,) = torch.autograd.grad(x0, x_t, grad_outputs=v)
    return grad


def dps_guidance(x_t: Tensor, x0: Tensor, y: Tensor, otf: Tensor) -> Tensor:
    """DPS: ``g = −∇_{x_t} ‖y − H x̂0^i‖₂`` with one norm **per particle** (Eq. 16).

    The particles are independent, so the gradient of the sum of their norms gives each particle
    the gradient of its own norm. y: ``[C, H, W]``; x0: ``[n, C, H, W]``.
    """
    residual = y - blur_spectrum(x0, otf)
    norms = residual.flatten(1).norm(dim=1)
    (grad,) = torch.autograd.grad(norms.sum(), x_t)
    return -grad
