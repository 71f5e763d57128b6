"""Input checks of the Triton wrappers: the same rules as the C++ host entries (csrc/checks.h)."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_KERNEL_SIZE = 64  # kernel_project holds the whole K×K support in one program


def tensor(t: Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def table(values: Tensor, name: str, step: Tensor, device: torch.device) -> None:
    """A per-step scalar: ``values`` ``[S]`` float32 read at the 0-d int64 ``step``."""
    tensor(values, name, torch.float32, device)
    if values.dim() != 1 or values.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D table, got {tuple(values.shape)}")
    tensor(step, "step", torch.int64, device)
    if step.dim() != 0:
        raise ValueError(f"step must be a 0-d tensor, got {tuple(step.shape)}")


def spectra(spec: Tensor, name: str) -> tuple[int, int, int, int]:
    """``spec`` ``[n, C, H, W//2+1]`` complex64; returns its shape."""
    tensor(spec, name, torch.complex64, spec.device)
    if spec.dim() != 4:
        raise ValueError(f"{name} must be [n, C, H, W//2+1], got {tuple(spec.shape)}")
    return tuple(spec.shape)


def plane(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, int],
          device: torch.device) -> None:
    tensor(t, name, dtype, device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")


def target(spec_y: Tensor, shape: tuple[int, int, int, int], device: torch.device) -> bool:
    """``spec_y`` ``[C, H, Wh]`` (shared: True) or ``[n, C, H, Wh]`` (per particle: False)."""
    tensor(spec_y, "spec_y", torch.complex64, device)
    if tuple(spec_y.shape) not in (shape[1:], shape):
        raise ValueError(f"spec_y must be {list(shape[1:])} or {list(shape)}, "
                         f"got {list(spec_y.shape)}")
    return spec_y.dim() == 3
