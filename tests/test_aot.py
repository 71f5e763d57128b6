"""The exported programs (``fastem_ext.aot``): the traced observe, step and finish programs in
the C++ API's loop give ``run()``'s result for the same photo, σ and seed; packages are checked
before use.

The AOTInductor compilation takes minutes and runs in CI only (tests/test_aot_cpp.py); here the
exported programs run uncompiled (``Package(manifest, modules(programs))``).
"""

import json
import re
import warnings

import pytest
import torch
from ops_helpers import NO_EXT

from fastem_ext import aot, run
from fastem_ext.boundary import Frame
from fastem_ext.cli import main
from fastem_ext.noise import estimate_noise
from fastem_ext.restarts import default_restarts
from fastem_ext.settings import WORKING_SIZE

SETTINGS = dict(prior="gaussian", steps="5", kernel_size=9)


@pytest.mark.parametrize("method, boundary, channels, sigma", [
    ("fastem-pigdm", "valid", 3, 0.05),
    ("fastem-dps", "circular", 1, None),
])
def test_the_exported_step_reproduces_run(method, boundary, channels, sigma):
    """Particles and kernel within 1e-5 of ``run()``, with σ given (not the traced example's
    10/255: a σ frozen by tracing would fail) or estimated, RGB or grey, two particles."""
    programs, manifest = aot.trace(24, 32, method=method, boundary=boundary, particles=2,
                                   **SETTINGS)
    package = aot.Package(manifest, aot.modules(programs))
    photo = torch.rand(channels, 24, 32, generator=torch.Generator().manual_seed(1))
    got = package.run(photo, sigma, seed=3)
    want = run(photo, sigma, method=method, boundary=boundary, particles=2, seed=3,
               progress=False, **SETTINGS)
    assert got.particles.shape == want.particles.shape == (2, channels, 24, 32)
    torch.testing.assert_close(got.particles, want.particles, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.kernel, want.kernel, rtol=0, atol=1e-5)
    assert got.info["sigma"] == want.info["sigma"]
    assert manifest["restarts"] == default_restarts(method)  # run()'s: the same one kept
    got_restarts, want_restarts = got.info["restarts"], want.info["restarts"]
    assert got_restarts["kept"] == want_restarts["kept"]
    assert got_restarts["total_variation"] == pytest.approx(want_restarts["total_variation"],
                                                            abs=1e-6)


@pytest.fixture(scope="module")
def traced():
    """The default method's programs for 24×32 photos, uncompiled, and its manifest."""
    programs, manifest = aot.trace(24, 32, **SETTINGS)
    return programs, aot.modules(programs), manifest


def _inputs(program):
    return [spec.arg.name for spec in program.graph_signature.input_specs
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]


def test_the_manifest_describes_the_programs(traced):
    programs, _, manifest = traced
    assert list(programs) == list(aot.PROGRAMS)
    assert (manifest["height"], manifest["width"]) == (24, 32)
    assert (manifest["grid_height"], manifest["grid_width"]) == (32, 40)  # + K//2 on each side
    assert manifest["steps"] == 5 and manifest["torch_version"] == torch.__version__
    assert manifest["path"] == "whole image"
    assert len(manifest["initial_kernel"]) == 81
    assert sum(manifest["initial_kernel"]) == pytest.approx(1.0)
    assert [len(_inputs(programs[name])) for name in aot.PROGRAMS] == [1, 7, 2]
    assert [len(programs[name].graph_signature.output_specs) for name in aot.PROGRAMS] \
        == [3, 2, 4]
    if not NO_EXT:  # the fused ops stay calls by name, for AOTInductor's proxy executor
        assert set(manifest["fastem_ops"].split()) == {"ddpm_update", "kernel_project",
                                                        "predict_x0", "spectral_sums"}
    metadata = aot._metadata(manifest)
    assert all(isinstance(value, str) for value in metadata.values())
    assert [float(v) for v in metadata["initial_kernel"].split()] == manifest["initial_kernel"]


