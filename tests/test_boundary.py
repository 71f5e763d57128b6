import pytest
import torch

from fastem_ext import blur
from fastem_ext.boundary import Frame
from fastem_ext.motion import motion_kernel
from fastem_ext.observation import Observation


def test_valid_frame_covers_the_kernel_and_the_multiple():
    frame = Frame.plan(45, 70, 17, 32, "valid")
    assert frame.grid_h % 32 == 0 and frame.grid_w % 32 == 0
    assert frame.top >= 8 and frame.left >= 8
    assert frame.grid_h - 45 - frame.top >= 8 and frame.grid_w - 70 - frame.left >= 8
    image = torch.rand(3, 45, 70)
    grid, mask = frame.pad(image)
    assert torch.equal(frame.crop(grid), image)
    assert float(mask.sum()) == 45 * 70 and torch.equal(frame.crop(mask), torch.ones(1, 45, 70))


def test_circular_frame_needs_a_multiple():
    assert not Frame.plan(64, 96, 9, 32, "circular").masked
    with pytest.raises(ValueError, match="multiples of 32"):
        Frame.plan(64, 90, 9, 32, "circular")


def test_masked_observation_sees_no_wrap_around():
    """A photo blurred by *linear* convolution is explained exactly on the grid: the residual of
    the true scene is zero on every observed pixel, including the borders."""
    kernel = motion_kernel(15, seed=3)
    scene = torch.rand(3, 64 + 14, 80 + 14, generator=torch.Generator().manual_seed(0))
    photo = blur(scene, kernel, "valid")  # [3, 64, 80], no periodic assumption
    frame = Frame.plan(64, 80, 15, 16, "valid")
    grid, mask = frame.pad(photo)
    x = torch.zeros(1, *grid.shape)
    top, left = frame.top - 7, frame.left - 7
    x[0, :, top : top + scene.shape[1], left : left + scene.shape[2]] = scene
    obs = Observation(grid, 0.01, mask)
    from fastem_ext.physics import psf2otf

    residual = obs.residual(torch.fft.rfft2(x), psf2otf(kernel, grid.shape[-2:]))
    assert float(residual.abs().max()) < 1e-5
    circular = Observation(photo, 0.01)
    wrapped = circular.residual(torch.fft.rfft2(scene[None, :, 7:-7, 7:-7]),
                                psf2otf(kernel, photo.shape[-2:]))
    assert float(wrapped.abs().max()) > 0.05  # the circular model cannot explain the borders


def test_the_guidance_observes_the_outside_weakly():
    """The guidance weighs the misfit 1 inside the frame and ``OUTSIDE_WEIGHT`` outside it (the
    scene beyond the frame is held to the replicated edge, not left to drift to black); the
    observed residual stays zero outside; without a mask there is no weight."""
    from fastem_ext.observation import OUTSIDE_WEIGHT
    from fastem_ext.physics import psf2otf

    frame = Frame.plan(20, 24, 9, 8, "valid")
    grid, mask = frame.pad(torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(2, *grid.shape, generator=torch.Generator().manual_seed(2))
    spec, otf = torch.fft.rfft2(x), psf2otf(motion_kernel(9, seed=1), grid.shape[-2:])
    obs = Observation(grid, 0.02, mask)
    weight = obs.guidance_weight
    assert 0 < OUTSIDE_WEIGHT < 1
    assert torch.equal(weight[mask.bool()], torch.ones(int(mask.sum())))
    assert torch.equal(weight[~mask.bool()], torch.full((int((1 - mask).sum()),), OUTSIDE_WEIGHT))
    inside = mask.bool().expand(2, 3, -1, -1)
    misfit = obs.misfit(spec, otf)
    torch.testing.assert_close(obs.residual(spec, otf)[inside], misfit[inside])
    assert float(obs.residual(spec, otf)[~inside].abs().max()) == 0.0
    assert Observation(grid, 0.02).guidance_weight is None
