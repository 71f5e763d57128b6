import os

import pytest
import torch
from dense import circular_convolve, origin_kernel_matrix
from device_only import NoHostTensors
from ops_helpers import assert_float64_rule, generator, rand

from fastem_ext import blur, estimate_kernel, gaussian_kernel, metrics, ops
from fastem_ext.mstep import (
    HQSConfig,
    bundled_denoiser,
    default_lambda,
    gradient_weight,
    hqs,
    hqs_terms,
    kernel_spectra,
    wiener_noise_std,
)
from fastem_ext.ops.kernel_project import project_kernel, recenter_kernel
from fastem_ext.physics import otf2psf, psf2otf

HW, C = (6, 7), 3


def _dense_z(x, y, k_prev, sigma, beta, r2, lam):
    """Eq. 22 (times 2nσ², with the ℓ2 term nσ²λ‖z‖²) solved as one dense least-squares problem
    over the full-grid z (origin layout).

    The ΠGDM ridge is built from its definition, E_e[X_eᵀ X_e] = r² Σ_m X_{δm}ᵀ X_{δm} for
    white e ~ N(0, r² I), not from the closed form under test.
    """
    n = x.shape[0]
    n_pix = HW[0] * HW[1]
    k_origin = torch.fft.irfft2(psf2otf(k_prev, HW), s=HW).reshape(-1)
    lhs = n * sigma**2 * (beta + lam) * torch.eye(n_pix, dtype=torch.float64)
    rhs = n * sigma**2 * beta * k_origin
    impulse_gram = torch.zeros(n_pix, n_pix, dtype=torch.float64)
    for m in range(n_pix):
        delta = torch.zeros(n_pix, dtype=torch.float64)
        delta[m] = 1
        xm = origin_kernel_matrix(delta.reshape(HW))
        impulse_gram += xm.T @ xm
    for i in range(n):
        for c in range(C):
            xc = origin_kernel_matrix(x[i, c])
            lhs += xc.T @ xc + r2 * impulse_gram
            rhs += xc.T @ (y[i] if y.dim() == 4 else y)[c].reshape(-1)
    return torch.linalg.solve(lhs, rhs).reshape(HW)


def test_z_update_of_a_batched_observation_is_the_joint_fit_of_its_images():
    """A batched ``Observation`` (one image per particle: crops of one photo) gives the Z-update
    of one kernel fitted to all pairs ``(x^i, y^i)`` jointly (dense least squares), not to one."""
    from fastem_ext.observation import Observation

    g = torch.Generator().manual_seed(11)
    x = torch.rand(3, C, *HW, generator=g, dtype=torch.float64)
    kernels = torch.rand(3, 3, 3, generator=g, dtype=torch.float64)
    y = torch.stack([circular_convolve(x[i], kernels[i] / kernels[i].sum()) for i in range(3)])
    k_prev = torch.rand(3, 3, generator=g, dtype=torch.float64)
    k_prev = k_prev / k_prev.sum()
    obs = Observation(y, 0.05)
    spec_x = torch.fft.rfft2(x)
    spectra = kernel_spectra(obs.target_spectrum(spec_x, k_prev), spec_x)
    config = HQSConfig(regularizer="none", beta=40.0).validate(3)
    terms = hqs_terms(config, 3, C, HW, 0.05)
    shift, step = ops.table_index(terms.shift, k_prev)
    z = torch.fft.irfft2(ops.wiener_z(spectra.cross, spectra.energy, psf2otf(k_prev, HW), shift,
                                      step, terms.coupling), s=HW)
    torch.testing.assert_close(z, _dense_z(x, y, k_prev, 0.05, 40.0, 0.0, 0.0), rtol=1e-9,
                               atol=1e-11)
    assert (z - _dense_z(x, y[0], k_prev, 0.05, 40.0, 0.0, 0.0)).abs().max() > 1e-3


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("r2", [None, 0.05])
@pytest.mark.parametrize("regularizer", ["none", "l2"])
def test_z_update_equals_dense_least_squares(n, r2, regularizer):
    """The code's own Z-update (``kernel_spectra``, ``hqs_terms``' shift and ``ops.wiener_z``, in
    float64) against Eq. 22 solved densely, ΠGDM ridge and ℓ2 term included."""
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, C, *HW, generator=g, dtype=torch.float64)
    k_true = torch.rand(3, 3, generator=g, dtype=torch.float64)
    y = circular_convolve(x[0], k_true / k_true.sum()) + 0.05 * torch.randn(C, *HW, generator=g,
                                                                            dtype=torch.float64)
    k_prev = torch.rand(3, 3, generator=g, dtype=torch.float64)
    k_prev = k_prev / k_prev.sum()
    sigma, beta, lam = 0.05, 40.0, 7.0
    spectra = kernel_spectra(torch.fft.rfft2(y), torch.fft.rfft2(x))
    config = HQSConfig(regularizer=regularizer, beta=beta, lam=lam).validate(3)
    terms = hqs_terms(config, n, C, HW, sigma, r2)
    shift, step = ops.table_index(terms.shift, k_prev)
    spectrum = ops.wiener_z(spectra.cross, spectra.energy, psf2otf(k_prev, HW), shift, step,
                            terms.coupling)
    z = torch.fft.irfft2(spectrum, s=HW)
    expected = _dense_z(x, y, k_prev, sigma, beta, r2 or 0.0, lam if regularizer == "l2" else 0.0)
    torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-11)


