import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastem_ext.io import commit_files, encode_image, load_image, write_image, write_kernel
from fastem_ext.png16 import encode_png16, read_png16


def _filtered_png16(pixels: np.ndarray) -> bytes:
    """Encode with every PNG filter type in turn (rows cycle through 0..4)."""
    height, width, channels = pixels.shape
    bpp = 2 * channels
    raw = pixels.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int32)
    rows = []
    for r in range(height):
        line, up = raw[r], raw[r - 1] if r else np.zeros_like(raw[0])
        left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = r % 5
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        rows.append(bytes([kind]) + ((line - pred) % 256).astype(np.uint8).tobytes())
    colour = {1: 0, 3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)

    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png16_decodes_every_filter_type(tmp_path, channels):
    pixels = np.random.default_rng(channels).integers(0, 65536, (11, 7, channels), dtype=np.uint16)
    path = tmp_path / "f.png"
    path.write_bytes(_filtered_png16(pixels))
    np.testing.assert_array_equal(read_png16(path), pixels)


def test_16bit_rgb_round_trip_through_load_and_write(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (9, 12, 3), dtype=np.uint16)
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    src.write_bytes(encode_png16(pixels))
    loaded = load_image(src)
    assert loaded.bits == 16 and loaded.image.shape == (3, 9, 12)
    write_image(out, loaded.image, bits=loaded.bits)
    np.testing.assert_array_equal(read_png16(out), pixels)


def test_inputs_of_every_kind_agree(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    expected = torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb,
                   rgb.astype(np.float64) / 255, expected, expected[None]):
        torch.testing.assert_close(load_image(source).image, expected)
    rgba = np.concatenate([rgb, np.full((16, 20, 1), 7, np.uint8)], axis=2)
    torch.testing.assert_close(load_image(rgba).image, expected)
    grey = load_image(rgb[:, :, 0])
    assert grey.image.shape == (1, 16, 20) and grey.bits == 8
    assert load_image(rgb.astype(np.uint16) * 257).bits == 16


@pytest.mark.parametrize(
    "source, match",
    [
        (Path("/nonexistent/x.png"), "not found"),
        (np.zeros((4, 4, 3, 2)), "H×W"),
        (np.zeros((10, 10), dtype=np.int64), "uint8"),
        (torch.rand(2, 3, 10, 10), "one image"),
        (torch.rand(5, 10, 10), "C = 1 or 3"),
        (torch.rand(3, 1, 10), "too small"),
        (torch.full((3, 10, 10), float("nan")), "NaN"),
        (torch.rand(3, 10, 10) * 255, r"\[0, 1\]"),
        (3.5, "path"),
    ],
)
def test_bad_inputs_raise_clear_errors(source, match):
    with pytest.raises(ValueError, match=match):
        load_image(source)


def test_a_non_image_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(path)


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.xyz"
    with pytest.raises(ValueError, match="must end in one of"):
        write_image(target, torch.rand(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    import os

    write_image(tmp_path / "a.png", torch.rand(3, 8, 8))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_kernel_outputs(tmp_path):
    kernel = torch.rand(9, 9)
    kernel /= kernel.sum()
    write_kernel(tmp_path / "k.npy", kernel)
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), kernel.numpy())
    write_kernel(tmp_path / "k.png", kernel)
    assert read_png16(tmp_path / "k.png").max() == 65535


def _png(ihdr: bytes, idat: bytes) -> bytes:
    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits", [8, 16])
def test_huge_pngs_are_refused_before_decoding(tmp_path, bits):
    """A header claiming 20000×20000 pixels: a clear error, not Pillow's exception or a 2.4 GB
    allocation (the 16-bit reader bounds pixels as Pillow does for 8-bit images)."""
    path = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, bits, 2, 0, 0, 0)
    path.write_bytes(_png(ihdr, zlib.compress(b"\0" * 1000)))
    with pytest.raises(ValueError, match="too large|more than"):
        load_image(path)


def test_a_16bit_png_inflating_past_its_header_is_refused(tmp_path):
    path = tmp_path / "long.png"
    ihdr = struct.pack(">IIBBBBB", 4, 4, 16, 0, 0, 0, 0)
    path.write_bytes(_png(ihdr, zlib.compress(b"\0" * 10_000_000)))
    with pytest.raises(ValueError, match="wrong length"):
        read_png16(path)


