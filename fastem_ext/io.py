"""Reading and writing images as ``[C, H, W]`` float32 tensors in [0, 1]."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def read_image(path: str | os.PathLike) -> tuple[Tensor, int]:
    """Load an image file. Returns ``([C, H, W] float32 in [0, 1], bit depth 8 or 16)``.

    Grey images give ``C = 1``; alpha is dropped; palette images are converted to RGB.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_tensor(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from None


def _pil_to_tensor(img) -> tuple[Tensor, int]:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        bits = 16
        array = array / 65535.0
    else:
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if img.mode not in ("LA", "1") else "L")
        array = np.asarray(img, dtype=np.float64) / 255.0
        bits = 8
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
    return tensor.clamp(0.0, 1.0), bits


def write_image(path: str | os.PathLike, image: Tensor, bits: int = 8) -> None:
    """Write ``[C, H, W]`` in [0, 1] as PNG (8 or 16 bit), atomically: a temporary file in the
    destination folder, then a rename, so an interrupted run leaves no partial file."""
    from PIL import Image

    path = Path(path)
    array = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    if bits == 16:
        if array.shape[2] != 1:
            raise ValueError("16-bit output is supported for grey images only (PIL limitation)")
        pil = Image.fromarray(np.round(array[:, :, 0] * 65535).astype(np.uint16))
    else:
        data = np.round(array * 255).astype(np.uint8)
        pil = Image.fromarray(data[:, :, 0] if data.shape[2] == 1 else data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            pil.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
