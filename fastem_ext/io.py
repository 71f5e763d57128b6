"""Images in and out: any user input to a ``[C, H, W]`` float32 tensor in [0, 1], and atomic
writes of images and kernels."""

from __future__ import annotations

import functools
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_tensor
from .png16 import encode_png16, png_bit_depth, read_png16

MIN_SIDE = 8  # pixels: the smallest image side run() deblurs


@dataclass(frozen=True)
class LoadedImage:
    """image: ``[C, H, W]`` float32 in [0, 1] (C = 1 grey or 3 colour), upright (a file's or
    PIL image's EXIF orientation applied); bits: 8 or 16 (the precision to write results back
    in); source: a short description for reports; icc: the embedded colour profile, if any (to
    write results back with); path: the file it was read from, if any."""

    image: Tensor
    bits: int
    source: str
    icc: bytes | None = None
    path: str | None = None


def load_image(source: object, name: str = "blurry") -> LoadedImage:
    """A path, a PIL image, an ``H×W`` / ``H×W×C`` numpy array (uint8, uint16 or float in [0, 1])
    or a tensor ``[C, H, W]`` / ``[1, C, H, W]`` in [0, 1]. Alpha is dropped. A
    ``LoadedImage`` is returned as it is (an image read before, its source kept for reports)."""
    if isinstance(source, LoadedImage):
        return source
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
        array = _orient(_pil_array(source, name), _orientation(source))
        image, bits = _from_numpy(array, name)
        return LoadedImage(image, bits, "PIL image", source.info.get("icc_profile"))
    raise ValueError(
        f"{name} must be a path, a PIL image, a numpy array or a torch tensor, "
        f"got {type(source).__name__}"
    )


def _load_path(path: Path, name: str) -> LoadedImage:
    array, orientation, icc = _decode(path, name)
    image, bits = _from_numpy(_orient(array, orientation), name)
    return LoadedImage(image, bits, str(path), icc, str(path))


