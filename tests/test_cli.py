"""The fastem command: outputs, 16-bit round trips, and clean failures (exit 2, no traceback)."""

import json
import subprocess
import sys
import zlib

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
    preview = tmp_path / "k_view.png"
    code = main(["deblur", str(photo), "-o", str(out), "--sigma", "5", "--kernel-out",
                 str(kernel), "--report", str(report), "--kernel-preview", str(preview), *FAST])
    assert code == 0
    view = np.asarray(Image.open(preview))
    assert view.shape == (256, 256, 3) and view.max() == 255
    assert Image.open(out).size == (30, 24) and Image.open(out).mode == "RGB"
    assert read_png16(kernel).shape == (5, 5, 1)
    info = json.loads(report.read_text())
    assert info["sigma"] == pytest.approx(5 / 255) and info["steps"] == 3
    assert info["restarts"]["count"] == 3 and info["restarts"]["seeds"] == [0, 1, 2]
    printed = capsys.readouterr().out
    assert "reblur RMSE" in printed and f"restart {info['restarts']['kept'] + 1} of 3" in printed
    assert main(["deblur", str(photo), "-o", str(out), "--report", str(report), "--restarts",
                 "1", "--seed", "5", *FAST]) == 0
    assert json.loads(report.read_text())["restarts"]["seeds"] == [5]


def test_16bit_in_16bit_out(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (20, 22, 3), dtype=np.uint16)
    src, out = tmp_path / "in16.png", tmp_path / "out16.png"
    src.write_bytes(encode_png16(pixels))
    assert main(["deblur", str(src), "-o", str(out), *FAST]) == 0
    assert read_png16(out).shape == (20, 22, 3)
    grey, grey_out = tmp_path / "in16.tif", tmp_path / "out16.tif"
    Image.fromarray(pixels[:, :, 0]).save(grey)  # I;16: a 16-bit grey TIFF, written as one
    assert main(["deblur", str(grey), "-o", str(grey_out), *FAST]) == 0
    with Image.open(grey_out) as written:
        assert written.mode == "I;16" and written.size == (22, 20)
        assert np.any(np.array(written) % 257)  # not 8-bit values scaled up


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sigma", "0"], "sigma"),
        (["--sigma", "200"], "sigma"),
        (["--kernel-size", "2"], "--kernel-size"),
        (["--particles", "0"], "particles"),
        (["--restarts", "0"], "restarts must be"),
        (["--sigma", "-5"], "got -5"),  # in the units typed, not -0.0196
        (["--sigma", "1e-30"], "--sigma"),
        (["--report", "r.txt"], "--report"),
        (["--kernel-out", "k.txt"], "--kernel-out"),
        (["--mean-out", "out.png"], "also -o/--output"),
        (["--threads", "0"], "--threads"),
        (["--method", "pigdm"], "kernel="),
        (["--method", "pigdm", "--kernel", "missing.npy"], "not found"),
    ],
)
def test_bad_options_exit_2_with_one_message(photo, tmp_path, capsys, extra, match,
                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
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
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "small.png")
    assert main(["deblur", str(tmp_path / "small.png"), "-o", "/no/such/dir/o.png", *FAST]) == 2
    assert "folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_demo_writes_a_panel(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--size", "64", *FAST, "--kernel-size", "9"]) == 0
    width, height = Image.open(out).size
    assert width == 3 * 64 and height > 2 * 64


def test_demo_of_a_non_blind_method_restores_with_the_true_kernel(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--size", "64", *FAST, "--kernel-size", "9",
                 "--method", "pigdm"]) == 0
    line = capsys.readouterr().out
    assert float(line.split("kernel MSE ")[1].split(" ")[0]) < 1e-12 and out.exists()


def test_console_entry_point_runs_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastem_ext.cli", "deblur",
                             str(tmp_path / "nope.png"), "-o", str(tmp_path / "o.png")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_outputs_are_checked_before_the_run(photo, tmp_path, capsys, monkeypatch):
    """Every output is checked before any work, and a failing run writes nothing."""
    import fastem_ext.cli as cli

    calls = []
    monkeypatch.setattr(cli, "run", lambda *a, **k: calls.append(1))
    cases = [
        (["-o", str(photo)], "is also the input"),
        (["-o", str(tmp_path)], "is a directory"),
        (["-o", str(tmp_path / "o.png"), "--kernel-out", str(tmp_path / "o.png")],
         "is also -o/--output"),
        (["-o", str(tmp_path / "o.txt")], "must end in one of"),
        (["-o", str(tmp_path / "o.bufr")], "unsupported image format"),  # listed, not writable
        (["-o", str(tmp_path / "o.png"), "--kernel-out", str(tmp_path / "k.qoi")],
         "unsupported image format"),  # QOI takes RGB, not a grey kernel
        (["-o", str(tmp_path / "o.png"), "--report", str(tmp_path / "nodir" / "r.json")],
         "folder does not exist"),
    ]
    for options, match in cases:
        assert main(["deblur", str(photo), *options, *FAST]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_an_output_format_is_tried_with_the_size_and_bits_it_will_hold(tmp_path, capsys,
                                                                      monkeypatch):
    """WebP takes at most 16383 pixels a side: a wider photo is refused before the run."""
    import fastem_ext.cli as cli

    calls = []
    monkeypatch.setattr(cli, "run", lambda *a, **k: calls.append(1))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((16, 17000), 128, np.uint8)).save(wide)
    assert main(["deblur", str(wide), "-o", str(tmp_path / "o.webp"), *FAST]) == 2
    assert "WebP" in capsys.readouterr().err and calls == []


