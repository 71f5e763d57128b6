import pytest
import torch

from fastem_ext import blur, estimate_noise, gaussian_kernel
from fastem_ext.noise import MIN_SIGMA


@pytest.mark.parametrize("level", [2, 5, 10, 25])
def test_noise_estimate_on_a_blurred_photo(val_crop, level):
    sigma = level / 255
    g = torch.Generator().manual_seed(level)
    blurry = blur(val_crop, gaussian_kernel(9, 1.5)) + sigma * torch.randn(val_crop.shape,
                                                                           generator=g)
    assert estimate_noise(blurry) == pytest.approx(sigma, rel=0.12)


def test_noise_estimate_is_floored_on_clean_images():
    assert estimate_noise(torch.full((3, 16, 16), 0.5)) == MIN_SIGMA
