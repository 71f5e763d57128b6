"""Likelihood guidance (Eqs. 16–17) in image units: the gradient ``v`` of the log-likelihood
with respect to the denoised estimate ``x̂0 ∈ [0, 1]``, for the current kernel.

The step turns it into ``g = ∇_{x_t} log p(y | x_t, k) = (∂x̂0/∂x_t)ᵀ v`` with one vector-Jacobian
product through the network (``step.guided_step``), so the network's units never reach this
module. ``x̂0`` here is the *clamped* estimate: the vectors are evaluated at the clamped values.

The fused ops (``fastem_ext.ops``) are imported inside the functions that call them: importing
fastem_ext loads no op (their Triton kernels and torch.compile hooks cost a second).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .observation import Observation
from .physics import blur_spectrum


def pigdm_vector(obs: Observation, spec_x0: Tensor, otf: Tensor, r2: Tensor,
                 step: Tensor) -> Tensor:
    """ΠGDM (Eq. 17): ``v = Hᵀ (r² HHᵀ + σ² I)⁻¹ (y − H x̂0)``, the gradient with respect to
    ``x̂0`` of ``log N(y; H x̂0, r² HHᵀ + σ² I)``, ``[n, C, H, W]``.

    ``H`` circulant has the eigenvalues ``otf`` (``[H, W//2+1]``), so the inverse is the
    per-frequency filter ``conj(K) R / (r² |K|² + σ²)`` (``ops.pigdm_filter``). With a mask the
    residual is weighted (``Observation.guidance_weight``: the outside weakly) and then filtered
    as if ``H`` were circulant.
    spec_x0: ``rfft2(x̂0)`` ``[n, C, H, W//2+1]``; r2: ``x0 | x_t``'s variance in image units, a
    table ``[S]`` read at ``step`` (0-d int64).
    """
    from . import ops  # lazily (module docstring)

    if obs.mask is None:
        filtered = ops.pigdm_filter(spec_x0, otf, obs.spec_y, r2, step, obs.sigma)
    else:
        residual = torch.fft.rfft2(obs.misfit(spec_x0, otf) * obs.guidance_weight)
        filtered = ops.pigdm_filter(residual, otf, None, r2, step, obs.sigma)
    return torch.fft.irfft2(filtered, s=obs.y.shape[-2:])


def dps_vector(obs: Observation, spec_x0: Tensor, otf: Tensor) -> Tensor:
    """DPS (Eq. 16): ``v = −∇_{x̂0^i} ‖y − H x̂0^i‖_w = Hᵀ (w·r^i) / ‖r^i‖_w`` with one norm **per
    particle** ``i`` (no norm shared across the batch), ``r = y − H x̂0`` and ``‖r‖_w² = Σ w r²``
    with the guidance's weights ``w`` (``Observation.guidance_weight``: 1 on the observed pixels,
    the outside weakly; 1 everywhere without a mask).

    spec_x0: ``rfft2(x̂0)`` ``[n, C, H, W//2+1]``; otf: ``[H, W//2+1]``. Returns ``[n, C, H, W]``
    (zero for a particle that explains ``y`` exactly).
    """
    misfit = obs.misfit(spec_x0, otf)
    weight = obs.guidance_weight
    weighted = misfit if weight is None else misfit * weight
    norms = (weighted * misfit).flatten(1).sum(dim=1).sqrt()
    norms = norms.clamp_min(torch.finfo(misfit.dtype).tiny)
    return blur_spectrum(weighted, otf.conj()) / norms[:, None, None, None]