def test_projection_and_fallback():
    z = torch.tensor([[-1.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(project_kernel(z, z), torch.tensor([[0.0, 0.5], [0.25, 0.25]]))
    fallback = torch.full((2, 2), 0.25)
    torch.testing.assert_close(project_kernel(-z.abs(), fallback), fallback)


def test_recenter_moves_the_centre_of_mass_to_the_middle():
    k = torch.zeros(9, 9)
    k[1, 6], k[2, 7] = 0.5, 0.5  # centre of mass (1.5, 6.5)
    out = recenter_kernel(k)
    idx = torch.arange(9.0)
    com = ((out.sum(1) * idx).sum(), (out.sum(0) * idx).sum())
    assert abs(float(com[0]) - 4) <= 0.5 and abs(float(com[1]) - 4) <= 0.5
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))
    assert torch.equal(recenter_kernel(out), out)  # idempotent once centred


def _spectra(y, x):
    return kernel_spectra(torch.fft.rfft2(y), torch.fft.rfft2(x))


def test_l2_is_not_a_no_op_and_l1_sparsifies():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    y = blur(x[0], gaussian_kernel(7, 1.2)) + 0.05 * torch.randn(3, 32, 32, generator=g)
    spectra, init = _spectra(y, x), gaussian_kernel(7, 2.0)
    none = hqs(spectra, init, 0.05, HQSConfig(regularizer="none"), (32, 32))
    l2 = hqs(spectra, init, 0.05, HQSConfig(regularizer="l2", lam=1e5), (32, 32))
    l1 = hqs(spectra, init, 0.05, HQSConfig(regularizer="l1", lam=300.0), (32, 32))
    assert float((none - l2).abs().max()) > 1e-3
    assert int((l1 > 0).sum()) < int((none > 0).sum())


def test_pnp_calls_the_denoiser_with_sigma_d():
    calls = []

    def denoiser(kernel, sigma_d):
        calls.append(float(sigma_d))
        return kernel.square()  # sharpens: visibly changes the result

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    y = blur(x[0], gaussian_kernel(7, 1.0))
    spectra, init = _spectra(y, x), gaussian_kernel(7, 2.0)
    out = hqs(spectra, init, 0.02, HQSConfig(regularizer=denoiser, lam=4.0, beta=1e4, iters=3),
              (32, 32))
    coupling = (10 / 255) ** 2 * 1e4  # σ = 0.02 is under the coupling floor, 10/255
    noise = wiener_noise_std(spectra.energy, spectra.energy + coupling, 0.02, (32, 32))
    assert calls == pytest.approx([(4.0 / 1e4 + float(noise) ** 2) ** 0.5] * 3)
    plain = hqs(spectra, init, 0.02, HQSConfig(regularizer="none", beta=1e4, iters=3), (32, 32))
    assert float((out - plain).abs().max()) > 1e-3


def _stroke_kernel(size: int) -> torch.Tensor:
    """A curved camera-shake-like stroke, anti-aliased, centred."""
    k = torch.zeros(size, size, dtype=torch.float64)
    s = torch.linspace(0, 1, 400, dtype=torch.float64)
    rows = size // 2 + (size * 0.3) * torch.sin(2.2 * s) - 0.2 * size
    cols = size // 2 + (size * 0.35) * (s - 0.5) * 2 + 2.0 * torch.sin(9 * s)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        r0, c0 = int(r), int(c)
        fr, fc = r - r0, c - c0
        k[r0, c0] += (1 - fr) * (1 - fc)
        k[r0 + 1, c0] += fr * (1 - fc)
        k[r0, c0 + 1] += (1 - fr) * fc
        k[r0 + 1, c0 + 1] += fr * fc
    return recenter_kernel((k / k.sum()).float())


@pytest.mark.parametrize("regularizer", ["none", "l2"])
@pytest.mark.parametrize("noise", [5, 10])
def test_estimate_kernel_recovers_camera_shake(val_crop, regularizer, noise):
    kernel = _stroke_kernel(33)
    sigma = noise / 255
    g = torch.Generator().manual_seed(noise)
    blurry = blur(val_crop, kernel) + sigma * torch.randn(val_crop.shape, generator=g)
    estimate = estimate_kernel(val_crop, blurry, sigma, regularizer=regularizer)
    mse = float(metrics.kernel_mse(estimate, kernel))
    baseline = float(metrics.kernel_mse(gaussian_kernel(33, 33 / 16), kernel))
    assert mse <= 1.5e-5, (mse, baseline)
    assert abs(float(estimate.sum()) - 1) < 1e-5 and float(estimate.min()) >= 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"kernel_size": 17}, "kernel_size"),
        ({"regularizer": "tv"}, "regularizer"),
        ({"iters": 0}, "iters"),
        ({"blurry": torch.rand(3, 30, 32)}, "same"),
        ({"sharp": torch.rand(3, 32, 32, device="meta")}, "meta tensor"),
        ({"blurry": torch.rand(3, 32, 32).to_sparse()}, "dense"),
        ({"blurry": torch.full((3, 32, 32), float("inf"))}, "blurry"),
        ({"lam": "x"}, "lam must be a number"),
        ({"iters": 2.5}, "iters"),
    ],
)
def test_estimate_kernel_rejects_bad_input(kwargs, match):
    args = {"sharp": torch.rand(3, 32, 32), "blurry": torch.rand(3, 32, 32), "sigma": 0.05,
            "kernel_size": 7, "regularizer": "none"}
    args.update(kwargs)
    sharp, blurry, sigma = args.pop("sharp"), args.pop("blurry"), args.pop("sigma")
    with pytest.raises(ValueError, match=match):
        estimate_kernel(sharp, blurry, sigma, **args)


