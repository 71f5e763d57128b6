import pytest
import torch
from dense import circular_convolve

from fastem_ext import blur, blur_adjoint, dirac_kernel, gaussian_kernel, otf2psf, psf2otf


def _random(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) + 0.1


@pytest.mark.parametrize("size", [3, 4, 5, 8])
@pytest.mark.parametrize("hw", [(13, 17), (16, 10)])
def test_fft_blur_equals_direct_circular_convolution(size, hw):
    image = _random((3, *hw), 0)
    kernel = _random((size, size), 1)
    kernel = kernel / kernel.sum()
    torch.testing.assert_close(blur(image, kernel), circular_convolve(image, kernel),
                               rtol=1e-12, atol=1e-12)


def test_blur_is_convolution_not_correlation():
    image = torch.zeros(1, 9, 9, dtype=torch.float64)
    image[0, 4, 4] = 1.0
    kernel = torch.zeros(3, 3, dtype=torch.float64)
    kernel[0, 2] = 1.0  # asymmetric: the impulse response must be the kernel itself
    out = blur(image, kernel)
    torch.testing.assert_close(out[0, 3:6, 3:6], kernel)


@pytest.mark.parametrize("boundary", ["circular", "valid"])
@pytest.mark.parametrize("size", [4, 5])
def test_adjointness(boundary, size):
    x = _random((2, 3, 12, 15), 2) - 0.5
    kernel = _random((size, size), 3)
    hx = blur(x, kernel, boundary)
    y = _random(tuple(hx.shape), 4) - 0.5
    lhs = (hx * y).sum()
    rhs = (x * blur_adjoint(y, kernel, boundary)).sum()
    assert abs(float(lhs - rhs)) <= 1e-12 * float(lhs.abs())


@pytest.mark.parametrize("size", [4, 5])
def test_valid_is_the_interior_of_circular(size):
    x = _random((3, 14, 11), 5)
    kernel = _random((size, size), 6)
    c = size // 2
    inner = blur(x, kernel, "circular")[..., size - 1 - c : 14 - c, size - 1 - c : 11 - c]
    torch.testing.assert_close(blur(x, kernel, "valid"), inner)


def test_psf2otf_roundtrip_and_dirac():
    kernel = _random((7, 7), 7)
    otf = psf2otf(kernel, (16, 12))
    assert otf.shape == (16, 7)
    back = otf2psf(torch.fft.irfft2(otf, s=(16, 12)), 7)
    torch.testing.assert_close(back, kernel)
    ones = psf2otf(dirac_kernel(5, dtype=torch.float64), (8, 8))
    torch.testing.assert_close(ones, torch.ones_like(ones))


def test_gaussian_kernel_is_centred_and_normalised():
    k = gaussian_kernel(9, 1.5, dtype=torch.float64)
    assert abs(float(k.sum()) - 1) < 1e-12
    assert int(k.argmax()) == 4 * 9 + 4
    torch.testing.assert_close(k, k.flip(0))


@pytest.mark.parametrize(
    "image, kernel, boundary, match",
    [
        (torch.rand(8, 8), torch.ones(3, 3), "circular", "image"),
        (torch.rand(3, 8, 8), torch.ones(3, 4), "circular", "kernel"),
        (torch.rand(3, 8, 8), torch.ones(9, 9), "circular", "larger"),
        (torch.rand(3, 8, 8), torch.ones(3, 3), "reflect", "boundary"),
        (torch.full((3, 8, 8), float("nan")), torch.ones(3, 3), "circular", "NaN"),
        (torch.rand(3, 8, 8), torch.zeros(3, 3), "circular", "kernel"),
        (torch.rand(5, 8, 8), torch.ones(3, 3), "circular", "channels"),
    ],
)
def test_blur_rejects_bad_input(image, kernel, boundary, match):
    with pytest.raises(ValueError, match=match):
        blur(image, kernel, boundary)