def test_bad_kernel_files_exit_2_before_the_run(photo, tmp_path, capsys):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "complex.npy", np.ones((5, 5), complex))
    np.save(tmp_path / "k5.npy", np.ones((5, 5)))
    np.save(tmp_path / "k0.npy", np.ones((0, 0)))
    for name, extra, match in (("empty.npy", [], "cannot read"),
                               ("complex.npy", [], "real numbers"),
                               ("k0.npy", ["--kernel-out", "k.tif"], "--kernel is empty"),
                               ("k5.npy", ["--kernel-size", "9"],
                                "kernel_size 9 disagrees with the given 5x5")):
        out = tmp_path / "o.png"
        assert main(["deblur", str(photo), "-o", str(out), "--method", "pigdm", "--kernel",
                     str(tmp_path / name), *FAST[:4], *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastem: error:") and match in err and "Traceback" not in err
        assert not out.exists()


def test_a_corrupt_16bit_png_header_is_an_input_error(tmp_path, capsys):
    """An IHDR chunk longer than 13 bytes (Pillow opens it) used to crash the 16-bit reader."""
    data = bytearray(encode_png16(np.zeros((16, 16, 3), np.uint16)))
    ihdr = 8  # the first chunk: length, type, 13 bytes, CRC
    body = bytes(data[ihdr + 8:ihdr + 21]) + b"\0"
    chunk = len(body).to_bytes(4, "big") + b"IHDR" + body
    chunk += zlib.crc32(b"IHDR" + body).to_bytes(4, "big")
    path = tmp_path / "bad16.png"
    path.write_bytes(bytes(data[:ihdr]) + chunk + bytes(data[ihdr + 25:]))
    assert main(["deblur", str(path), "-o", str(tmp_path / "o.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "input: cannot read" in err and "IHDR" in err and "Traceback" not in err


def test_the_projects_warnings_are_one_line_each(photo, tmp_path, capsys, monkeypatch):
    """A restart left out is one ``fastem: warning:`` line, every time (a batch warns per
    image), as the command's errors are."""
    import warnings

    import fastem_ext.cli as cli
    from fastem_ext.restarts import RestartsDiverged

    def warns(*args, **kwargs):
        for _ in range(2):
            warnings.warn("restarts [1] of 3 diverged", RestartsDiverged, stacklevel=1)
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "run", warns)
    assert main(["deblur", str(photo), "-o", str(tmp_path / "o.png"), *FAST]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "fastem: warning: restarts [1] of 3 diverged"] * 2 + ["fastem: error: stop here"]


def test_a_failing_run_writes_no_output(photo, tmp_path, capsys, monkeypatch):
    import fastem_ext.cli as cli

    def diverges(*args, **kwargs):
        raise RuntimeError("sampling produced NaN or infinite values")

    monkeypatch.setattr(cli, "run", diverges)
    out, report = tmp_path / "o.png", tmp_path / "r.json"
    assert main(["deblur", str(photo), "-o", str(out), "--report", str(report), *FAST]) == 2
    assert "NaN" in capsys.readouterr().err and not out.exists() and not report.exists()


def test_nonblind_kernel_from_a_file(photo, tmp_path):
    from fastem_ext.motion import motion_kernel

    kernel = motion_kernel(9, seed=1).numpy() * 7.0  # any scale
    np.save(tmp_path / "k.npy", kernel)
    out, estimate = tmp_path / "o.png", tmp_path / "k_out.npy"
    assert main(["deblur", str(photo), "-o", str(out), "--method", "pigdm", "--kernel",
                 str(tmp_path / "k.npy"), "--kernel-out", str(estimate), *FAST[:4],
                 "--quiet"]) == 0
    np.testing.assert_allclose(np.load(estimate), kernel / kernel.sum(), atol=1e-7)


def test_demo_checks_its_options_first(tmp_path, capsys):
    for options, match in ((["-o", str(tmp_path / "x.txt")], "must end in one of"),
                           (["--kernel-size", "0"], "--kernel-size"),
                           (["--seed", str(2**64 - 1)], "--seed must be"),
                           (["--kernel-seed", "-1"], "--kernel-seed must be"),
                           (["--size", "64", "--kernel-size", "40"], "--kernel-size")):
        assert main(["demo", *options, "--quiet"]) == 2
        assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "even.png"
    assert main(["demo", "-o", str(out), "--size", "64", *FAST, "--kernel-size", "10"]) == 0


def test_help_explains_every_option_without_markup(capsys):
    from fastem_ext.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "deblur" in a.choices).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"fastem {name} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


@pytest.mark.parametrize(("busy", "cores", "threads"), [(0.1, 2, 2), (1.2, 2, 1), (6.0, 2, 1),
                                                         (0.0, 8, 8), (2.6, 8, 5)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, busy, cores, threads):
    import os

    from fastem_ext import hardware

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(hardware, "busy_cores", lambda ids: busy)
    assert hardware.default_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's or the scheduler's choice wins
    assert hardware.default_threads() is None


def test_busy_cores_sees_a_busy_process():
    import os
    import time

    from fastem_ext.hardware import busy_cores

    cores = sorted(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(cores, interval=0.5) > 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_the_cli_sets_the_thread_count(photo, tmp_path, monkeypatch):
    import torch

    import fastem_ext.cli as cli

    monkeypatch.setattr(cli, "default_threads", lambda: 1)
    assert main(["deblur", str(photo), "-o", str(tmp_path / "a.png"), *FAST]) == 0
    assert torch.get_num_threads() == 1
    assert main(["deblur", str(photo), "-o", str(tmp_path / "b.png"), *FAST, "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """SIGINT while torch is still being imported (the console script's first seconds)."""
    import signal
    import time

    script = ("import sys; print('ready', flush=True); from fastem_ext.launch import main; "
              "sys.argv[1:] = ['demo', '-o', sys.argv[1]]; sys.exit(main())")
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "demo.png")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"  # Python is up, its handler installed
    time.sleep(0.15)  # inside main()'s import of the command line (torch: a second or more)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_importing_the_package_imports_no_torch():
    code = "import sys, fastem_ext; print('torch' in sys.modules, callable(fastem_ext.run))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]


def test_the_console_script_flushes_and_returns_the_exit_code(tmp_path):
    script = "import sys; from fastem_ext.launch import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", script, "deblur", str(tmp_path / "no.png"),
                           "-o", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("fastem: error:")
    assert "Traceback" not in done.stderr


def test_any_pillow_format_and_long_names_are_written(photo, tmp_path):
    long_name = tmp_path / ("x" * 240 + ".png")
    assert main(["deblur", str(photo), "-o", str(tmp_path / "out.ppm"), "--mean-out",
                 str(long_name), *FAST]) == 0
    assert Image.open(tmp_path / "out.ppm").size == (30, 24) and long_name.exists()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png", ".png", ".ppm"]



def test_large_photo_options_and_16bit_crops_path(tmp_path, capsys):
    """Above --working-size: the crops path, 16-bit in and out, its stages in the report;
    --fast and --full-diffusion together are refused (exit 2, one line)."""
    pixels = np.random.default_rng(3).integers(0, 65536, (50, 70, 3), dtype=np.uint16)
    src, out, report = tmp_path / "big16.png", tmp_path / "out16.png", tmp_path / "r.json"
    src.write_bytes(encode_png16(pixels))
    args = ["deblur", str(src), "-o", str(out), "--report", str(report), "--working-size",
            "40", "--crops", "2", "--max-batch", "4", "--tile-steps", "2", *FAST]
    assert main(args) == 0
    assert read_png16(out).shape == (50, 70, 3)
    info = json.loads(report.read_text())
    assert info["path"] == "crops + tiles" and info["stages"]["tiles"]["steps"] == 2
    assert len(info["stages"]["crops"]["boxes"]) == 2
    assert "crops + tiles" in capsys.readouterr().out
    assert main([*args[:4], "--fast", *FAST]) == 0
    assert "crops + fast" in capsys.readouterr().out
    assert main([*args[:4], "--fast", "--full-diffusion", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastem: error: ") and "choose one" in err and err.count("\n") == 1


@pytest.mark.parametrize("ignored", [False, True], ids=["sigint", "sigint-ignored"])
def test_ctrl_c_swallowed_by_an_import_still_ends_the_start_up(ignored):
    """A module imported at start-up that catches everything (a bare ``except:``) swallows the
    KeyboardInterrupt of a Ctrl-C; the console script must still stop with 130, not run on. A
    process started with SIGINT ignored (a background job of a script) ignores it, as before."""
    import signal

    script = """
import importlib.abc, importlib.machinery, os, signal, sys, types

class Swallowing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "fastem_ext.cli":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except:  # noqa: E722 (what a careless third-party import does)
            pass
        module.main = lambda: 0

sys.meta_path.insert(0, Swallowing())
from fastem_ext.launch import main
sys.exit(main())
"""
    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, preexec_fn=ignore if ignored else None)
    assert "Traceback" not in result.stderr
    if ignored:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 130, result.stderr
        assert "interrupted during start-up" in result.stderr
