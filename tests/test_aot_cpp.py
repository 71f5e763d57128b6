"""A compiled package against ``run()``: in Python (``load_package``) and from C++
(``fastem_deblur``, csrc/examples), outputs within 1e-4 of ``run()`` for the same photo, σ and
seed, and C++ within ``SAME_PROGRAM`` of the same compiled program run from Python.

Runs only when CI gives the package and the binary (compiling takes minutes):
``FASTEM_TEST_PACKAGE`` (a folder made by ``fastem export``) and ``FASTEM_DEBLUR_BIN`` (the
built example; the C++ cases skip without it; ``fastem_api_check`` beside it, when built, gets
a package whose program fails).
"""

import json
import os
import select
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastem_ext import blur, load_package, motion_kernel, run
from fastem_ext.io import encode_image, load_image

PACKAGE = os.environ.get("FASTEM_TEST_PACKAGE")
BINARY = os.environ.get("FASTEM_DEBLUR_BIN")
pytestmark = pytest.mark.skipif(PACKAGE is None, reason="FASTEM_TEST_PACKAGE is not set")
needs_binary = pytest.mark.skipif(BINARY is None, reason="FASTEM_DEBLUR_BIN is not set")
TOLERANCE = 1e-4
SAME_PROGRAM = 1e-6  # C++ against load_package(...).run: one program, loop and generator (measured
#                      bitwise equal on 1 and 2 threads)