def test_estimate_kernel_takes_half_precision_mixed_dtypes_and_numpy_numbers():
    """Half inputs are estimated in float32 (as run() treats them), mixed dtypes in the wider
    one, numpy integers and floats count as numbers; the result matches float32's."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    sharp = torch.rand(3, 32, 32, generator=g)
    blurry = blur(sharp, gaussian_kernel(5, 1.0), "circular")
    args = {"kernel_size": 5, "regularizer": "l2", "iters": 3}
    reference = estimate_kernel(sharp, blurry, 0.02, **args)
    for dtype in (torch.float16, torch.bfloat16):
        half = estimate_kernel(sharp.to(dtype), blurry.to(dtype), 0.02, **args)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, reference, atol=2e-3, rtol=0)
    assert estimate_kernel(sharp.double(), blurry, 0.02, **args).dtype == torch.float64
    numpy_args = {"kernel_size": np.int64(5), "regularizer": "l2", "iters": np.int32(3),
                  "lam": np.float32(default_lambda("l2", 5)), "beta": np.float64(1e5)}
    torch.testing.assert_close(estimate_kernel(sharp, blurry, np.float64(0.02), **numpy_args),
                               reference)


def test_pnp_defaults_to_the_bundled_denoiser_and_tuned_lambda(val_crop):
    from fastem_ext.mstep import default_lambda

    assert HQSConfig(regularizer="l1").validate(64).lam == default_lambda("l1", 64)
    assert default_lambda("pnp", 33) != default_lambda("pnp", 64)
    kernel = _stroke_kernel(33)
    blurry = blur(val_crop, kernel) + 10 / 255 * torch.randn(
        val_crop.shape, generator=torch.Generator().manual_seed(3))
    pnp = estimate_kernel(val_crop, blurry, 10 / 255)
    none = estimate_kernel(val_crop, blurry, 10 / 255, regularizer="none")
    assert float(metrics.kernel_mse(pnp, kernel)) < 0.5 * float(metrics.kernel_mse(none, kernel))


def test_crop_layout_matches_psf2otf():
    k = torch.rand(5, 5)
    full = torch.fft.irfft2(psf2otf(k, (12, 12)), s=(12, 12))
    torch.testing.assert_close(otf2psf(full, 5), k)


@pytest.mark.parametrize("shape", [(16, 16), (12, 15)])
def test_wiener_noise_std_is_the_std_of_the_noise_in_z(shape):
    """σ_z against the empirical per-pixel std of the Z-update applied to pure noise."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, *shape, generator=g, dtype=torch.float64)
    spec_x = torch.fft.rfft2(x)
    energy = spec_x.abs().square().sum(dim=(0, 1))
    denominator = energy + 5.0
    sigma, draws = 0.1, 4000
    noise = sigma * torch.randn(draws, 3, *shape, generator=g, dtype=torch.float64)
    z = torch.fft.irfft2((spec_x.conj() * torch.fft.rfft2(noise)).sum(1) / denominator, s=shape)
    expected = wiener_noise_std(energy, denominator, sigma, shape)
    assert float(z.std()) == pytest.approx(float(expected), rel=0.03)


