"""The fastem command: outputs, 16-bit round trips, and clean failures (exit 2, no traceback)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastem_ext.cli import main
from fastem_ext.png16 import encode_png16, read_png16

FAST = ["--prior", "gaussian", "--steps", "3", "--kernel-size", "5", "--regularizer", "l2",
        "--quiet"]


@pytest.fixture
def photo(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(rgb).save(path)
    return path


def test_deblur_writes_image_kernel_and_report(photo, tmp_path, capsys):
    out, kernel, report = tmp_path / "out.png", tmp_path / "k.png", tmp_path / "r.json"
    code = main(["deblur", str(photo), "-o", str(out), "--sigma", "5", "--kernel-out",
                 str(kernel), "--report", str(report), *FAST])
    assert code == 0
    assert Image.open(out).size == (30, 24) and Image.open(out).mode == "RGB"
    assert read_png16(kernel).shape == (5, 5, 1)
    info = json.loads(report.read_text())
    assert info["sigma"] == pytest.approx(5 / 255) and info["steps"] == 3
    assert "reblur RMSE" in capsys.readouterr().out


def test_16bit_in_16bit_out(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (20, 22, 3), dtype=np.uint16)
    src, out = tmp_path / "in16.png", tmp_path / "out16.png"
    src.write_bytes(encode_png16(pixels))
    assert main(["deblur", str(src), "-o", str(out), *FAST]) == 0
    assert read_png16(out).shape == (20, 22, 3)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sigma", "0"], "sigma"),
        (["--sigma", "200"], "sigma"),
        (["--kernel-size", "2"], "kernel_size"),
        (["--particles", "0"], "particles"),
    ],
)
def test_bad_options_exit_2_with_one_message(photo, tmp_path, capsys, extra, match):
    out = tmp_path / "out.png"
    assert main(["deblur", str(photo), "-o", str(out), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastem: error:") and match in err and "Traceback" not in err
    assert not out.exists()


def test_missing_unreadable_and_tiny_inputs(tmp_path, capsys):
    (tmp_path / "text.png").write_text("hello")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    for name, match in (("missing.png", "not found"), ("text.png", "cannot read"),
                        ("dot.png", "too small")):
        assert main(["deblur", str(tmp_path / name), "-o", str(tmp_path / "o.png"), *FAST]) == 2
        assert match in capsys.readouterr().err
    assert main(["deblur", str(tmp_path / "dot.png"), "-o", "/no/such/dir/o.png", *FAST]) == 2
    assert "folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_demo_writes_a_panel(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--size", "64", *FAST, "--kernel-size", "9"]) == 0
    width, height = Image.open(out).size
    assert width == 3 * 64 and height > 2 * 64


def test_console_entry_point_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastem_ext.cli", "deblur",
                             str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.png")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
