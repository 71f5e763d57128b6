r"""The M-step: kernel estimation by half-quadratic splitting (Eqs. 22–25 of Fast Diffusion EM).

Given ``n`` particles ``x^i`` (``[n, C, H, W]`` in [0, 1]), the observation ``y``
(``[C, H, W]``) and its noise level ``σ``, HQS alternates, ``J`` times, from the previous
kernel ``k_j``:

**Z-update (Eq. 24).** ``z`` lives on the full ``H×W`` grid and minimises (Eq. 22 multiplied by
``2nσ²``)::

    Σ_{i,c} ‖y_c − z ⊛ x^i_c‖² + nσ²β ‖z − k_j‖²  [+ ridge]  [+ nσ²λ ‖z‖² for ℓ2]

Every term is diagonal in the Fourier basis. With the unnormalised DFT, ``‖a‖² = (1/N) Σ_f |A_f|²``
and ``F(z ⊛ x) = Z·X``, so per frequency ``f`` (after multiplying by ``N``)::

    Z_f = (Σ_{i,c} conj(X^i_c) Y_c + nσ²β K_j) / (Σ_{i,c} |X^i_c|² + nσ²β [+ ρ] [+ nσ²λ])

The sums over particles *and colour channels* (one kernel, joint least squares) do not depend on
``j``: ``kernel_spectra`` computes them once per M-step (``ops.spectral_sums``), and ``hqs_terms``
gives the denominator's shift, which ``ops.wiener_z`` adds per frequency.

**ΠGDM ridge (Appendix D).** Under ΠGDM the particle is not a point but ``x ~ N(x̂0, r² I)`` (``r²``
in [0, 1] image units). Then, for one particle and one channel with ``N`` pixels and circular
boundaries, writing ``x = x̂0 + e``::

    E‖z ⊛ x − y‖² = ‖z ⊛ x̂0 − y‖² + 2 E⟨z ⊛ x̂0 − y, z ⊛ e⟩ + E‖z ⊛ e‖²
                  = ‖z ⊛ x̂0 − y‖² + 0 + Σ_p Var((z ⊛ e)_p)
                  = ‖z ⊛ x̂0 − y‖² + Σ_p r² Σ_q z_q²   = ‖z ⊛ x̂0 − y‖² + r² N ‖z‖²

since ``(z ⊛ e)_p = Σ_q z_q e_{p−q}`` is a sum of independent ``N(0, r²)`` terms. Summed over
``n`` particles and ``C`` channels the ridge is ``nCNr² ‖z‖² = nCr² Σ_f |Z_f|²``, which after the
same multiplication by ``N`` adds ``ρ = nCNr²`` to every frequency of the denominator (``n·N·r²``
per channel). The network's ``r_t²`` is in [-1, 1] units: the caller passes ``r_t²/4``.

**Why the blind loop runs without the ridge** (``HQSConfig.ridge = 0``). In the Gaussian picture of
the E-step, x̂0 is the Wiener estimate ``X̂_f = W_f X_f + noise``, ``W_f = P_f/(P_f + s_t²)`` (``P``
the image's power spectrum, ``s_t²`` the noise level of ``x_t/√ᾱ``): ``E|X̂_f|² = W_f P_f`` and
``E[conj(X̂_f) Y_f] = W_f P_f K_f``. Without a ridge the Z-update's ratio is unbiased, ``Z_f ≈ K_f``;
a white ridge ``ρ`` gives ``Z_f ≈ W_f P_f K_f/(W_f P_f + ρ)``, which vanishes wherever the image has
little energy — at high frequencies, where the kernel's shape lives — so ``z`` is a smoothed
cross-correlation and the normalisation to sum 1 keeps the blur: a blob. (The posterior variance
per frequency in place of a white ``r²`` gives ``Z_f ≈ W_f K_f``: still shrunk.) The ridge's job,
keeping an uninformative x̂0 from driving the kernel, is done by the coupling ``nσ²β`` (where
``|X̂_f|²`` is small, ``Z_f`` stays near the previous kernel) and by the denoiser. Measured
(python/results/ablation-tune: 8 natural/train crops, TUNE kernels, σ = 10/255): mean gain over
the blurry input −2.1 dB with the ridge, +0.5 dB without it (+1.4 dB in the gradient domain,
below); an earlier prior gave the same order, with 0.1× the ridge in between.

**Gradient domain** (``HQSConfig.gradient``). In the blind loop the sums are weighted per
frequency by ``(|F∂_h|² + |F∂_v|²)/4`` (``gradient_weight``, mean 1): the same least squares on the
images' gradients, as classical blind deconvolution does. The per-frequency ratio is unchanged;
what changes is its weight against the coupling: high frequencies, which carry the kernel's
shape, gain weight, and the near-constant ones (the boundary band, the DC term, shading) lose it.
Measured as above, over σ = 10 and 20/255 (16 cases): +2.4 dB mean gain against +1.2 dB
without, worst case −1.3 dB against −3.0 dB.
(``σ_z`` below is computed from the weighted sums: an approximation, its exact form would weigh
the noise twice.)

**A floor under the coupling's σ** (``HQSConfig.coupling_floor``, 10/255). Eq. 22 weighs the
previous kernel by ``nσ²β``: at σ = 5/255 a quarter of its weight at 10/255, so in the blind loop
the early, unreliable x̂0 moves the kernel four times as freely, and some runs never recover
(natural/train, σ = 5/255, 8 crops: one run at −10.7 dB). The data term's real noise is not σ
alone but σ plus the error of x̂0 (``k ⊛ (x − x̂0)``), which does not vanish with σ; the floor is
the simplest stand-in for it. Measured at σ = 5/255 (mean gain over the blurry input): on 8
tune crops −2.3 → −0.8 dB (python/results/ablation-tune-s5), on 24 −0.57 → −0.17 dB, better on
14 of 24 (ablation-tune-s5-24): a small effect, at the edge of what single chaotic runs resolve
(on the 24 Kodak crops it read −1.0 dB, python/results/eval-val-s5*). Above the floor nothing
changes. Two finer stand-ins did worse at σ = 10/255 (python/results/ablation-tune): a
coupling annealed with ΠGDM's ``r_t²`` (the data term weighed by ``σ²/(σ² + e·r_t²)``), and the
same with ``r_t²‖k_j‖²``, whose largest coupling sits at the Dirac start and keeps it there.

**ℓ2 (Tikhonov ``λ/2 ‖k‖²``)** is quadratic, hence exact in the Z-update (``+nσ²λ``). Applied
instead as a K-update proximal step it would only rescale ``z``, which the normalisation to sum 1
undoes: a silent no-op.

**Projection and K-update (Eq. 25).** ``z`` is cropped to the ``K×K`` support (centre at
``(K//2, K//2)``), clamped ``≥ 0`` and normalised to sum 1; then the regulariser's step:
``pnp`` — the plug-and-play kernel denoiser ``D(z, σ_d)`` with ``σ_d² = λ/β + σ_z²`` (below);
``l1`` — soft threshold at ``λ/β`` (the proximal map of ``λ‖k‖₁`` with weight ``β``);
``l2``/``none`` — identity; followed by the same projection. A kernel whose mass vanishes keeps
its previous value instead of dividing by 0.

**The PnP noise level.** Eq. 25 denoises at ``σ_d = √(λ/β)`` whatever the data's noise, so one λ
cannot suit σ = 5/255 and σ = 20/255 (the best λ differs 10× on the tuning set). ``z`` carries the
observation noise through the Z-update: its noise part is ``F⁻¹[Σ_{i,c} conj(X^i_c)·N_c / D]``
with ``D`` Eq. 24's denominator, whose per-pixel variance on the grid is, for ``n`` (similar)
particles::

    σ_z² = (n σ² / N) Σ_f E_f / D_f²        (E = Σ_{i,c} |X^i_c|², full spectrum)

so the denoiser runs at ``σ_d² = λ/β + σ_z²``: the prior's own level plus the noise ``z``
actually carries (computed on the device from the loop-invariant sums, no host sync). The
bundled denoisers are trained on such inputs (python/train_kernel_denoiser.py: simulated
Z-updates through natural/train spectra, conditioned on their ``σ_z``).

After the ``J`` iterations the kernel is re-centred on its centre of mass (integer shift, on the
device): blind deconvolution cannot tell a shifted kernel from a shifted image, and without this the
kernel drifts to the edge of its support and is cropped.

Every iteration runs on the fused ops (``ops.wiener_z``, then ``ops.kernel_project``: crop, clamp,
normalise, the ℓ1 threshold, and the re-centring on the last iteration); the plug-and-play
denoiser, a network, runs between two projections.

The fused ops (``fastem_ext.ops``) are imported inside the functions that call them: importing
fastem_ext loads no op (their Triton kernels and torch.compile hooks cost a second).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_image, check_kernel, check_kernel_size, check_sigma
from .models.kernel_denoiser import bundled_size, load_kernel_denoiser
from .physics import initial_kernel, kernel_grid
from .schedule import at

REGULARIZERS = ("pnp", "l1", "l2", "none")
# λ per regulariser and kernel size (ℓ1 thresholds at λ/β; ℓ2 weighs a Tikhonov term against the
# coupling nσ²β; PnP denoises at σ_d² = λ/β + σ_z²), tuned by python/figure4.py for non-blind
# kernel estimation on natural/train crops with TUNE-seed kernels (python/results/figure4), one
# row per bundled kernel denoiser (``bundled_size`` picks it).
DEFAULT_LAMBDA = {
    33: {"pnp": 0.03, "l1": 100.0, "l2": 1e4, "none": 0.0},
    64: {"pnp": 0.0, "l1": 100.0, "l2": 1e5, "none": 0.0},
}


@functools.lru_cache(maxsize=8)
def _load_denoiser(model_size: int, device: str):
    return load_kernel_denoiser(model_size, device)


def bundled_denoiser(kernel_size: int, device: torch.device | str) -> DenoiserFn:
    """The bundled plug-and-play kernel denoiser for ``kernel_size`` (loaded once per device),
    called without input checks: no host sync inside the M-step."""
    model = _load_denoiser(bundled_size(kernel_size), str(device))

    def denoiser(kernel: Tensor, sigma_d: float) -> Tensor:
        return model(kernel, sigma_d, check=False)

    return denoiser


def default_lambda(kind: str, kernel_size: int) -> float:
    """The tuned λ of a regulariser for kernels of side ``kernel_size``."""
    return DEFAULT_LAMBDA[bundled_size(kernel_size)][kind]

DenoiserFn = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(kernel [K, K], sigma_d) -> [K, K]`` (plug-and-play kernel prior, e.g. a
``models.kernel_denoiser.KernelDenoiser``); the M-step passes ``sigma_d`` as a 0-d tensor on the
kernel's device."""


