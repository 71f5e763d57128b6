r"""A stationary Gaussian image prior with its *exact* ε-predictor.

The image model, in the network's [-1, 1] units, is ``x0 = μ + F⁻¹(√P · F(w))`` with ``w`` white
noise and ``F`` the orthonormal DFT: a circulant covariance with eigenvalues ``P_f``, the same
spectrum for every channel, channels independent. With ``x_t = √ᾱ x0 + √(1−ᾱ) ε``, every frequency
is an independent scalar Gaussian problem, so the MMSE denoiser is a per-frequency Wiener filter::

    E[x0 | x_t] = μ + F⁻¹[ √ᾱ P / (ᾱ P + 1 − ᾱ) · F(x_t − √ᾱ μ) ]
    ε̂(x_t, t)   = (x_t − √ᾱ E[x0 | x_t]) / √(1 − ᾱ)

and the posterior given a circular blur ``y = k ⊛ x0 + n``, ``n ~ N(0, s²)`` is known in closed form
(``posterior_mean``). This makes it the test oracle of the samplers, and a tiny built-in prior that
needs no weights: the default power law ``P ∝ 1/(f² + f0²)`` is the classic natural-image spectrum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..physics import psf2otf
from ..schedule import Schedule


class GaussianPrior(nn.Module):
    """ε-predictor of the Gaussian image model ``N(μ, F⁻¹ diag(P) F)``.

    ``P(f) ∝ (f² + f0²)^(-exponent/2)`` (``f`` in cycles per pixel), scaled so that the pixel
    variance is ``variance`` on every grid; mean ``μ`` (network units, 0 = mid-grey).
    """

    def __init__(self, *, variance: float = 0.25, exponent: float = 2.0, f0: float = 0.01,
                 mean: float = 0.0) -> None:
        super().__init__()
        self.variance, self.exponent, self.f0, self.mean = variance, exponent, f0, mean
        base = Schedule("1000").base_alphas_cumprod
        self.register_buffer("alphas_cumprod", base.to(torch.float32), persistent=False)

    def power(self, height: int, width: int, *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
        """Eigenvalues ``P`` on the half spectrum ``[H, W//2 + 1]`` (orthonormal DFT)."""
        fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64)
        fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64)
        full = (fy[:, None].square() + fx[None, :].square() + self.f0**2) ** (-self.exponent / 2)
        full = full * (self.variance / full.mean())  # (1/N) Σ_f P_f = pixel variance
        return full[:, : width // 2 + 1].to(dtype)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t: ``[B, C, H, W]``; t: ``[B]`` original timesteps. Returns ε̂ ``[B, C, H, W]``."""
        ac = self.alphas_cumprod[t].to(x_t.dtype)[:, None, None, None]
        power = self.power(*x_t.shape[-2:], device=x_t.device, dtype=x_t.dtype)
        centred = torch.fft.rfft2(x_t - ac.sqrt() * self.mean, norm="ortho")
        gain = ac.sqrt() * power / (ac * power + 1.0 - ac)
        x0 = self.mean + torch.fft.irfft2(gain * centred, s=x_t.shape[-2:], norm="ortho")
        return (x_t - ac.sqrt() * x0) / (1.0 - ac).sqrt()

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator) -> Tensor:
        """Exact draws from the prior, network units. shape: ``(n, C, H, W)``."""
        white = torch.randn(shape, generator=generator, device=generator.device)
        power = self.power(*shape[-2:], device=generator.device)
        spec = torch.fft.rfft2(white, norm="ortho") * power.sqrt()
        return self.mean + torch.fft.irfft2(spec, s=shape[-2:], norm="ortho")

    def posterior_mean(self, y: Tensor, kernel: Tensor, sigma: float) -> Tensor:
        """``E[x0 | y]`` for ``y = k ⊛ x0 + n`` (circular), all in network units.

        y: ``[C, H, W]``; kernel: ``[K, K]``; sigma: the noise std in network units.
        ``X̂ = μ + P conj(K) (Y − K μ) / (P |K|² + σ²)`` per frequency.
        """
        height, width = y.shape[-2:]
        otf = psf2otf(kernel, (height, width))
        power = self.power(height, width, device=y.device, dtype=y.dtype)
        spec = torch.fft.rfft2(y - self.mean, norm="ortho")  # k sums to 1: K μ = μ
        gain = power * otf.conj() / (power * (otf.real.square() + otf.imag.square()) + sigma**2)
        return self.mean + torch.fft.irfft2(gain * spec, s=(height, width), norm="ortho")
