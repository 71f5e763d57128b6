"""A compiled package against ``run()``: in Python (``load_package``) and from C++
(``fastem_deblur``, csrc/examples), outputs within 1e-4 for the same photo, σ and seed.

Runs only when CI gives the package and the binary (compiling takes minutes):
``FASTEM_TEST_PACKAGE`` (a folder made by ``fastem export``) and ``FASTEM_DEBLUR_BIN`` (the
built example; the C++ cases skip without it).
"""

import json
import os
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastem_ext import blur, load_package, motion_kernel, run
from fastem_ext.io import encode_image, load_image

PACKAGE = os.environ.get("FASTEM_TEST_PACKAGE")
BINARY = os.environ.get("FASTEM_DEBLUR_BIN")
pytestmark = pytest.mark.skipif(PACKAGE is None, reason="FASTEM_TEST_PACKAGE is not set")
needs_binary = pytest.mark.skipif(BINARY is None, reason="FASTEM_DEBLUR_BIN is not set")
TOLERANCE = 1e-4


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
               guidance_scale=manifest["guidance_scale"], seed=seed, progress=False,
               full_diffusion=True)


def test_the_compiled_package_reproduces_run_in_python(manifest, photos):
    got = load_package(PACKAGE).run(photos["rgb16"], 5 / 255, seed=3)
    want = _run(manifest, photos["rgb16"], 5 / 255, 3)
    torch.testing.assert_close(got.particles, want.particles, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got.kernel, want.kernel, rtol=0, atol=TOLERANCE)


def _deblur(*args):
    return subprocess.run([BINARY, *map(str, args), "--quiet"], capture_output=True, text=True,
                          timeout=600)


@needs_binary
@pytest.mark.parametrize("photo, sigma, seed", [("rgb16", 5.0, 3), ("grey8", None, 0)])
def test_the_cpp_example_reproduces_run(manifest, photos, tmp_path, photo, sigma, seed):
    """Image and kernel as exact float32 .npy; σ given (/255) or estimated in C++."""
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


def _with_torch_version(package: Path, folder: Path, version: str) -> Path:
    """A copy of ``package`` whose program's metadata names another torch version."""
    shutil.copytree(package, folder)
    source, target = package / "step.pt2", folder / "step.pt2"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith("_metadata.json"):
                entries = json.loads(data)
                entries["torch_version"] = version
                data = json.dumps(entries).encode()
            new.writestr(item, data)
    return folder


@needs_binary
def test_the_cpp_example_fails_cleanly(manifest, photos, tmp_path):
    """Exit 2, one line naming the cause, no output file."""
    out = tmp_path / "out.png"
    small = tmp_path / "small.png"
    small.write_bytes(encode_image(small, torch.rand(3, 8, 8), 8))
    height, width = manifest["height"], manifest["width"]
    other = _with_torch_version(Path(PACKAGE), tmp_path / "other", "2.4.0+cpu")
    cases = [
        ((PACKAGE, small, out), f"the package is for {height}x{width} photos"),
        ((tmp_path, photos["rgb16"], out), "not a fastem package"),
        ((other, photos["rgb16"], out), "made by torch 2.4.0+cpu; this program runs libtorch"),
        ((PACKAGE, photos["rgb16"], out, "--device", "cuda"), "compiled for cpu, not for cuda"),
        ((PACKAGE, photos["rgb16"], out, "--sigma", 1000), "sigma must be in"),
        ((PACKAGE, tmp_path / "missing.png", out), "cannot open"),
        ((PACKAGE, photos["rgb16"], tmp_path / "out.jpg"), "outputs must be .png or .npy"),
    ]
    for args, message in cases:
        done = _deblur(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert not out.exists()


@needs_binary
def test_ctrl_c_cancels_the_cpp_run(photos, tmp_path):
    """SIGINT after the first step sets the cancel flag: exit 130, nothing written."""
    out = tmp_path / "out.png"
    process = subprocess.Popen([BINARY, PACKAGE, str(photos["rgb16"]), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"step 1/" not in seen:
        byte = process.stderr.read(1)
        assert byte, seen
        seen += byte
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=600)
    assert process.returncode == 130, seen + rest
    assert b"cancelled after" in rest and not out.exists()