class KernelSpectra(NamedTuple):
    """The loop-invariant sums of the Z-update, ``[H, W//2 + 1]`` each."""

    cross: Tensor  # Σ_{i,c} conj(F x^i_c) · F y_c   (complex)
    energy: Tensor  # Σ_{i,c} |F x^i_c|²              (real)
    particles: int
    channels: int


def kernel_spectra(spec_y: Tensor, spec_x: Tensor, weight: Tensor | None = None) -> KernelSpectra:
    """The sums of Eq. 24 from half spectra: spec_y ``[C, H, Wh]`` (or one target per particle,
    ``[n, C, H, Wh]``), spec_x ``[n, C, H, Wh]``; ``weight`` (``[H, Wh]``, e.g.
    ``gradient_weight``) weighs each frequency of the fit."""
    from . import ops  # lazily (module docstring)

    cross, energy = ops.spectral_sums(spec_y, spec_x)
    if weight is not None:
        cross, energy = cross * weight, energy * weight
    return KernelSpectra(cross, energy, spec_x.shape[0], spec_x.shape[1])


def gradient_weight(shape: tuple[int, int], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``(|F∂_h|² + |F∂_v|²)/4`` per frequency ``[H, W//2+1]`` (forward differences; mean 1 over
    the full spectrum): fitting the kernel on the images' gradients instead of the images."""
    height, width = shape
    wy = torch.fft.fftfreq(height, device=device, dtype=dtype)[:, None]
    wx = torch.fft.rfftfreq(width, device=device, dtype=dtype)[None, :]
    return torch.sin(torch.pi * wy).square() + torch.sin(torch.pi * wx).square()


MAX_ITERS = 1000  # HQS iterations per M-step (10 by default)
MAX_WEIGHT = 1e12  # β, λ and the ridge scale: far beyond use, within float32 once multiplied


@dataclass(frozen=True)
class HQSConfig:
    """Settings of the M-step. ``lam=None`` takes ``default_lambda`` when validated.

    ``regularizer`` is ``"pnp"``, ``"l1"``, ``"l2"``, ``"none"`` or a callable kernel denoiser
    ``D(kernel, sigma_d)`` used as the plug-and-play prior. ``"pnp"`` needs ``denoiser``
    (``bundled_denoiser`` gives the project's). Three settings concern the blind loop only, where
    the M-step fits the network's x̂0 (the module docstring says why, python/evaluate.py measured
    it): ``ridge`` scales the App. D ridge (default 0: off), ``gradient`` fits the kernel on the
    images' gradients (default on), ``coupling_floor`` is the least σ the coupling ``nσ²β`` is
    computed with (default 10/255). ``estimate_kernel`` fits a sharp image and uses none of them.
    """

    iters: int = 10
    beta: float = 1e5
    lam: float | None = None
    regularizer: str | DenoiserFn = "pnp"
    denoiser: DenoiserFn | None = None
    ridge: float = 0.0
    gradient: bool = True
    coupling_floor: float = 10 / 255

    @property
    def kind(self) -> str:
        return "pnp" if callable(self.regularizer) else str(self.regularizer)

    @property
    def weight(self) -> float:
        """λ (the 33×33 default before ``validate`` has filled it in)."""
        return default_lambda(self.kind, 33) if self.lam is None else float(self.lam)

    def validate(self, kernel_size: int = 33) -> HQSConfig:
        """Check every field; fill ``lam`` with the default for ``kernel_size``."""
        if not callable(self.regularizer) and self.regularizer not in REGULARIZERS:
            raise ValueError(
                f"regularizer must be one of {REGULARIZERS} or a callable denoiser(kernel, "
                f"sigma_d), got {self.regularizer!r}"
            )
        if (isinstance(self.iters, bool) or not isinstance(self.iters, numbers.Integral)
                or not 1 <= self.iters <= MAX_ITERS):
            raise ValueError(f"iters must be an integer in [1, {MAX_ITERS}], got {self.iters!r}")
        for name in ("beta", "lam", "ridge", "coupling_floor"):
            value = getattr(self, name)
            if (value is None and name != "lam") or (value is not None and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0 < self.beta <= MAX_WEIGHT:
            raise ValueError(f"beta must be in (0, {MAX_WEIGHT:g}], got {self.beta}")
        if not 0 <= self.ridge <= MAX_WEIGHT:
            raise ValueError(f"ridge must be in [0, {MAX_WEIGHT:g}], got {self.ridge}")
        if not 0 <= self.coupling_floor < 1:
            raise ValueError(f"coupling_floor must be in [0, 1), got {self.coupling_floor}")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"lam must be in [0, {MAX_WEIGHT:g}], got {self.lam}")
        if self.kind == "pnp" and self.kernel_denoiser is None:
            raise ValueError(
                "regularizer='pnp' needs a kernel denoiser: pass denoiser=, a callable "
                "regularizer, or use 'l1', 'l2' or 'none'"
            )
        lam = default_lambda(self.kind, kernel_size) if self.lam is None else float(self.lam)
        return replace(self, iters=int(self.iters), lam=lam)

    @property
    def kernel_denoiser(self) -> DenoiserFn | None:
        return self.regularizer if callable(self.regularizer) else self.denoiser


def hqs(spectra: KernelSpectra, kernel: Tensor, sigma: float, config: HQSConfig,
        shape: tuple[int, int], ridge_r2: Tensor | float | None = None,
        step: Tensor | None = None) -> Tensor:
    """``J`` HQS iterations from ``kernel`` ``[K, K]``, then re-centring. Returns ``[K, K]``.

    sigma: noise level in the units of ``y``; ridge_r2: ``r²`` of the ΠGDM variant in the same
    units: ``None`` (point particles), a float, or a per-step table ``[S]`` read at ``step`` (a 0-d
    int64 device tensor; then nothing here touches the host). ``config`` must be validated.
    """
    from . import ops  # lazily (module docstring)

    terms = hqs_terms(config, spectra.particles, spectra.channels, shape, sigma, ridge_r2)
    shift, step = ops.table_index(terms.shift, kernel, step)
    threshold = terms.sigma_d**2 if config.kind == "l1" else 0.0  # ℓ1: soft threshold at λ/β
    denoiser = config.kernel_denoiser if config.kind == "pnp" else None
    if denoiser is not None:
        noise = wiener_noise_std(spectra.energy, spectra.energy + at(shift, step), sigma, shape,
                                 spectra.particles)
        sigma_d = (terms.sigma_d**2 + noise.square()).sqrt()
    grid = kernel_grid(kernel, shape)
    for j in range(config.iters):
        spectrum = ops.wiener_z(spectra.cross, spectra.energy, torch.fft.rfft2(grid), shift, step,
                                terms.coupling)
        z = torch.fft.irfft2(spectrum, s=shape)
        if denoiser is not None:  # Eq. 25: the denoiser between two projections
            kernel, _ = ops.kernel_project(z, kernel)
            z = kernel_grid(denoiser(kernel, sigma_d), shape)
        kernel, grid = ops.kernel_project(z, kernel, threshold, recenter=j == config.iters - 1)
    return kernel


def wiener_noise_std(energy: Tensor, denominator: Tensor, sigma: float | Tensor,
                     shape: tuple[int, int], particles: int = 1) -> Tensor:
    """``σ_z``: the per-pixel standard deviation of the observation noise in the Z-update's ``z``
    (module docstring). energy, denominator: ``[..., H, W//2+1]`` half spectra; returns ``[...]``.
    """
    height, width = shape
    columns = (energy / denominator.square()).sum(dim=-2)  # [..., W//2+1]
    # Every column of the half spectrum stands for itself and its mirror image, except column 0
    # and, for an even width, the Nyquist column. (Slices only: an item assignment would copy a
    # host scalar to the device, which CUDA-graph capture forbids.)
    total = 2.0 * columns.sum(dim=-1) - columns[..., 0]
    if width % 2 == 0:
        total = total - columns[..., -1]
    return (particles * total / (height * width)).sqrt() * sigma


class HQSTerms(NamedTuple):
    """The scalars of one M-step (floats, or tensors where ``ridge_r2`` is one)."""

    coupling: float | Tensor  # nσ²β: the previous kernel's weight in Eq. 24's numerator
    shift: float | Tensor  # what Eq. 24's denominator adds to Σ|X|²
    sigma_d: float  # √(λ/β): ℓ1's threshold root, PnP's floor under σ_z; a float: no host copy


def hqs_terms(config: HQSConfig, particles: int, channels: int, shape: tuple[int, int],
              sigma: float | Tensor, ridge_r2: Tensor | float | None = None) -> HQSTerms:
    """``shift = nσ_c²β [+ nσ²λ for ℓ2] [+ nCN·r² for the ΠGDM ridge]`` (module docstring), with
    ``σ_c = max(σ, coupling_floor)``."""
    floor = config.coupling_floor
    sigma_c = sigma.clamp_min(floor) if isinstance(sigma, Tensor) else max(sigma, floor)
    coupling = particles * sigma_c**2 * config.beta
    shift = coupling
    if config.kind == "l2":
        shift = shift + particles * sigma**2 * config.weight
    if ridge_r2 is not None:
        shift = shift + particles * channels * shape[0] * shape[1] * ridge_r2
    return HQSTerms(coupling, shift, (config.weight / config.beta) ** 0.5)


def estimate_kernel(sharp: Tensor, blurry: Tensor, sigma: float, *, kernel_size: int = 33,
                    regularizer: str | DenoiserFn = "pnp", iters: int = 10,
                    lam: float | None = None, beta: float = 1e5,
                    denoiser: DenoiserFn | None = None, init: Tensor | None = None) -> Tensor:
    """Non-blind kernel estimation: the M-step alone, from a sharp/blurry pair.

    sharp: ``[C, H, W]`` (or ``[n, C, H, W]`` particles) in [0, 1]; blurry: ``[C, H, W]``;
    sigma: the noise level of ``blurry`` in [0, 1] units. ``init`` (``[K, K]``) defaults to a
    Gaussian of standard deviation ``K/16``. Returns the kernel ``[K, K]`` (sum 1, centred), in
    float32 for half-precision inputs, else in the inputs' (promoted) dtype.
    """
    blurry = check_image("blurry", blurry)
    sharp = check_image("sharp", sharp, batched=None)
    particles = sharp if sharp.dim() == 4 else sharp[None]
    if particles.shape[1:] != blurry.shape:
        raise ValueError(
            f"sharp {tuple(sharp.shape)} and blurry {tuple(blurry.shape)} must have the same "
            "channels and size"
        )
    if particles.device != blurry.device:
        raise ValueError(f"sharp ({particles.device}) and blurry ({blurry.device}) must be on "
                         "the same device")
    if blurry.dtype in (torch.float16, torch.bfloat16) or particles.dtype != blurry.dtype:
        # the FFTs and the denoiser run in float32 or float64 (as run() does for half inputs)
        dtype = torch.promote_types(torch.promote_types(particles.dtype, blurry.dtype),
                                    torch.float32)
        particles, blurry = particles.to(dtype), blurry.to(dtype)
    sigma = check_sigma("sigma", sigma)
    size = check_kernel_size("kernel_size", kernel_size, tuple(blurry.shape[-2:]))
    if regularizer == "pnp" and denoiser is None:
        denoiser = bundled_denoiser(size, blurry.device)
    config = HQSConfig(iters=iters, beta=beta, lam=lam,
                       regularizer=regularizer, denoiser=denoiser,
                       coupling_floor=0.0).validate(size)
    if init is None:
        init = initial_kernel(size, device=blurry.device, dtype=blurry.dtype)
    else:
        init = check_kernel("init", init, blur=True)
        if init.shape[-1] != size:
            raise ValueError(f"init must be [{size}, {size}], got {tuple(init.shape)}")
        init = init.to(blurry)
    spectra = kernel_spectra(torch.fft.rfft2(blurry), torch.fft.rfft2(particles))
    return hqs(spectra, init, sigma, config, tuple(blurry.shape[-2:]))