def test_pillow_integer_and_float_modes_keep_their_range(tmp_path):
    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    float_image = load_image(Image.fromarray(ramp, mode="F")).image
    torch.testing.assert_close(float_image[0], torch.from_numpy(ramp))
    wide = Image.fromarray((ramp * 65535).round().astype(np.int32), mode="I")
    assert load_image(wide).bits == 16
    torch.testing.assert_close(load_image(wide).image[0], torch.from_numpy(ramp), atol=1e-5,
                               rtol=0)
    narrow = Image.fromarray((ramp * 255).round().astype(np.int32), mode="I")
    assert load_image(narrow).bits == 8 and float(load_image(narrow).image.max()) == 1.0
    wide.save(tmp_path / "wide.tif")
    torch.testing.assert_close(load_image(tmp_path / "wide.tif").image[0],
                               torch.from_numpy(ramp), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="32-bit integer"):
        load_image(Image.fromarray(np.full((48, 64), 70000, np.int32), mode="I"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(Image.fromarray(ramp * 255, mode="F"))


def test_a_1bit_image_is_one_grey_channel(tmp_path):
    """Pillow's mode "1" (a 1-bit PNG) loads as grey, 0 or 1, as fastem_deblur reads it."""
    bits = np.random.default_rng(0).random((12, 20)) > 0.5
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    for source in (tmp_path / "bits.png", Image.open(tmp_path / "bits.png")):
        loaded = load_image(source)
        assert loaded.image.shape == (1, 12, 20) and loaded.bits == 8
        torch.testing.assert_close(loaded.image[0], torch.from_numpy(bits).float())


def test_outputs_are_committed_together_or_not_at_all(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.json"
    first.write_bytes(b"old")
    with pytest.raises(ValueError, match="folder does not exist"):
        commit_files({first: b"new", tmp_path / "missing" / "c.json": b"x"})
    assert first.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    commit_files({first: b"new", second: b"{}"})
    assert first.read_bytes() == b"new" and second.read_bytes() == b"{}"
    with pytest.raises(ValueError, match="is a directory"):
        commit_files({tmp_path: b"x"})


def test_overwriting_keeps_the_mode_and_writes_through_symlinks(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    write_image(link, torch.rand(3, 8, 8))
    assert link.is_symlink() and target.stat().st_mode & 0o777 == 0o640
    assert load_image(link).image.shape == (3, 8, 8)



@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured_as_pillow_does(tmp_path, orientation):
    from PIL import Image, ImageOps

    pixels = (np.random.default_rng(orientation).random((9, 13, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    img.save(path, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path))).astype(np.float32) / 255
    for source in (path, Image.open(path)):
        loaded = load_image(source)
        np.testing.assert_array_equal(loaded.image.numpy().transpose(1, 2, 0), expected)


@pytest.mark.parametrize("bits, suffix", [(8, ".png"), (16, ".png"), (8, ".jpg"), (8, ".tif")])
def test_the_colour_profile_is_kept(tmp_path, bits, suffix):
    from PIL import Image, ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = (np.random.default_rng(0).random((10, 9, 3)) * 255).astype(np.uint8)
    source = tmp_path / "in.png"
    Image.fromarray(pixels).save(source, icc_profile=profile)
    loaded = load_image(source)
    assert loaded.icc == profile
    out = tmp_path / f"out{suffix}"
    out.write_bytes(encode_image(out, loaded.image, bits, loaded.icc))
    with Image.open(out) as img:
        assert img.info.get("icc_profile") == profile
    again = load_image(out)
    assert again.icc == profile and again.bits == (16 if bits == 16 else 8)
    assert load_image(tmp_path / "in.png").image.shape == (3, 10, 9)


def test_a_profile_of_another_colour_space_is_dropped(tmp_path):
    """A CMYK JPEG comes back RGB: its CMYK profile would mislabel the result."""
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk = srgb[:16] + b"CMYK" + srgb[20:]  # the header's colour-space field is what counts
    image = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    for suffix, bits in ((".png", 16), (".png", 8), (".jpg", 8)):
        out = tmp_path / f"out{bits}{suffix}"
        out.write_bytes(encode_image(out, image, bits, cmyk))
        with Image.open(out) as img:
            assert img.info.get("icc_profile") is None
    grey = tmp_path / "grey.png"
    grey.write_bytes(encode_image(grey, image[:1], 8, srgb))  # an RGB profile on a grey image
    with Image.open(grey) as img:
        assert img.info.get("icc_profile") is None


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_committed_files_are_on_disk_before_they_are_renamed(tmp_path, monkeypatch):
    """Each temporary file is fsynced before any rename, so after a power loss a renamed name
    never points at an empty file; the folders are fsynced after the renames."""
    import fastem_ext.io as io_module

    events = []
    fsync, replace = io_module.os.fsync, io_module.os.replace

    def logged_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", Path(src).name))
        replace(src, dst)

    monkeypatch.setattr(io_module.os, "fsync", logged_fsync)
    monkeypatch.setattr(io_module.os, "replace", logged_replace)
    commit_files({tmp_path / "a.png": b"a", tmp_path / "b.npy": b"b"})
    temporaries = [name for kind, name in events if kind == "replace"]
    assert len(temporaries) == 2
    first_replace = events.index(("replace", temporaries[0]))
    assert {("fsync", name) for name in temporaries} <= set(events[:first_replace])
    assert events[-1] == ("fsync", tmp_path.name)
    assert (tmp_path / "a.png").read_bytes() == b"a"