def _fake_package(folder, **changes):
    folder.mkdir()
    for name in aot.PROGRAMS:
        (folder / aot.program_file(name)).write_bytes(b"not a program")
    manifest = {**dict.fromkeys(aot.RUN_KEYS, 8), "format": aot.FORMAT,
                "torch_version": torch.__version__, "device": "cpu", "fastem_ops": "", **changes}
    (folder / aot.MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def test_load_package_refuses_bad_packages(tmp_path):
    with pytest.raises(ValueError, match="not a fastem package"):
        aot.load_package(tmp_path)
    old = _fake_package(tmp_path / "old", torch_version="2.4.0+cpu")
    with pytest.raises(ValueError) as refused:
        aot.load_package(old)
    assert f"made by torch 2.4.0+cpu; this is torch {torch.__version__}" in str(refused.value)
    release = aot.torch_release(torch.__version__)
    for build in (release + "+cu999", release + "a0+git1234", release):  # the release matches
        with pytest.raises(ValueError, match="bad package observe program"):  # not one
            aot.load_package(_fake_package(tmp_path / build, torch_version=build))
    lacking = _fake_package(tmp_path / "lacking")
    manifest = json.loads((lacking / aot.MANIFEST_FILE).read_text())
    del manifest["restarts"], manifest["steps"]
    (lacking / aot.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="restarts, steps missing"):
        aot.load_package(lacking)
    for bad in (0, 2.0, True, "3"):
        with pytest.raises(ValueError, match=f"restarts must be an integer of at least 1, got "
                                             f"{re.escape(repr(bad))}"):
            aot.load_package(_fake_package(tmp_path / f"restarts{bad!r}", restarts=bad))
    for other in (aot.FORMAT - 1, aot.FORMAT + 1):  # older (guidance, re-centring) or newer
        with pytest.raises(ValueError, match=f"format is not {aot.FORMAT} .*export it again"):
            aot.load_package(_fake_package(tmp_path / f"format{other}", format=other))
    broken = _fake_package(tmp_path / "broken")
    (broken / aot.MANIFEST_FILE).write_text("{")
    with pytest.raises(ValueError, match="bad package manifest"):
        aot.load_package(broken)
    lost = _fake_package(tmp_path / "lost")
    (lost / aot.program_file("finish")).unlink()
    with pytest.raises(ValueError, match="lost: finish.pt2 missing"):
        aot.load_package(lost)
    older = _fake_package(tmp_path / "older", format=3)  # step.pt2 alone, as format 3 had
    for name in ("observe", "finish"):
        (older / aot.program_file(name)).unlink()
    with pytest.raises(ValueError, match=f"format is not {aot.FORMAT} .*export it again"):
        aot.load_package(older)


def test_a_package_needs_its_three_programs(traced):
    _, modules, manifest = traced
    with pytest.raises(ValueError, match="needs the programs observe, step, finish, got step"):
        aot.Package(manifest, {"step": modules["step"]})


@pytest.mark.parametrize("height, width, channels, boundary", [
    (37, 53, 3, "valid"), (41, 29, 1, "valid"), (9, 8, 1, "valid"), (32, 48, 1, "circular"),
])
def test_the_observe_program_is_the_padding_and_noise_estimate_of_run(height, width, channels,
                                                                      boundary):
    """Odd and even sizes, grey (repeated on three channels, as the loop passes it) and colour:
    the grid, the mask and exactly ``estimate_noise``'s σ of the photo as it is."""
    programs, manifest = aot.trace(height, width, prior="gaussian", steps="2", kernel_size=3,
                                   boundary=boundary)
    photo = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(height))
    colour = photo.expand(3, -1, -1).contiguous()
    y, mask, level = programs["observe"].module()(colour)
    assert float(level) == estimate_noise(photo) and level.dtype == torch.float64
    m = manifest
    frame = Frame(height, width, m["top"], m["left"], m["grid_height"], m["grid_width"],
                  bool(m["masked"]))
    want_y, want_mask = frame.pad(colour)
    assert torch.equal(y, want_y)
    assert torch.equal(mask, torch.ones_like(y[:1]) if want_mask is None else want_mask)
    assert mask.shape == (1, manifest["grid_height"], manifest["grid_width"])


def test_the_torch_release_ignores_local_and_development_parts():
    assert aot.torch_release("2.13.0+cpu") == aot.torch_release("2.13.0") == "2.13.0"
    assert aot.torch_release("2.13.0a0+git1234") == "2.13.0"
    assert aot.torch_release("2.13.0.dev20250101+cu128") == "2.13.0"
    assert aot.torch_release("2.13.1") != aot.torch_release("2.13.0")