@pytest.mark.parametrize("regularizer", ["pnp", "l1"])
@pytest.mark.parametrize("ridge", [False, True])
def test_mstep_touches_only_device_tensors(regularizer, ridge):
    """What CUDA-graph capture needs (tested on a GPU by test_engine's capture test)."""
    device = "meta"
    x, y = torch.rand(1, 3, 64, 64).to(device), torch.rand(3, 64, 64).to(device)
    denoiser = bundled_denoiser(33, device) if regularizer == "pnp" else None
    config = HQSConfig(regularizer=regularizer, denoiser=denoiser, iters=2).validate(33)
    spectra, init = _spectra(y, x), gaussian_kernel(33, 2.0, device=device)
    table = torch.ones(4, device=device) if ridge else None
    with NoHostTensors():
        kernel = hqs(spectra, init, 0.05, config, (64, 64), ridge_r2=table,
                     step=torch.ones((), dtype=torch.int64, device=device))
    assert kernel.shape == (33, 33) and kernel.device.type == device


@pytest.mark.parametrize("regularizer", ["l1", "l2", "none", "pnp"])
@pytest.mark.parametrize("n", [1, 3])
def test_hqs_on_the_fused_ops_matches_the_reference(fused_backend, regularizer, n):
    """The whole M-step (ten projections with clamps compound rounding) under each backend
    against the same code on the references, by the float64 rule of the single ops."""
    g = generator(n, regularizer)
    shape = (16, 12)
    x = rand((n, C, *shape), g, fused_backend)
    truth = rand((5, 5), g, fused_backend)
    y = blur(x[0], truth / truth.sum()) + 0.01 * rand((C, *shape), g, fused_backend)
    spectra = _spectra(y, x)
    ridge, step = rand((4,), g, fused_backend) * 1e-3, torch.tensor(2, device=fused_backend)
    denoiser = bundled_denoiser(7, fused_backend) if regularizer == "pnp" else None
    config = HQSConfig(regularizer=regularizer, denoiser=denoiser,
                       lam={"l1": 1e2}.get(regularizer)).validate(7)
    init = gaussian_kernel(7, 1.0, device=fused_backend)
    backend = os.environ["FASTEM_BACKEND"]

    def reference(cross, energy, kernel, table):
        os.environ["FASTEM_BACKEND"] = "reference"  # float64 always runs the references
        try:
            return hqs(spectra._replace(cross=cross, energy=energy), kernel, 0.05, config, shape,
                       ridge_r2=table, step=step)
        finally:
            os.environ["FASTEM_BACKEND"] = backend

    fused = hqs(spectra, init, 0.05, config, shape, ridge_r2=ridge, step=step)
    assert fused.shape == (7, 7) and abs(fused.sum().item() - 1) < 1e-5
    assert_float64_rule(fused, reference, (spectra.cross, spectra.energy, init, ridge))


