"""Images in and out: any user input to a ``[C, H, W]`` float32 tensor in [0, 1], and atomic
writes of images and kernels."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checks import check_tensor
from .png16 import encode_png16, png_bit_depth, read_png16


@dataclass(frozen=True)
class LoadedImage:
    """image: ``[C, H, W]`` float32 in [0, 1] (C = 1 grey or 3 colour); bits: 8 or 16 (the
    precision to write results back in); source: a short description for reports."""

    image: Tensor
    bits: int
    source: str


def load_image(source: object, name: str = "blurry") -> LoadedImage:
    """A path, a PIL image, an ``H×W`` / ``H×W×C`` numpy array (uint8, uint16 or float in [0, 1])
    or a tensor ``[C, H, W]`` / ``[1, C, H, W]`` in [0, 1]. Alpha is dropped."""
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), name)
    if isinstance(source, Tensor):
        return LoadedImage(_from_tensor(source, name), 8, "tensor")
    if isinstance(source, np.ndarray):
        image, bits = _from_numpy(source, name)
        return LoadedImage(image, bits, "array")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(source, Image.Image):
        image, bits = _from_numpy(_pil_array(source), name)
        return LoadedImage(image, bits, "PIL image")
    raise ValueError(
        f"{name} must be a path, a PIL image, a numpy array or a torch tensor, "
        f"got {type(source).__name__}"
    )


def _load_path(path: Path, name: str) -> LoadedImage:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"{name}: file not found: {path}")
    try:
        if png_bit_depth(path) == 16:
            image, bits = _from_numpy(read_png16(path), name)
        else:
            with Image.open(path) as img:
                img.load()
                image, bits = _from_numpy(_pil_array(img), name)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{name}: cannot read {path} as an image ({err})") from None
    return LoadedImage(image, bits, str(path))


def _pil_array(img) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16)
    if img.mode not in ("L", "RGB", "LA", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info
                          else "RGB")
    return np.asarray(img)


def _from_numpy(array: np.ndarray, name: str) -> tuple[Tensor, int]:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{name} must be H×W or H×W×C with C in 1..4, got shape {array.shape}")
    if array.shape[2] in (2, 4):
        array = array[:, :, :-1]  # drop alpha
    if array.dtype == np.uint8:
        bits, values = 8, array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        bits, values = 16, array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        bits, values = 8, array.astype(np.float32)
    else:
        raise ValueError(f"{name} must be uint8, uint16 or floating point, got {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
    return _from_tensor(tensor, name), bits


def _from_tensor(tensor: Tensor, name: str) -> Tensor:
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"{name}: one image at a time, got a batch of {tensor.shape[0]}")
        tensor = tensor[0]
    tensor = check_tensor(name, tensor, (3,))
    if tensor.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be [C, H, W] with C = 1 or 3, got {tuple(tensor.shape)}")
    if min(tensor.shape[-2:]) < 8:
        raise ValueError(f"{name} is too small to deblur: {tuple(tensor.shape[-2:])} pixels")
    low, high = float(tensor.min()), float(tensor.max())
    # Noisy synthetic data legitimately overshoots [0, 1] a little; 0..255 data does not fit.
    if low < -0.5 or high > 1.5:
        raise ValueError(
            f"{name} values must be in [0, 1] (got [{low:.3g}, {high:.3g}]); "
            "divide 8-bit data by 255"
        )
    return tensor.detach().float().contiguous()


def write_image(path: str | os.PathLike, image: Tensor, bits: int = 8) -> None:
    """Write ``[C, H, W]`` in [0, 1]; PNG may be 16-bit, other formats are 8-bit (Pillow).

    Atomic: encoded in memory, written to a temporary file in the destination folder, renamed.
    """
    path = Path(path)
    array = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    if bits == 16 and path.suffix.lower() == ".png":
        data = encode_png16(np.round(array * 65535).astype(np.uint16))
    else:
        from PIL import Image

        pixels = np.round(array * 255).astype(np.uint8)
        pil = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        buffer = io.BytesIO()
        try:
            pil.save(buffer, format=Image.registered_extensions().get(path.suffix.lower()))
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"cannot write {path}: unsupported image format ({err})") from None
        data = buffer.getvalue()
    atomic_write(path, data)


def write_kernel(path: str | os.PathLike, kernel: Tensor) -> None:
    """A kernel ``[K, K]``: ``.npy`` keeps the exact values; an image is scaled to its maximum."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, kernel.detach().cpu().numpy())
        atomic_write(path, buffer.getvalue())
        return
    peak = kernel.max().clamp_min(1e-12)
    write_image(path, (kernel / peak)[None], bits=16)


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that an interrupted run leaves either the old file or the new one."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder does not exist: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates 0600; a written result gets the permissions a plain open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_image(path: str | os.PathLike) -> tuple[Tensor, int]:
    """Load an image file: ``([C, H, W] float32 in [0, 1], bit depth 8 or 16)``."""
    loaded = _load_path(Path(path), "image")
    return loaded.image, loaded.bits


def center_crop(image: Tensor, size: int) -> Tensor:
    """The central ``size×size`` window of ``[..., H, W]``."""
    height, width = image.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"the image ({height}x{width}) is smaller than the crop size {size}")
    top, left = (height - size) // 2, (width - size) // 2
    return image[..., top : top + size, left : left + size].contiguous()
