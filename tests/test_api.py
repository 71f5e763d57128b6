"""run(): inputs, outputs, reproducibility and every bad-input message (Gaussian prior: fast)."""

import numpy as np
import pytest
import torch

import fastem_ext
from fastem_ext import gaussian_kernel, run

FAST = {"prior": "gaussian", "steps": "4", "kernel_size": 5, "regularizer": "l2",
        "progress": False}


def _photo(shape=(3, 30, 41), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_run_returns_documented_shapes_and_info():
    result = run(_photo(), 0.02, particles=2, **FAST)
    assert result.image.shape == (3, 30, 41) and result.mean.shape == (3, 30, 41)
    assert result.particles.shape == (2, 3, 30, 41) and result.kernel.shape == (5, 5)
    assert abs(float(result.kernel.sum()) - 1) < 1e-5
    assert torch.equal(result.image, result.particles[0])
    torch.testing.assert_close(result.mean, result.particles.mean(0))
    info = result.info
    assert info["method"] == "fastem-pigdm" and info["steps"] == 4 and info["particles"] == 2
    assert info["sigma"] == 0.02 and not info["sigma_estimated"]
    assert info["seconds_total"] > 0 and info["reblur_rmse"] >= 0
    assert info["device"].startswith("cpu")


def test_grey_numpy_in_grey_out_and_sigma_estimated():
    grey = (np.random.default_rng(0).random((33, 35)) * 255).astype(np.uint8)
    result = run(grey, **FAST)
    assert result.image.shape == (1, 33, 35)
    assert result.info["sigma_estimated"] and 0 < result.info["sigma"] <= 0.5


def test_same_seed_same_output_other_seed_differs():
    a, b = run(_photo(), 0.02, seed=3, **FAST), run(_photo(), 0.02, seed=3, **FAST)
    c = run(_photo(), 0.02, seed=4, **FAST)
    assert torch.equal(a.image, b.image) and torch.equal(a.kernel, b.kernel)
    assert not torch.equal(a.image, c.image)


@pytest.mark.parametrize("method", ["fastem-dps", "diffem-pigdm"])
def test_other_blind_methods(method):
    result = run(_photo(), 0.02, method=method, rounds=2, **FAST)
    assert torch.isfinite(result.image).all() and result.kernel.shape == (5, 5)
    assert result.info["rounds"] == (2 if method == "diffem-pigdm" else 1)


@pytest.mark.parametrize("method", ["fastem-pigdm", "fastem-dps", "diffem-pigdm"])
def test_blind_estimates_are_recentred_below_a_pixel(method):
    """The kernel's centre of mass on its centre pixel, the images moved with it
    (``centring``); ``info["recentred"]`` says how far."""
    from fastem_ext.centring import centroid_offset

    args = {**FAST, "kernel_size": 7}
    result = run(_photo(), 0.02, method=method, rounds=2, **args)
    assert float(centroid_offset(result.kernel).abs().max()) < 0.1  # spiky ℓ2 kernels: 0.08
    moved = torch.tensor(result.info["recentred"], dtype=torch.float64)
    assert 0.05 < float(moved.abs().max()) < 1.5
    # the same run without the re-centring: its images, moved by the offset, are the result's
    # (up to the frame's borders, which the run moves on the whole grid)
    from fastem_ext import api
    from fastem_ext.centring import shift

    keep = lambda k, x=None: (k, x, torch.zeros(2, dtype=torch.float64))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "recentre", keep)
        plain = run(_photo(), 0.02, method=method, rounds=2, **args)
    assert plain.info["recentred"] == [0.0, 0.0] and not torch.equal(plain.kernel, result.kernel)
    inner = (..., slice(6, -6), slice(6, -6))
    expected = shift(plain.particles, moved).clamp(0, 1).float()
    off = float((result.particles - expected)[inner].abs().max())
    unmoved = float((result.particles - plain.particles)[inner].abs().max())
    assert off < 0.2 * unmoved, (off, unmoved)


@pytest.mark.parametrize("method", ["pigdm", "dps"])
def test_nonblind_methods_keep_the_given_kernel(method):
    kernel = torch.zeros(7, 7)
    kernel[2:5, 3:6] = torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) + 0.1
    kernel = kernel / kernel.sum()  # its centre of mass off the centre: kept, not recentred
    args = {**FAST, "kernel_size": 7}
    result = run(_photo(), 0.02, method=method, kernel=kernel, **args)
    torch.testing.assert_close(result.kernel, kernel)
    assert result.info["recentred"] is None
    with pytest.raises(ValueError, match="kernel="):
        run(_photo(), 0.02, method=method, **args)


