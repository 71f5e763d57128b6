"""Validation of public inputs: one clear ``ValueError`` that names the argument.

These checks run once at the public entry points (they may synchronise with the device, e.g. to
test finiteness). Nothing here is called inside the sampling loop.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

MAX_SIGMA = 0.5
# The least noise level: 0.0255/255, far below any camera's; near 1e-19 σ² underflows float32 and
# the guidance divides by zero.
LEAST_SIGMA = 1e-4


def check_tensor(name: str, x: object, ndims: tuple[int, ...]) -> Tensor:
    """``x`` must be a floating tensor with one of ``ndims`` dimensions and only finite values."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor, got layout {x.layout} (use .to_dense())")
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: it holds no values")
    if x.dim() not in ndims:
        dims = " or ".join(str(d) for d in ndims)
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_image(name: str, x: object, *, batched: bool | None = False) -> Tensor:
    """An image ``[C, H, W]`` with 1 or 3 channels and H, W ≥ 2.

    ``batched=True`` asks for ``[N, C, H, W]``; ``None`` accepts either.
    """
    ndims = {False: (3,), True: (4,), None: (3, 4)}[batched]
    x = check_tensor(name, x, ndims)
    channels, height, width = x.shape[-3:]
    if channels not in (1, 3):
        raise ValueError(
            f"{name} must have 1 or 3 channels in dimension {x.dim() - 3}, got shape "
            f"{tuple(x.shape)} (images are channel-first: [C, H, W])"
        )
    if height < 2 or width < 2:
        raise ValueError(f"{name} is too small: {height}x{width} pixels")
    return x


def check_kernel(name: str, k: object, *, blur: bool = False) -> Tensor:
    """A kernel ``[K, K]``: square, finite, positive sum, K ≥ 1.

    ``blur=True`` (a user's blur kernel): the entries must be non-negative as well (values down
    to ``-1e-6·max`` count as rounding and become 0), and the kernel comes back normalised to sum
    1 in its dtype, computed in float64 so that huge entries do not overflow.
    """
    k = check_tensor(name, k, (2,))
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be square [K, K], got shape {tuple(k.shape)}")
    if not blur:
        total = float(k.sum())
        if not total > 1e-8:
            raise ValueError(
                f"{name} must have a positive sum (blur kernels sum to 1), got {total}"
            )
        return k
    wide = k.detach().double()
    peak, low = float(wide.max()), float(wide.min())
    if not peak > 0:
        raise ValueError(f"{name} must have a positive entry (blur kernels sum to 1)")
    if low < -1e-6 * peak:
        raise ValueError(
            f"{name} has negative entries (down to {low:.3g}): a blur kernel is non-negative "
            "(clip it with kernel.clamp(min=0) if they are noise)"
        )
    wide = wide.clamp_min(0.0) / peak  # by the peak first: a sum of huge entries overflows
    return (wide / wide.sum()).to(k.dtype)


# check_sigma's name for a noise level run() estimated: say how to give it instead
ESTIMATED_SIGMA = "the estimated noise level (give it: sigma= in Python, --sigma in the CLI)"


def check_sigma(name: str, sigma: object) -> float:
    """Noise level in [0, 1] image units: ``1e-4 <= sigma <= 0.5``."""
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(sigma.shape)}")
        sigma = float(sigma)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not math.isfinite(sigma) or not LEAST_SIGMA <= sigma <= MAX_SIGMA:
        raise ValueError(
            f"{name} must be in [{LEAST_SIGMA:g}, {MAX_SIGMA}] in [0, 1] image units "
            f"(10/255 = 0.039; for a nearly noiseless image pass {LEAST_SIGMA:g}), got {sigma:g}"
        )
    return sigma


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_kernel_size(name: str, size: object, image_hw: tuple[int, int]) -> int:
    """Kernel support ``3 <= K <= min(H, W) // 2``: a larger kernel is not identifiable."""
    limit = min(image_hw) // 2
    if limit < 3:
        raise ValueError(f"the image ({image_hw[0]}x{image_hw[1]}) is too small for a kernel")
    try:
        return check_int(name, size, low=3, high=limit)
    except ValueError as err:
        raise ValueError(f"{err} (at most half the smaller side of the {image_hw[0]}x"
                         f"{image_hw[1]} image)") from None


def check_positive(name: str, value: object, *, high: float = math.inf) -> float:
    """A finite number > 0 (and ≤ ``high``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if value > high:
        raise ValueError(f"{name} must be at most {high:g}, got {value:g}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)
