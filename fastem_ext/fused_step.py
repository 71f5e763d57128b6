"""``samplers.guided_step`` on the fused ops (``fastem_ext.ops``): the fast engine's step.

Same mathematics, same random stream (the noise is drawn with the sampler's generator and handed
to ``ddpm_update``), different arithmetic order:

- x̂0 in [0, 1] comes from ``ops.predict_x0``; its spectrum feeds both the M-step and the
  guidance filter (one forward FFT per step instead of three).
- The M-step runs ``ops.hqs`` (``l1``/``l2``/``none``) or ``mstep.hqs`` (plug-and-play), with the
  ΠGDM ridge ``r²/4`` read from a device table.
- The ΠGDM filter runs in [0, 1] units: with ``y' = 2y − 1``, ``x' = 2x − 1``, ``σ' = 2σ`` and a
  kernel summing to 1, ``Y' − K X̂0' = 2(Y − K X̂0)`` and ``r²|K|² + σ'² = 4((r²/4)|K|² + σ²)``, so
  the network-unit vector is half the image-unit one computed with ``r²/4``.
- The VJP through the unclamped Tweedie estimate ``x̂0' = (x_t − √(1−ᾱ) ε)/√ᾱ`` is
  ``g = v/√ᾱ − (√(1−ᾱ)/√ᾱ)·(∂ε/∂x_t)ᵀ v``: autograd only runs through the network.
- ``ops.ddpm_update`` applies the ancestral update and the guidance step in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .guidance import dps_guidance
from .mstep import hqs
from .observation import Observation
from .physics import kernel_grid
from .samplers import EpsModel, StepConfig, tweedie_x0
from .schedule import StepTables, at


class FusedStep:
    """Callable with the signature of ``samplers.guided_step`` (minus the tables), built once
    per run: it holds the per-step device tables the fused ops read."""

    def __init__(self, obs: Observation | None, tables: StepTables, config: StepConfig) -> None:
        self.obs, self.tables, self.config = obs, tables, config
        self.coefs = ops.ddpm_coefficients(tables, config.guidance)
        self.r2_image = (tables.r2 / 4.0).contiguous()  # [S]: r² in [0, 1] units
        # Without the ΠGDM ridge a zero table keeps the M-step's scalars on the device.
        self.no_ridge = torch.zeros_like(self.r2_image)
        self.spec_y = None if obs is None else torch.fft.rfft2(obs.y)

    def __call__(self, eps_model: EpsModel, step: Tensor, x: Tensor, kernel: Tensor | None,
                 generator: torch.Generator) -> tuple[Tensor, Tensor | None, Tensor]:
        """step: the respaced index as a 0-d int64 device tensor (the engine's static buffer)."""
        config, tables = self.config, self.tables
        with torch.enable_grad():
            x_t = x.detach().requires_grad_(config.guidance is not None)
            eps = eps_model(x_t, at(tables.t, step).expand(x.shape[0]))[:, : x.shape[1]]
        x0 = ops.predict_x0(x.detach(), eps.detach(), self.coefs, step)  # [0, 1]
        spec_x = torch.fft.rfft2(x0)
        grid = None
        if config.mstep is not None:
            kernel, grid = self._mstep(x0, spec_x, kernel, step)
        grad = None
        if config.guidance is not None:
            otf = torch.fft.rfft2(grid if grid is not None else kernel_grid(kernel, x.shape[-2:]))
            grad = self._guidance(x_t, eps, spec_x, otf, step)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev, _ = ops.ddpm_update(x.detach(), eps.detach(), self.coefs, step, noise=noise,
                                    grad=grad, scale=config.scale)
        return x_prev, kernel, 2.0 * x0 - 1.0

    def _mstep(self, x0: Tensor, spec_x: Tensor, kernel: Tensor,
               step: Tensor) -> tuple[Tensor, Tensor]:
        obs, mstep = self.obs, self.config.mstep
        pigdm = self.config.guidance == "pigdm"
        spec_y = self.spec_y if obs.mask is None else torch.fft.rfft2(obs.mstep_target(x0, kernel))
        spectra = ops.kernel_spectra(spec_y, spec_x)
        shape = x0.shape[-2:]
        if mstep.kind == "pnp":
            ridge = at(self.r2_image, step) if pigdm else None
            kernel = hqs(spectra, kernel, obs.sigma, mstep, shape, ridge_r2=ridge)
            return kernel, kernel_grid(kernel, shape)
        return ops.hqs(spectra, kernel, obs.sigma, mstep, shape,
                       ridge_r2=self.r2_image if pigdm else self.no_ridge, step=step)

    def _guidance(self, x_t: Tensor, eps: Tensor, spec_x: Tensor, otf: Tensor,
                  step: Tensor) -> Tensor:
        obs, tables = self.obs, self.tables
        if self.config.guidance == "dps":
            x0 = tweedie_x0(x_t, eps, at(tables.sqrt_ac, step), at(tables.sqrt_one_minus_ac, step))
            x0 = x0 + (x0.clamp(-1.0, 1.0) - x0).detach()
            return dps_guidance(x_t, obs.residual_net(x0, otf))
        if obs.mask is None:
            filtered = ops.pigdm_filter(spec_x, otf, self.spec_y, self.r2_image, step, obs.sigma)
        else:
            residual = obs.mask * (obs.y - torch.fft.irfft2(otf * spec_x, s=x_t.shape[-2:]))
            filtered = ops.pigdm_filter(torch.fft.rfft2(residual), otf, None, self.r2_image, step,
                                        obs.sigma)
        v = 0.5 * torch.fft.irfft2(filtered, s=x_t.shape[-2:])  # network units
        sqrt_ac, sqrt_1m = at(tables.sqrt_ac, step), at(tables.sqrt_one_minus_ac, step)
        (vjp,) = torch.autograd.grad(eps, x_t, grad_outputs=v * (-sqrt_1m / sqrt_ac))
        return v / sqrt_ac + vjp
