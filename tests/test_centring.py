"""Sub-pixel re-centring of a blind estimate (``fastem_ext.centring``)."""

import math

import pytest
import torch

from fastem_ext.centring import centroid_offset, recentre, shift
from fastem_ext.physics import blur


def _gaussian(size: int, centre: tuple[float, float], std: float = 1.5) -> torch.Tensor:
    index = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-((index[:, None] - centre[0]) ** 2 + (index[None, :] - centre[1]) ** 2)
                  / (2 * std**2))
    return (g / g.sum()).float()


def _smooth_image(seed: int, size: int = 48) -> torch.Tensor:
    """A band-limited [3, size, size] image in [0.2, 0.8] (low frequencies only)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                          torch.arange(size, dtype=torch.float64), indexing="ij")
    out = torch.full((3, size, size), 0.5, dtype=torch.float64)
    for _ in range(6):
        fy, fx, phase = torch.rand(3, generator=g, dtype=torch.float64)
        channel = int(torch.randint(3, (1,), generator=g))
        out[channel] += 0.05 * torch.cos(2 * math.pi * (3 * fy * y + 3 * fx * x) / size + 6 * phase)
    return out.float()


def test_centroid_offset_is_the_centre_of_mass_from_the_centre_pixel():
    kernel = torch.zeros(9, 9)
    kernel[4, 4], kernel[4, 7], kernel[1, 4] = 0.5, 0.25, 0.25
    torch.testing.assert_close(centroid_offset(kernel),
                               torch.tensor([-0.75, 0.75], dtype=torch.float64))
    torch.testing.assert_close(centroid_offset(_gaussian(15, (7.3, 6.6))),
                               torch.tensor([0.3, -0.4], dtype=torch.float64), atol=1e-4, rtol=0)


def test_shift_moves_content_by_the_offset():
    image = _smooth_image(0, 32)[:1]
    moved = shift(image, torch.tensor([2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(moved.float(), torch.roll(image, (2, -3), dims=(-2, -1)),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("centre", [(8.3, 7.8), (7.55, 8.45), (8.0, 8.0)])
def test_recentre_centres_the_kernel_and_keeps_the_blurred_image(centre):
    kernel = _gaussian(17, centre)
    images = torch.stack([_smooth_image(1), _smooth_image(2)])
    new_kernel, new_images, offset = recentre(kernel, images)
    torch.testing.assert_close(offset, torch.tensor(centre, dtype=torch.float64) - 8,
                               atol=1e-4, rtol=0)
    assert float(centroid_offset(new_kernel).abs().max()) < 0.01
    assert new_kernel.dtype == kernel.dtype and new_images.shape == images.shape
    assert abs(float(new_kernel.sum()) - 1) < 1e-6 and float(new_kernel.min()) >= 0
    # what the data see, k ⊛ x, is unchanged (away from the reflected borders)
    before, after = blur(images, kernel), blur(new_images, new_kernel)
    inner = (..., slice(12, -12), slice(12, -12))
    assert float((after - before)[inner].abs().max()) < 2e-3
    if centre != (8.0, 8.0):  # and the images did move
        assert float((new_images - images)[inner].abs().max()) > 5e-3


def test_recentre_keeps_images_in_range_and_takes_small_images():
    kernel = _gaussian(9, (4.4, 3.7))
    images = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    new_kernel, new_images, _ = recentre(kernel, images)
    assert new_images.shape == images.shape
    assert float(new_images.min()) >= 0 and float(new_images.max()) <= 1
    only_kernel, none, _ = recentre(kernel)
    assert none is None and torch.equal(only_kernel, new_kernel)
    line = torch.rand(2, 3, 1, 6, generator=torch.Generator().manual_seed(4))  # no room to reflect
    assert recentre(kernel, line)[1].shape == line.shape