@pytest.fixture(scope="module")
def manifest():
    return json.loads((Path(PACKAGE) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def photos(manifest, tmp_path_factory):
    """A blurred, noisy photo of the package's size: 16-bit RGB and 8-bit grey PNG files."""
    height, width = manifest["height"], manifest["width"]
    generator = torch.Generator().manual_seed(5)
    scene = torch.rand(1, 3, height + 4, width + 4, generator=generator)
    sharp = torch.nn.functional.avg_pool2d(scene, 5, 1)[0]
    blurry = blur(sharp, motion_kernel(15, seed=2))
    blurry = (blurry + 0.02 * torch.randn(blurry.shape, generator=generator)).clamp(0, 1)
    folder = tmp_path_factory.mktemp("photos")
    rgb, grey = folder / "rgb16.png", folder / "grey8.png"
    rgb.write_bytes(encode_image(rgb, blurry, 16))
    grey.write_bytes(encode_image(grey, blurry[:1], 8))
    return {"rgb16": rgb, "grey8": grey}


def _run(manifest, photo, sigma, seed):
    return run(photo, sigma, method=manifest["method"], prior=manifest["prior"],
               particles=manifest["particles"], steps=manifest["steps_spec"],
               kernel_size=manifest["kernel_size"], boundary=manifest["boundary"],
               regularizer=manifest["regularizer"], r2=manifest["r2"],
               guidance_scale=manifest["guidance_scale"], restarts=manifest["restarts"],
               seed=seed, progress=False,
               full_diffusion=True)


def test_the_compiled_package_reproduces_run_in_python(manifest, photos):
    got = load_package(PACKAGE).run(photos["rgb16"], 5 / 255, seed=3)
    want = _run(manifest, photos["rgb16"], 5 / 255, 3)
    torch.testing.assert_close(got.particles, want.particles, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got.kernel, want.kernel, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def package():
    return load_package(PACKAGE)


def _deblur(*args):
    return subprocess.run([BINARY, *map(str, args), "--quiet"], capture_output=True, text=True,
                          timeout=600)


@needs_binary
@pytest.mark.parametrize("photo, sigma, seed", [("rgb16", 5.0, 3), ("grey8", None, 0)])
def test_the_cpp_example_reproduces_run(manifest, package, photos, tmp_path, photo, sigma,
                                        seed):
    """Image and kernel as exact float32 .npy; σ given (/255) or estimated in C++: within 1e-4
    of ``run()`` and within ``SAME_PROGRAM`` of the compiled program's loop in Python."""
    image, kernel = tmp_path / "out.npy", tmp_path / "k.npy"
    args = [PACKAGE, photos[photo], image, "--kernel-out", kernel, "--seed", seed]
    done = _deblur(*args, *([] if sigma is None else ["--sigma", sigma]))
    assert done.returncode == 0, done.stderr
    want = _run(manifest, photos[photo], None if sigma is None else sigma / 255, seed)
    assert ("(estimated)" in done.stdout) == (sigma is None)
    assert f"sigma {255 * want.info['sigma']:.4f}/255" in done.stdout
    got_image, got_kernel = torch.from_numpy(np.load(image)), torch.from_numpy(np.load(kernel))
    torch.testing.assert_close(got_image, want.image, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got_kernel, want.kernel, rtol=0, atol=TOLERANCE)
    same = package.run(photos[photo], None if sigma is None else sigma / 255, seed=seed)
    assert same.info["sigma"] == pytest.approx(want.info["sigma"], rel=1e-6)
    torch.testing.assert_close(got_image, same.image, rtol=0, atol=SAME_PROGRAM)
    torch.testing.assert_close(got_kernel, same.kernel, rtol=0, atol=SAME_PROGRAM)


@needs_binary
def test_the_cpp_example_writes_pngs_of_the_input_depth(manifest, photos, tmp_path):
    image, kernel = tmp_path / "out.png", tmp_path / "k.png"
    done = _deblur(PACKAGE, photos["rgb16"], image, "--kernel-out", kernel, "--sigma", 5)
    assert done.returncode == 0, done.stderr
    restored = load_image(image)
    assert restored.bits == 16 and restored.image.shape == (3, manifest["height"],
                                                            manifest["width"])
    want = _run(manifest, photos["rgb16"], 5 / 255, 0).image
    assert (restored.image - want).abs().max() <= TOLERANCE + 0.5 / 65535
    peak = load_image(kernel)
    assert peak.bits == 16 and peak.image.shape[-1] == manifest["kernel_size"]
    assert peak.image.max() == 1.0


def _with_metadata(package: Path, folder: Path, **changes: str) -> Path:
    """A copy of ``package`` whose program's metadata has ``changes``."""
    shutil.copytree(package, folder)
    source, target = package / "step.pt2", folder / "step.pt2"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("_metadata.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            new.writestr(item, data)
    return folder


@needs_binary
def test_the_cpp_example_fails_cleanly(manifest, photos, tmp_path):
    """Exit 2, one line naming the cause, no output file."""
    out = tmp_path / "out.png"
    small = tmp_path / "small.png"
    small.write_bytes(encode_image(small, torch.rand(3, 8, 8), 8))
    turned = tmp_path / "turned.png"  # Python's load_image would rotate it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(photos["rgb16"]).convert("RGB").save(turned, exif=exif.tobytes())
    height, width = manifest["height"], manifest["width"]
    other = _with_metadata(Path(PACKAGE), tmp_path / "other", torch_version="2.4.0+cpu")
    bigger = str(manifest["grid_height"] + 8)  # the program's inputs then have the wrong shape
    failing = _with_metadata(Path(PACKAGE), tmp_path / "failing", grid_height=bigger)
    older = _with_metadata(Path(PACKAGE), tmp_path / "older", format="3")
    for name in ("observe.pt2", "finish.pt2"):  # format 3 had step.pt2 alone
        (older / name).unlink()
    lost = Path(shutil.copytree(PACKAGE, tmp_path / "lost"))
    (lost / "finish.pt2").unlink()
    cases = [
        ((older, photos["rgb16"], out), "format is not 4 (made by another fastem"),
        ((lost, photos["rgb16"], out), "finish.pt2 missing"),
        ((PACKAGE, small, out), f"the package is for {height}x{width} photos"),
        ((tmp_path, photos["rgb16"], out), "not a fastem package"),
        ((other, photos["rgb16"], out), "made by torch 2.4.0+cpu; this program runs libtorch"),
        ((PACKAGE, photos["rgb16"], out, "--device", "cuda"), "compiled for cpu, not for cuda"),
        ((PACKAGE, photos["rgb16"], out, "--sigma", 1000), "sigma must be in"),
        ((PACKAGE, tmp_path / "missing.png", out), "cannot open"),
        ((PACKAGE, photos["rgb16"], tmp_path / "out.jpg"), "outputs must be .png or .npy"),
        ((failing, photos["rgb16"], out, "--sigma", 5), "the step program failed"),
        ((PACKAGE, turned, out), "has EXIF orientation 6 (not upright)"),
    ]
    for args, message in cases:
        done = _deblur(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert not out.exists()


@needs_binary
def test_another_build_of_the_same_torch_release_is_accepted(manifest, photos, tmp_path):
    """Only major.minor.patch must match (the local part, +cpu or +cu128, may differ)."""
    release = torch.__version__.split("+")[0]
    other = _with_metadata(Path(PACKAGE), tmp_path / "other", torch_version=release + "+cu999")
    done = _deblur(other, photos["rgb16"], tmp_path / "out.npy", "--sigma", 5)
    assert done.returncode == 0, done.stderr


@needs_binary
def test_the_api_check_passes_with_a_failing_program(manifest, tmp_path):
    """``fastem_api_check`` (built beside ``fastem_deblur``) with a package whose step program
    refuses its inputs: a one-line fastem::Error, not AOTInductor's multi-line error."""
    check = Path(BINARY).with_name("fastem_api_check")
    if not check.is_file():
        pytest.skip(f"{check} is not built")
    bigger = str(manifest["grid_height"] + 8)
    failing = _with_metadata(Path(PACKAGE), tmp_path / "failing", grid_height=bigger)
    done = subprocess.run([str(check), PACKAGE, str(failing)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a failing step program throws a one-line fastem::Error" in done.stdout


def _read_until(process: subprocess.Popen, marker: bytes, timeout: float) -> bytes:
    """The process's stderr up to ``marker`` (fails after ``timeout`` seconds or at its end)."""
    seen, deadline = b"", time.monotonic() + timeout
    fd = process.stderr.fileno()
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} on stderr within {timeout} s: {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"stderr ended before {marker!r}: {seen!r}"
            seen += chunk
    return seen


@needs_binary
def test_ctrl_c_cancels_the_cpp_run(photos, tmp_path):
    """SIGINT once the example says it is running sets the cancel flag, which run() checks
    before each step and after the last: exit 130, nothing written, whenever it lands."""
    out = tmp_path / "out.png"
    process = subprocess.Popen([BINARY, PACKAGE, str(photos["rgb16"]), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        seen = _read_until(process, b"running", timeout=300)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, seen + rest
    assert b"cancelled after" in rest and not out.exists()
