"""The blur operator ``H x = k ⊛ x`` and its adjoint.

Conventions (DESIGN.md §1): true convolution (not correlation); circular boundaries through the
FFT with the kernel centre at index ``(K//2, K//2)`` rolled to the origin. All spectra are
*unnormalised* real FFTs (``torch.fft.rfft2``, half spectrum ``[..., H, W//2 + 1]``), so the
circulant operator ``H`` has the eigenvalues ``psf2otf(k)`` and Parseval reads
``‖x‖² = (1/N) Σ_f |X_f|²`` (with the Hermitian weights of the half spectrum).

``boundary="valid"`` is the linear-convolution model of a real, non-periodic photo: the output
keeps only the pixels whose whole K×K neighbourhood lies inside the image, ``[H-K+1, W-K+1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_choice, check_image, check_kernel

BOUNDARIES = ("circular", "valid")


def psf2otf(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """Optical transfer function of a centred kernel.

    kernel: ``[..., K1, K2]``, centre at ``(K1//2, K2//2)``; shape: ``(H, W)`` with ``H >= K1``,
    ``W >= K2``. Returns the complex half spectrum ``[..., H, W//2 + 1]``.
    """
    return torch.fft.rfft2(kernel_grid(kernel, shape))


def kernel_grid(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """The kernel zero-padded to ``shape = (H, W)`` with its centre rolled to the origin.

    kernel: ``[..., K1, K2]``. Returns ``[..., H, W]``, the real-space input of ``psf2otf``.
    """
    k1, k2 = kernel.shape[-2:]
    height, width = shape
    if k1 > height or k2 > width:
        raise ValueError(f"kernel {k1}x{k2} is larger than the image {height}x{width}")
    padded = kernel.new_zeros(*kernel.shape[:-2], height, width)
    padded[..., :k1, :k2] = kernel
    return torch.roll(padded, shifts=(-(k1 // 2), -(k2 // 2)), dims=(-2, -1))


def otf2psf(z: Tensor, size: int) -> Tensor:
    """Inverse of ``psf2otf`` in space: the centred ``size×size`` crop of a full-grid kernel.

    z: ``[..., H, W]`` real, kernel centre at the origin. Returns ``[..., size, size]``.
    """
    c = size // 2
    z = torch.roll(z, shifts=(c, c), dims=(-2, -1))
    return z[..., :size, :size]


def blur_spectrum(x: Tensor, otf: Tensor) -> Tensor:
    """Circular blur of ``x: [..., H, W]`` by a precomputed ``otf: [H, W//2+1]`` (broadcast)."""
    return torch.fft.irfft2(torch.fft.rfft2(x) * otf, s=x.shape[-2:])


def _validate(image: Tensor, kernel: Tensor, boundary: str) -> None:
    check_image("image", image, batched=None)
    check_kernel("kernel", kernel)
    check_choice("boundary", boundary, BOUNDARIES)
    size, (height, width) = kernel.shape[-1], image.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"kernel ({size}x{size}) is larger than the image ({height}x{width})")
    if image.dtype != kernel.dtype or image.device != kernel.device:
        raise ValueError(
            f"image ({image.dtype}, {image.device}) and kernel ({kernel.dtype}, {kernel.device}) "
            "must share dtype and device"
        )


def blur(image: Tensor, kernel: Tensor, boundary: str = "circular") -> Tensor:
    """``k ⊛ x``. image: ``[C, H, W]`` or ``[N, C, H, W]``; kernel: ``[K, K]``.

    ``circular`` keeps the size; ``valid`` returns ``[..., H-K+1, W-K+1]``.
    """
    _validate(image, kernel, boundary)
    if boundary == "circular":
        return blur_spectrum(image, psf2otf(kernel, image.shape[-2:]))
    return _valid_conv(image, kernel)


def blur_adjoint(image: Tensor, kernel: Tensor, boundary: str = "circular") -> Tensor:
    """``Hᵀ y``: correlation with ``k``. ``valid`` maps ``[H-K+1, W-K+1]`` back to ``[H, W]``."""
    _validate(image, kernel, boundary)
    if boundary == "circular":
        return blur_spectrum(image, psf2otf(kernel, image.shape[-2:]).conj())
    flat = image.reshape(-1, 1, *image.shape[-2:])
    out = F.conv_transpose2d(flat, kernel.flip(-2, -1)[None, None])
    return out.reshape(*image.shape[:-2], *out.shape[-2:])


def _valid_conv(image: Tensor, kernel: Tensor) -> Tensor:
    # conv2d is a correlation: flipping the kernel makes it a true convolution.
    flat = image.reshape(-1, 1, *image.shape[-2:])
    out = F.conv2d(flat, kernel.flip(-2, -1)[None, None])
    return out.reshape(*image.shape[:-2], *out.shape[-2:])


def gaussian_kernel(size: int, std: float, *, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """An isotropic Gaussian ``[size, size]`` centred at ``(size//2, size//2)``, sum 1."""
    offsets = torch.arange(size, device=device, dtype=dtype) - size // 2
    profile = torch.exp(-0.5 * (offsets / std) ** 2)
    kernel = profile[:, None] * profile[None, :]
    return kernel / kernel.sum()


def initial_kernel(size: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The blind methods' starting kernel ``[size, size]``: a Gaussian of standard deviation
    ``size/16``, sum 1."""
    return gaussian_kernel(size, size / 16, device=device, dtype=dtype)


def dirac_kernel(size: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """The identity blur ``[size, size]``: a single 1 at the centre."""
    kernel = torch.zeros(size, size, device=device, dtype=dtype)
    kernel[size // 2, size // 2] = 1.0
    return kernel
