"""The fast TV deconvolution (no diffusion): FFT sizes, the valid boundary, its gain."""

import torch

from fastem_ext import blur, metrics, motion_kernel
from fastem_ext.deconv import deconvolve_tv, fft_size


def test_fft_size_is_the_next_7_smooth_number():
    assert [fft_size(n) for n in (1, 97, 121, 128, 3031)] == [1, 98, 125, 128, 3072]


def test_a_flat_photo_stays_flat_to_its_edges():
    """No wrap-around: the frame's edges see the unobserved extension, not the far side."""
    image = torch.full((3, 40, 50), 0.6)
    image[:, :, :25] = 0.2  # an edge that would wrap around onto the right border
    kernel = motion_kernel(9, seed=1)
    scene = torch.nn.functional.pad(image[None], (4, 4, 4, 4), mode="replicate")[0]
    out = deconvolve_tv(blur(scene, kernel, "valid"), kernel, 0.01)
    assert float((out[..., :, -6:] - 0.6).abs().max()) < 0.02
    assert float((out[..., :, :6] - 0.2).abs().max()) < 0.02


def test_tv_deconvolution_sharpens_edges():
    g = torch.Generator().manual_seed(0)
    checks = torch.rand(3, 10, 10, generator=g) * 0.8 + 0.1
    scene = checks.repeat_interleave(10, 1).repeat_interleave(10, 2)
    kernel = motion_kernel(11, seed=2)
    sharp = scene[:, 5:-5, 5:-5]
    blurry = blur(scene, kernel, "valid") + 0.02 * torch.randn(sharp.shape, generator=g)
    out = deconvolve_tv(blurry, kernel, 0.02)
    assert float(metrics.psnr(out, sharp)) > float(metrics.psnr(blurry, sharp)) + 3