def _orientation(img) -> int:
    """The EXIF orientation tag (1..8; 1, upright, when absent or invalid)."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # a malformed EXIF block: ignore it
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """``[H, W(, C)]`` as displayed under EXIF ``orientation`` (as ``ImageOps.exif_transpose``:
    2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90° clockwise, 7 transverse,
    8 rotate 90° anticlockwise)."""
    swapped = array.swapaxes(0, 1)
    return {1: array, 2: array[:, ::-1], 3: array[::-1, ::-1], 4: array[::-1], 5: swapped,
            6: np.rot90(array, 3), 7: swapped[::-1, ::-1], 8: np.rot90(array, 1)}[orientation]


def _check_file(path: Path, name: str) -> None:
    """``path`` names an existing regular file, else a ValueError that says what it is."""
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a directory, not a file")
    if not path.exists():
        raise ValueError(f"{name}: file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{name}: {path} is not a regular file")


def _decode(path: Path, name: str) -> tuple[np.ndarray, int, bytes | None]:
    """An image file's pixels as Pillow or the 16-bit PNG reader gives them, its EXIF
    orientation and its ICC colour profile (Pillow reads both from the header alone)."""
    from PIL import Image, UnidentifiedImageError

    _check_file(path, name)
    try:
        with Image.open(path) as img:
            orientation, icc = _orientation(img), img.info.get("icc_profile")
            if png_bit_depth(path) == 16:
                try:
                    return read_png16(path), orientation, icc
                except ValueError as err:  # its messages name the file, not the argument
                    raise ValueError(f"{name}: cannot read {path} as a 16-bit PNG ({err})") \
                        from None
            img.load()
            return _pil_array(img, name), orientation, icc
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name}: {path} is too large to read ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{name}: cannot read {path} as an image ({err})") from None


def _pil_array(img, name: str) -> np.ndarray:
    """Pillow's modes as arrays ``_from_numpy`` reads: 32-bit integer images (``I``) are 8-bit
    data if no value exceeds 255, else 16-bit; float images (``F``) must hold [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16)
    if img.mode == "I":
        array = np.asarray(img)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{name}: 32-bit integer image with values in [{low}, {high}]; "
                             "8-bit (0..255) and 16-bit (0..65535) ranges are supported")
        return array.astype(np.uint8 if high <= 255 else np.uint16)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    if img.mode == "1":  # 1-bit: grey, one channel (as libpng expands it in fastem_deblur)
        img = img.convert("L")
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
    if min(tensor.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{name} is too small to deblur: {tuple(tensor.shape[-2:])} pixels")
    low, high = float(tensor.min()), float(tensor.max())
    # Noisy synthetic data legitimately overshoots [0, 1] a little; 0..255 data does not fit.
    if low < -0.5 or high > 1.5:
        raise ValueError(
            f"{name} values must be in [0, 1] (got [{low:.3g}, {high:.3g}]); "
            "divide 8-bit data by 255"
        )
    return tensor.detach().float().contiguous()


@functools.cache
def image_suffixes() -> tuple[str, ...]:
    """The file suffixes Pillow can write (``.png`` first)."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    return (".png", *sorted(writable - {".png"}))


def kernel_suffixes() -> tuple[str, ...]:
    return (".npy", *image_suffixes())


def encode_image(path: str | os.PathLike, image: Tensor, bits: int = 8,
                 icc: bytes | None = None) -> bytes:
    """``[C, H, W]`` in [0, 1] as the bytes of an image file of ``path``'s format; PNG may be
    16-bit, and TIFF when grey (Pillow writes no 16-bit colour TIFF); the others are 8-bit.
    ``icc``: a colour profile to embed (where the format has a place for one), dropped unless
    its colour space is the image's (a CMYK photo's profile does not describe the RGB
    result)."""
    path = Path(path)
    check_suffix(path, image_suffixes())
    array = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    icc = icc if profile_matches(icc, array.shape[2]) else None
    if bits == 16 and path.suffix.lower() == ".png":
        return encode_png16(np.round(array * 65535).astype(np.uint16), icc)
    from PIL import Image

    if bits == 16 and array.shape[2] == 1 and path.suffix.lower() in (".tif", ".tiff"):
        pil = Image.fromarray(np.round(array[:, :, 0] * 65535).astype(np.uint16))  # I;16
    else:
        pixels = np.round(array * 255).astype(np.uint8)
        pil = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    try:
        pil.save(buffer, format=Image.registered_extensions()[path.suffix.lower()],
                 **({} if icc is None else {"icc_profile": icc}))
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"cannot write {path}: unsupported image format ({err})") from None
    return buffer.getvalue()


def profile_matches(icc: bytes | None, channels: int) -> bool:
    """Whether the ICC profile ``icc`` describes images of ``channels`` channels: its header's
    colour-space field (bytes 16–19) is ``RGB `` for 3, ``GRAY`` for 1."""
    space = {3: b"RGB ", 1: b"GRAY"}.get(channels)
    return icc is not None and len(icc) >= 20 and icc[16:20] == space


def encode_kernel(path: str | os.PathLike, kernel: Tensor) -> bytes:
    """A kernel ``[K, K]``: ``.npy`` keeps the exact values; an image is scaled to its maximum."""
    path = Path(path)
    check_suffix(path, kernel_suffixes())
    if path.suffix.lower() == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, kernel.detach().cpu().numpy())
        return buffer.getvalue()
    peak = kernel.max().clamp_min(1e-12)
    return encode_image(path, (kernel / peak)[None], bits=16)


def kernel_tile(kernel: Tensor, size: int) -> Tensor:
    """``[3, size, size]``: the kernel scaled to peak 1 (white), nearest-neighbour upsampled."""
    scaled = (kernel / kernel.max().clamp_min(1e-12))[None, None]
    tile = F.interpolate(scaled, size=(size, size), mode="nearest")[0]
    return tile.expand(3, -1, -1)


def check_suffix(path: Path, suffixes: tuple[str, ...], option: str | None = None) -> None:
    if path.suffix.lower() not in suffixes:
        shown = ", ".join(suffixes[:8]) + (", …" if len(suffixes) > 8 else "")
        raise ValueError(f"{option or 'cannot write ' + str(path)}: the file name must end in "
                         f"one of {shown}, got {path.name!r}")


def check_outputs(outputs: dict[str, str | None], suffixes: dict[str, tuple[str, ...]],
                  inputs: tuple[str | None, ...] = (),
                  shapes: dict[str, tuple[tuple[int, int, int], int]] | None = None
                  ) -> dict[str, Path]:
    """Before any work: every output path (option → path) names a file that can be written — a
    supported suffix whose format takes the image it will hold (``shapes``: option → its
    ``(C, H, W)`` and bits; 3×4×4 at 8 bits where not given), an existing writable folder, not
    a directory — and no two outputs, nor an output and an input, are the same file. Returns
    the given ones as paths."""
    given = {option: Path(path) for option, path in outputs.items() if path is not None}
    seen = {os.path.realpath(path): "the input" for path in inputs if path is not None}
    for option, path in given.items():
        real = os.path.realpath(path)
        folder = Path(real).parent
        if Path(real).is_dir():
            raise ValueError(f"{option}: {path} is a directory")
        check_suffix(path, suffixes[option], option)
        if path.suffix.lower() in image_suffixes():
            shape, bits = (shapes or {}).get(option, ((3, 4, 4), 8))
            try:  # some formats refuse grey or RGB, large sizes, or need a plugin: find out now
                encode_image(path, torch.zeros(shape), bits)
            except ValueError as err:
                raise ValueError(f"{option}: {err}") from None
        if not folder.is_dir():
            raise ValueError(f"{option}: folder does not exist: {path.parent}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{option}: folder is not writable: {path.parent}")
        if Path(real).exists() and not os.access(real, os.W_OK):
            raise ValueError(f"{option}: {path} exists and is not writable")
        if real in seen:
            raise ValueError(f"{option}: {path} is also {seen[real]}")
        seen[real] = option
    return given


def write_image(path: str | os.PathLike, image: Tensor, bits: int = 8) -> None:
    """``encode_image``, then ``atomic_write``."""
    atomic_write(Path(path), encode_image(path, image, bits))


def write_kernel(path: str | os.PathLike, kernel: Tensor) -> None:
    """``encode_kernel``, then ``atomic_write``."""
    atomic_write(Path(path), encode_kernel(path, kernel))


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that an interrupted run leaves either the old file or the new one."""
    commit_files({Path(path): data})