def test_circular_boundary_keeps_the_grid():
    result = run(_photo((3, 32, 32)), 0.02, boundary="circular", **FAST)
    assert result.info["grid"] == [32, 32]
    assert run(_photo(), 0.02, **FAST).info["grid"] == [34, 45]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": 0.7}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"kernel_size": 16}, "kernel_size"),
        ({"particles": 0}, "particles"),
        ({"method": "magic"}, "method"),
        ({"boundary": "mirror"}, "boundary"),
        ({"regularizer": "tv"}, "regularizer"),
        ({"prior": "nonexistent"}, "prior"),
        ({"prior": "ffhq"}, "ffhq_10m.pt"),
        ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
        ({"steps": "abc"}, "steps"),
        ({"tile_steps": "abc"}, "tile_steps: steps 'abc'"),
        ({"seed": -1}, "seed"),
        ({"kernel": torch.zeros(5, 5)}, "kernel"),
        ({"blurry": torch.rand(3, 1, 30)}, "too small"),
        ({"blurry": torch.full((3, 30, 30), float("nan"))}, "NaN"),
        ({"blurry": "/no/such/file.png"}, "not found"),
        ({"mstep": {"iters": 3}}, "mstep"),
        ({"mstep": fastem_ext.HQSConfig(iters=0)}, "iters"),
        ({"callback": "print"}, "callback"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": 1e30}, "guidance_scale"),
        ({"guidance_scale": "2"}, "guidance_scale"),
        ({"guidance_scale": 0}, "guidance_scale"),
        ({"sigma": 1e-30}, "sigma"),
        ({"blurry": torch.rand(3, 30, 30, device="meta")}, "meta tensor"),
        ({"blurry": torch.rand(3, 30, 30).to_sparse()}, "dense"),
        ({"sigma": 1e-300}, "sigma"),
        ({"method": "pigdm", "kernel": torch.tensor([[0.5, -0.2], [0.4, 0.3]])}, "negative"),
        ({"method": "pigdm", "kernel": gaussian_kernel(7, 1.0)}, "disagrees with the given 7x7"),
        ({"prior": lambda x, t: None}, "must return eps"),
        ({"prior": lambda x, t: x[:, :1]}, "must return eps"),
        ({"prior": lambda x, t: x * float("nan")}, "NaN"),
        ({"prior": lambda x, t: x.reshape(-1)}, "must return eps"),
        ({"prior": lambda x, t: 1 / 0}, "ZeroDivisionError"),
        ({"mstep": fastem_ext.HQSConfig(regularizer=lambda k, s: None)}, "kernel denoiser"),
        ({"mstep": fastem_ext.HQSConfig(regularizer=lambda k, s: k[:-1])}, "kernel denoiser"),
        ({"mstep": fastem_ext.HQSConfig(regularizer=lambda k, s: k / 0 * 0)}, "kernel denoiser"),
    ],
)
def test_bad_input_gives_one_clear_value_error(kwargs, match, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEM_WEIGHTS", str(tmp_path))
    args = {"blurry": _photo(), "sigma": 0.02, **FAST}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run(args.pop("blurry"), args.pop("sigma"), **args)


def test_mstep_settings_and_step_callback():
    """``mstep=`` replaces the tuned M-step (its regulariser wins over ``regularizer``); the
    callback sees every step, x̂0 cropped to the photo's frame."""
    from fastem_ext import HQSConfig

    seen = []
    result = run(_photo(), 0.02, mstep=HQSConfig(regularizer="l1", lam=1.0, iters=2),
                 callback=lambda i, x0, k: seen.append((i, tuple(x0.shape), tuple(k.shape))),
                 **FAST)
    assert [i for i, *_ in seen] == [3, 2, 1, 0] * 3  # every step of the 3 restarts
    assert all(shape == (1, 3, 30, 41) and k == (5, 5) for _, shape, k in seen)
    assert result.info["regularizer"] == "l1"
    default = run(_photo(), 0.02, **FAST)
    assert not torch.equal(default.kernel, result.kernel)


def test_public_names():
    for name in ("run", "estimate_kernel", "blur", "motion_kernel", "metrics", "Result"):
        assert hasattr(fastem_ext, name)


def test_smallest_sigma_gives_a_finite_result():
    """σ down to ``LEAST_SIGMA`` (1e-4) runs; below it ``run()`` refuses (the NaN regime)."""
    from fastem_ext.checks import LEAST_SIGMA

    for method, extra in (("fastem-pigdm", {}), ("pigdm", {"kernel": gaussian_kernel(5, 1.0)})):
        result = run(_photo(), LEAST_SIGMA, method=method, **FAST, **extra)
        assert torch.isfinite(result.image).all() and torch.isfinite(result.kernel).all()


def test_blur_kernels_are_normalised_in_float64_and_rounding_negatives_dropped():
    huge = gaussian_kernel(5, 1.0) * 1e38  # float32 sums it to inf
    result = run(_photo(), 0.02, method="pigdm", kernel=huge, **FAST)
    torch.testing.assert_close(result.kernel, gaussian_kernel(5, 1.0))
    huger = torch.full((5, 5), 1e308, dtype=torch.float64)  # float64 sums it to inf
    result = run(_photo(), 0.02, method="pigdm", kernel=huger, **FAST)
    torch.testing.assert_close(result.kernel, torch.full((5, 5), 1 / 25))
    rounded = gaussian_kernel(5, 1.0)
    rounded[0, 0] = -1e-9
    result = run(_photo(), 0.02, method="pigdm", kernel=rounded, **FAST)
    assert float(result.kernel.min()) >= 0 and abs(float(result.kernel.sum()) - 1) < 1e-6


def test_a_prior_that_diverges_mid_run_is_an_error_not_a_nan_image():
    calls = []

    def eps(x, t):
        calls.append(1)
        return x * (float("nan") if len(calls) > 2 else 0.5)

    with pytest.raises(RuntimeError, match="NaN or infinite"):
        run(_photo(), 0.02, **{**FAST, "prior": eps})

