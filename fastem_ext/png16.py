"""Minimal 16-bit PNG codec (non-interlaced grey, grey+alpha, RGB, RGBA).

Pillow reads 16-bit-per-channel colour PNGs as 8-bit and cannot write them, so a 16-bit scan would
silently lose its low byte. 8-bit files go through Pillow; 16-bit files through this module.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
MAX_PIXELS = 178_956_970  # Pillow's DecompressionBombError threshold (2 × MAX_IMAGE_PIXELS)


def png_bit_depth(path: Path) -> int | None:
    """The bit depth of a PNG file, or ``None`` if the file is not a PNG."""
    with open(path, "rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or head[:8] != SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24]


def read_png16(path: Path) -> np.ndarray:
    """Decode a 16-bit PNG to ``uint16 [H, W, C]`` (alpha kept; the caller drops it);
    ``ValueError`` says what is wrong with the file (the caller names it)."""
    data = Path(path).read_bytes()
    if data[:8] != SIGNATURE:
        raise ValueError("not a PNG file")
    pos, header, idat = 8, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError(f"truncated PNG chunk {kind!r}")
        if kind == b"IHDR":
            if length != 13:
                raise ValueError(f"bad PNG header chunk (IHDR of {length} bytes, not 13)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    width, height, depth, colour, _, _, interlace = header
    if depth != 16 or colour not in CHANNELS:
        raise ValueError(f"not a 16-bit grey/RGB PNG (depth {depth}, colour {colour})")
    if interlace:
        raise ValueError("interlaced 16-bit PNGs are not supported; re-save without")
    if width < 1 or height < 1:
        raise ValueError("empty image")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} pixels is more than the {MAX_PIXELS} this "
                         "reader decodes (Pillow's bound for 8-bit images)")
    bpp = 2 * CHANNELS[colour]
    stride = width * bpp
    try:  # never inflate more than the header announces (a compression bomb stops here)
        raw = zlib.decompressobj().decompress(b"".join(idat), height * (stride + 1) + 1)
    except zlib.error as err:
        raise ValueError(f"corrupt PNG data ({err})") from None
    if len(raw) != height * (stride + 1):
        raise ValueError("PNG data has the wrong length")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    pixels = _unfilter(rows, bpp)
    return pixels.view(">u2").reshape(height, width, CHANNELS[colour]).astype(np.uint16)


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters (None, Sub, Up, Average, Paeth)."""
    height, stride = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for r in range(height):
        kind, line = rows[r, 0], rows[r, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum per byte lane
            lanes = line.reshape(-1, bpp)
            cur = (np.cumsum(lanes, axis=0) % 256).reshape(-1)
        elif kind == 2:
            cur = (line + prev) % 256
        elif kind in (3, 4):
            cur = _sequential(line, prev, bpp, paeth=kind == 4)
        else:
            raise ValueError(f"invalid PNG filter type {kind}")
        out[r] = cur
        prev = cur.astype(np.int32)
    return out


def _sequential(line: np.ndarray, prev: np.ndarray, bpp: int, paeth: bool) -> np.ndarray:
    # Average and Paeth depend on the reconstructed left neighbour: one pixel at a time.
    cur = np.zeros_like(line)
    zeros = np.zeros(bpp, dtype=np.int32)
    for start in range(0, line.shape[0], bpp):
        stop = start + bpp
        left = cur[start - bpp : start] if start else zeros
        up = prev[start:stop]
        if paeth:
            upleft = prev[start - bpp : start] if start else zeros
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        else:
            pred = (left + up) // 2
        cur[start:stop] = (line[start:stop] + pred) % 256
    return cur


def encode_png16(pixels: np.ndarray, icc: bytes | None = None) -> bytes:
    """Encode ``uint16 [H, W, 1 or 3]`` as a 16-bit grey or RGB PNG (filter 0, zlib level 6),
    with the colour profile ``icc`` in an ``iCCP`` chunk if given."""
    height, width, channels = pixels.shape
    colour = {1: 0, 3: 2}[channels]
    body = pixels.astype(">u2").reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), body.view(np.uint8)], axis=1)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    chunks = [(b"IHDR", ihdr)]
    if icc is not None:  # profile name, its NUL, compression method 0 (zlib), the profile
        chunks.append((b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    chunks += [(b"IDAT", zlib.compress(raw.tobytes(), 6)), (b"IEND", b"")]
    parts = [SIGNATURE]
    for kind, chunk in chunks:
        crc = zlib.crc32(kind + chunk) & 0xFFFFFFFF
        parts.append(struct.pack(">I", len(chunk)) + kind + chunk + struct.pack(">I", crc))
    return b"".join(parts)