def test_a_package_run_refuses_non_finite_results(traced):
    """As ``run()``: a step that diverges is a RuntimeError, not NaN in the result."""
    _, modules, manifest = traced

    def diverging(x, kernel, *rest):
        return x * float("nan"), kernel

    with pytest.raises(RuntimeError, match="sampling produced NaN or infinite values"):
        aot.Package(manifest, {**modules, "step": diverging}).run(torch.rand(3, 24, 32), 0.05)

    def bad_kernel(x, kernel, *rest):
        return x, kernel * float("inf")

    with pytest.raises(RuntimeError, match="kernel with NaN or infinite values"):
        aot.Package(manifest, {**modules, "step": bad_kernel}).run(torch.rand(3, 24, 32), 0.05)


def test_a_package_run_leaves_out_a_diverging_restart_as_run_does(traced):
    """Restart 1 of 3 diverges (the step counts its calls, 5 a restart): the package keeps the
    best of the others and reports it, as ``run()``."""
    _, modules, manifest = traced
    calls = []

    def second_diverges(*args):
        calls.append(1)
        x, kernel = modules["step"](*args)
        return (x * float("nan") if (len(calls) - 1) // manifest["steps"] == 1 else x), kernel

    with pytest.warns(RuntimeWarning, match=r"restarts \[1\] of 3 diverged"):
        got = aot.Package(manifest, {**modules, "step": second_diverges}).run(
            torch.rand(3, 24, 32), 0.05, seed=2)
    report = got.info["restarts"]
    assert report["diverged"] == [1] and report["kept"] in (0, 2)
    assert report["total_variation"][1] is None and bool(torch.isfinite(got.particles).all())


class _Stop(Exception):
    pass


def _no_compile(*args, **kwargs):
    raise _Stop("not compiled in this test")


def test_export_warns_where_run_takes_the_crops_path(tmp_path, monkeypatch, capsys):
    """A photo that run() restores by crops + tiles (above the working size, more pixels than
    3 crops of 248² cover): one warning that the package is the whole-image diffusion (Python
    and the CLI, one line); the compile itself is skipped. A photo above the working size
    that run() restores whole gets none."""
    import torch._inductor

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", _no_compile)
    height, width = WORKING_SIZE + 8, 720  # 190,080 pixels > 3 × 248²
    with pytest.warns(aot.WholeImageWarning, match="matches run\\(..., full_diffusion=True\\)"):
        with pytest.raises(_Stop):
            aot.export(tmp_path / "p", height, width, **SETTINGS)
    assert not (tmp_path / "p").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", aot.WholeImageWarning)
        with pytest.raises(_Stop):
            aot.export(tmp_path / "p", height, 64, **SETTINGS)
    with pytest.raises(_Stop):
        main(["export", str(tmp_path / "q"), "--size", f"{height}x{width}", "--prior",
              "gaussian", "--steps", "5", "--kernel-size", "9"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastem: warning: a {height}x{width} "
                                                    "package runs")


def test_export_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        aot.export(tmp_path / "p", 32, 32, method="diffem-pigdm", **SETTINGS)
    with pytest.raises(ValueError, match="already exists"):
        aot.export(tmp_path, 32, 32, **SETTINGS)
    with pytest.raises(ValueError, match="kernel_size"):
        aot.export(tmp_path / "p", 16, 16, prior="gaussian", kernel_size=33)
    with pytest.raises(ValueError, match=r"height must be \[8, "):  # run() takes no less
        aot.export(tmp_path / "p", 7, 7, prior="gaussian", kernel_size=3)
    assert not (tmp_path / "p").exists()


def test_a_package_runs_photos_of_its_size_only(traced):
    _, modules, manifest = traced
    with pytest.raises(ValueError, match="package is for 24x32 photos"):
        aot.Package(manifest, modules).run(torch.rand(3, 32, 24), 0.05)


@pytest.mark.parametrize("size", ["64", "64x", "axb", "64x64x3"])
def test_cli_export_refuses_a_bad_size(size, tmp_path, capsys):
    assert main(["export", str(tmp_path / "p"), "--size", size]) == 2
    assert "fastem: error: --size must be HxW" in capsys.readouterr().err