def test_bundled_denoiser_size_split():
    from fastem_ext.models.kernel_denoiser import bundled_size, bundled_weights_path

    assert [bundled_size(k) for k in (3, 33, 48, 49, 64, 128)] == [33, 33, 33, 64, 64, 64]
    assert bundled_weights_path(48).name == "kernel_denoiser_33.safetensors"
    assert bundled_weights_path(49).name == "kernel_denoiser_64.safetensors"


def test_gradient_spectra_are_the_spectra_of_finite_differences():
    """Weighting each frequency by (|F∂_h|² + |F∂_v|²)/4 is fitting the kernel on the images'
    forward differences (circular), horizontal and vertical together."""
    g = torch.Generator().manual_seed(0)
    y, x = torch.rand(3, 20, 17, generator=g), torch.rand(2, 3, 20, 17, generator=g)

    def diffs(a):
        return [a - a.roll(1, -1), a - a.roll(1, -2)]

    parts = [_spectra(dy, dx) for dy, dx in zip(diffs(y), diffs(x), strict=True)]
    ours = kernel_spectra(torch.fft.rfft2(y), torch.fft.rfft2(x), gradient_weight((20, 17), "cpu"))
    close = dict(rtol=2e-5, atol=1e-3)
    torch.testing.assert_close(ours.cross, (parts[0].cross + parts[1].cross) / 4, **close)
    torch.testing.assert_close(ours.energy, (parts[0].energy + parts[1].energy) / 4, **close)


def test_coupling_floor_keeps_the_coupling_of_the_floor_below_it():
    """The blind loop's coupling nσ²β uses max(σ, coupling_floor); the ℓ2 term keeps σ."""
    from fastem_ext.mstep import HQSConfig, hqs_terms

    config = HQSConfig(regularizer="l2", lam=2.0, coupling_floor=0.04).validate(9)
    low = hqs_terms(config, 2, 3, (8, 8), 0.01)
    assert low.coupling == pytest.approx(2 * 0.04**2 * 1e5)
    assert low.shift == pytest.approx(low.coupling + 2 * 0.01**2 * 2.0)
    high = hqs_terms(config, 2, 3, (8, 8), torch.tensor(0.05))
    assert float(high.coupling) == pytest.approx(2 * 0.05**2 * 1e5)
    off = hqs_terms(HQSConfig(regularizer="none", coupling_floor=0.0).validate(9), 1, 3, (8, 8),
                    0.01)
    assert off.coupling == pytest.approx(0.01**2 * 1e5)
    with pytest.raises(ValueError, match="coupling_floor"):
        HQSConfig(regularizer="none", coupling_floor=-0.1).validate(9)