def commit_files(files: dict[Path, bytes]) -> None:
    """Write several files as one: every file goes to a temporary file beside its destination
    first, and only when all are written (and fsynced) are they renamed into place, so a
    failure or Ctrl-C while writing leaves every destination as it was, and a renamed file's
    bytes are on disk before its name (the folders are fsynced after the renames, where
    supported). A symlinked destination is written
    through (its target is replaced); a replaced file keeps its permissions, a new one gets
    those a plain ``open()`` would give."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            target = Path(os.path.realpath(path))
            folder = target.parent
            if not folder.is_dir():
                raise ValueError(f"output folder does not exist: {Path(path).parent}")
            if target.is_dir():
                raise ValueError(f"output is a directory: {path}")
            # a short temporary name: the destination may use the whole name length
            fd, tmp = tempfile.mkstemp(prefix=".fastem-", suffix=".tmp", dir=folder)
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # on disk before its name can point at it
            os.chmod(tmp, _mode_for(target))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(target.parent for _, target in staged):
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable where the system allows a folder to be fsynced
    (not on Windows, nor on some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(target: Path) -> int:
    """An existing file's permissions, else what ``open()`` under the umask gives (mkstemp
    creates 0600)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_kernel(path: str | os.PathLike, name: str = "kernel") -> Tensor:
    """A kernel file: ``.npy`` (a 2-D array) or an image (grey, or colour averaged), at any
    scale; ``run()`` checks it and normalises it to sum 1."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        _check_file(path, name)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # EOFError: an empty file
            raise ValueError(f"{name}: cannot read {path} as a .npy array ({err})") from None
        real = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
        if array.ndim != 2 or not real:
            raise ValueError(f"{name}: {path} must hold a 2-D array of real numbers, got shape "
                             f"{array.shape} of {array.dtype}")
        return torch.from_numpy(array.astype(np.float64))
    array = _orient(*_decode(path, name)[:2])
    if array.ndim == 3:
        array = array[:, :, : 3 if array.shape[2] >= 3 else 1].mean(axis=2)  # alpha dropped
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


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
