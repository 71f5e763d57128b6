"""The crops + tiles path: batched observations, run()'s automatic choice, its bounds and errors
(Gaussian prior, tiny images: fast)."""

import pytest
import torch

from fastem_ext import blur, gaussian_kernel, metrics, motion_kernel, run
from fastem_ext.models import GaussianPrior
from fastem_ext.mstep import HQSConfig
from fastem_ext.observation import Observation
from fastem_ext.samplers import fast_em, nonblind
from fastem_ext.schedule import Schedule
from fastem_ext.settings import on_crops_path

PRIOR = GaussianPrior(variance=0.05, f0=0.05)
FAST = {"prior": "gaussian", "steps": "4", "kernel_size": 5, "regularizer": "l2",
        "progress": False}


def _photo(shape=(3, 70, 100), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sampler", ["fast_em", "nonblind"])
def test_a_batch_of_identical_images_runs_as_one_shared_observation(masked, sampler):
    """n copies of one image as a batched observation: the same particles and kernel as the
    shared observation with n particles (same noise), masked or not."""
    g = torch.Generator().manual_seed(3)
    y = torch.rand(3, 32, 32, generator=g)
    mask = (torch.rand(1, 32, 32, generator=g) > 0.2).float() if masked else None
    shared = Observation(y, 0.05, mask)
    batched = Observation(y.expand(3, -1, -1, -1).clone(), 0.05,
                          None if mask is None else mask.expand(3, -1, -1, -1).clone())

    def go(obs):
        common = dict(schedule=Schedule("5"), particles=3,
                      generator=torch.Generator().manual_seed(9))
        if sampler == "fast_em":
            return fast_em(PRIOR, obs, gaussian_kernel(7, 1.0),
                           mstep=HQSConfig(regularizer="l2").validate(7), **common)
        return nonblind(PRIOR, obs, gaussian_kernel(7, 1.0), **common)

    one, many = go(shared), go(batched)
    torch.testing.assert_close(many.particles, one.particles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.kernel, one.kernel, rtol=1e-5, atol=1e-6)


def test_a_batched_observation_guides_each_particle_by_its_own_image():
    """Non-blind: particle i of a batch follows y[i]: swapping the images swaps the results."""
    g = torch.Generator().manual_seed(5)
    kernel = gaussian_kernel(5, 1.0)
    sharp = (PRIOR.sample((2, 3, 32, 32), generator=g) + 1) / 2
    y = blur(sharp, kernel) + 0.02 * torch.randn(sharp.shape, generator=g)
    out = nonblind(PRIOR, Observation(y, 0.02), kernel, schedule=Schedule("20"), particles=2,
                   generator=torch.Generator().manual_seed(1)).particles
    for i in range(2):
        assert float(metrics.psnr(out[i], sharp[i])) > float(metrics.psnr(out[i], sharp[1 - i])) + 3


def test_a_batched_observation_needs_one_particle_per_image():
    obs = Observation(torch.rand(2, 3, 16, 16), 0.05)
    with pytest.raises(ValueError, match="particles=2"):
        nonblind(PRIOR, obs, gaussian_kernel(3, 1.0), schedule=Schedule("2"), particles=3,
                 generator=torch.Generator())


def test_run_picks_the_crops_path_above_the_working_size_and_reports_it():
    small = run(_photo((3, 40, 44)), 0.02, working_size=48, **FAST)
    assert small.info["path"] == "whole image" and "stages" not in small.info
    result = run(_photo(), 0.02, working_size=48, tile_steps="3", crops=2, **FAST)
    info = result.info
    assert info["path"] == "crops + tiles" and result.image.shape == (3, 70, 100)
    crops, tiles = info["stages"]["crops"], info["stages"]["tiles"]
    assert len(crops["boxes"]) == 2 and crops["window"] == [44, 44] and crops["steps"] == 4
    assert tiles["steps"] == 3 and tiles["count"] >= 4 and tiles["seconds"] > 0
    assert result.info["steps"] == 4 and result.info["tile_steps"] == 3
    assert result.kernel.shape == (5, 5) and abs(float(result.kernel.sum()) - 1) < 1e-5
    from fastem_ext.centring import centroid_offset  # the crops' kernel re-centred, then tiles
    assert len(info["recentred"]) == 2
    assert float(centroid_offset(result.kernel).abs().max()) < 0.1
    whole = run(_photo(), 0.02, working_size=48, full_diffusion=True, **FAST)
    assert whole.info["path"] == "whole image"


@pytest.mark.parametrize("hw, crops, on_crops", [
    ((48, 300), 3, True),    # 14400 pixels > 3 crops of 44²
    ((44, 88), 2, False),    # 3872 pixels = 2 crops of 44²: the crops would cover it
    ((45, 88), 2, True),     # one row more
    ((44, 88), 1, True),
    ((40, 48), 1, False),    # within the working size
])
def test_the_crops_path_starts_where_the_crops_would_not_cover_the_photo(hw, crops, on_crops):
    """Blind methods; a non-blind one (no crops) tiles every photo above the working size."""
    settings = dict(working_size=48, kernel_size=5, boundary="valid", full_diffusion=False)
    assert on_crops_path(hw, crops=crops, fast=False, blind=True, **settings) is on_crops
    assert on_crops_path(hw, crops=crops, fast=False, blind=False, **settings) is (max(hw) > 48)
    assert on_crops_path(hw, crops=crops, fast=True, blind=True, **settings)
    assert not on_crops_path(hw, crops=crops, fast=False, blind=True,
                             **{**settings, "full_diffusion": True})


def test_run_restores_a_photo_its_crops_would_cover_whole():
    result = run(_photo((3, 44, 88)), 0.02, working_size=48, crops=2, **FAST)
    assert result.info["path"] == "whole image"
    assert run(_photo((3, 45, 88)), 0.02, working_size=48, crops=2, tile_steps="2",
               **FAST).info["path"] == "crops + tiles"


def test_tiles_and_the_whole_image_agree_on_a_small_image():
    """Non-blind ΠGDM with the true kernel (exact Gaussian prior, valid blur): the tiled
    restoration is as close to the truth as the whole-image one, and closer to it than either
    is to the truth."""
    g = torch.Generator().manual_seed(0)
    kernel = gaussian_kernel(5, 1.2)
    scene = (PRIOR.sample((1, 3, 84, 120), generator=g)[0] + 1) / 2
    sharp = scene[:, 2:-2, 2:-2]
    blurry = blur(scene, kernel, "valid") + 0.01 * torch.randn(sharp.shape, generator=g)
    common = dict(method="pigdm", kernel=kernel, prior=PRIOR, steps="50", tile_steps="50",
                  particles=4, progress=False, working_size=48, max_batch=16)
    tiled = run(blurry, 0.01, **common)
    whole = run(blurry, 0.01, full_diffusion=True, **common)
    assert tiled.info["path"] == "tiles" and tiled.info["stages"]["tiles"]["count"] >= 6
    psnr_tiled = float(metrics.psnr(tiled.mean, sharp))
    psnr_whole = float(metrics.psnr(whole.mean, sharp))
    # measured: blurry 22.97, tiled 23.66, whole 23.58 dB; tiled against whole 29.3 dB
    assert psnr_tiled > float(metrics.psnr(blurry, sharp)) + 0.4
    assert abs(psnr_tiled - psnr_whole) < 0.5
    assert float(metrics.psnr(tiled.mean, whole.mean)) > max(psnr_tiled, psnr_whole) + 3


def test_small_images_ignore_the_crops_path_settings():
    result = run(_photo((3, 40, 40)), 0.02, particles=3, max_batch=1, working_size=64,
                 **{**FAST, "kernel_size": 17})  # 64 < 4 × 17: too small for tiles, unused
    assert result.info["path"] == "whole image" and result.particles.shape[0] == 3


def _counting_prior(batches: list[int]):
    """``PRIOR``, recording each call's batch size in ``batches``."""

    def eps(x, t):
        batches.append(x.shape[0])
        return PRIOR(x, t)

    return eps


def test_the_default_batch_holds_the_crops_of_many_particles():
    """max_batch=None (the default): 8 inputs per call, or crops × particles where more."""
    batches = []
    eps = _counting_prior(batches)
    result = run(_photo((3, 70, 100)), 0.02, prior=eps, steps="2", kernel_size=5,
                 regularizer="l2", progress=False, working_size=48, particles=4,
                 tile_steps="2")  # 3 crops × 4 particles = 12 > 8
    assert result.particles.shape == (4, 3, 70, 100)
    assert max(batches) == 12 and result.info["stages"]["tiles"]["max_batch"] == 12


def test_every_network_call_holds_at_most_max_batch_inputs():
    batches = []
    eps = _counting_prior(batches)
    result = run(_photo((3, 90, 130)), 0.02, prior=eps, steps="2", kernel_size=5,
                 regularizer="l2", progress=False, working_size=48, particles=2, crops=2,
                 max_batch=5, tile_steps="2")
    assert result.particles.shape == (2, 3, 90, 130)
    assert max(batches) <= 5 and 4 in batches  # 2 crops × 2 particles; then 2 tiles × 2


def test_fast_mode_deconvolves_the_frame_with_the_kernel():
    g = torch.Generator().manual_seed(2)
    kernel = motion_kernel(9, seed=3)
    checks = torch.rand(3, 12, 14, generator=g) * 0.8 + 0.1
    scene = checks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :96, :112]  # edges
    sharp = scene[:, 4:-4, 4:-4]
    blurry = blur(scene, kernel, "valid") + 0.01 * torch.randn(sharp.shape, generator=g)
    result = run(blurry, 0.01, method="pigdm", kernel=kernel, fast=True, progress=False,
                 prior="gaussian")
    assert result.info["path"] == "fast" and "fast" in result.info["stages"]  # no crops
    assert result.particles.shape == (1, 3, 88, 104)
    gain = float(metrics.psnr(result.image, sharp)) - float(metrics.psnr(blurry, sharp))
    assert gain > 1.0
    grey = run(blurry[:1], 0.01, method="pigdm", kernel=kernel, fast=True, progress=False,
               prior="gaussian", particles=16, max_batch=8)  # no network call: no batch limit
    assert grey.image.shape == (1, 88, 104) and grey.info["particles"] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"fast": True, "full_diffusion": True}, "choose one"),
    ({"fast": True, "boundary": "circular"}, "boundary='valid'"),
    ({"fast": 1}, "fast must be True or False"),
    ({"working_size": 16}, "working_size"),
    ({"working_size": 19, "kernel_size": 5, "fast": True}, "working_size"),
    ({"working_size": 40, "kernel_size": 11}, "at least 4 × kernel_size = 44"),
    ({"working_size": 50, "prior": "natural"}, "working_size must be a multiple"),
    ({"crops": 0}, "crops"),
    ({"max_batch": 1, "particles": 2, "method": "pigdm", "kernel": torch.ones(5, 5)},
     r"max_batch \(--max-batch\) must hold the particles of one network call \(2\)"),
    ({"working_size": 32, "kernel_size": 7}, "working_size 32 is too small for kernel_size 7"),
    ({"crops": 2, "particles": 5, "max_batch": 8},
     r"crops × particles of one network call \(10\), got 8"),
    ({"tile_steps": "x"}, "steps"),
])
def test_bad_combinations_give_one_clear_value_error(kwargs, match):
    options = {**FAST, "working_size": 48, **kwargs}
    with pytest.raises(ValueError, match=match):
        run(_photo(), 0.02, **options)


def test_tiles_are_one_sample_without_bands_of_averaged_texture():
    """Independent posterior samples blended at the end would average their random texture at
    every ramp (the particles' spread there halves); tiles stepped in lockstep and blended at
    every step keep the spread even across the frame, as the whole-image run does."""
    g = torch.Generator().manual_seed(0)
    kernel = gaussian_kernel(5, 1.2)
    scene = (PRIOR.sample((1, 3, 68, 204), generator=g)[0] + 1) / 2
    blurry = blur(scene, kernel, "valid") + 0.08 * torch.randn(3, 64, 200, generator=g)
    tiled = run(blurry, 0.08, method="pigdm", kernel=kernel, prior=PRIOR, tile_steps="20",
                particles=8, progress=False, working_size=48, max_batch=16, seed=1)
    assert tiled.info["path"] == "tiles" and tiled.info["stages"]["tiles"]["count"] >= 4
    spread = (tiled.particles - tiled.particles.mean(0)).square().mean(dim=(0, 1, 2))
    # measured: min/median 0.88 here (the whole-image run's too); 0.48 with the final blend
    assert float(spread.min() / spread.median()) > 0.75
