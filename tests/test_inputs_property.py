"""Property-based tests (hypothesis) over the inputs of ``run()``, ``estimate_kernel()`` and the
command line: every case ends in a finite result of the documented shapes, or in a ``ValueError``
that names the argument (a ``RuntimeError`` naming the stage where a run diverged), and the
command line never prints a traceback nor leaves an output behind when it fails.

Each example changes one argument of a small, fast problem (Gaussian prior, a few steps), so the
message can be checked against that argument's name. Derandomised: CI tries the same cases
every time (``EXAMPLES`` per test).
"""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastem_ext import HQSConfig, estimate_kernel, run
from fastem_ext.cli import main

EXAMPLES = 150
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
FAST = {"prior": "gaussian", "steps": "3", "kernel_size": 5, "regularizer": "l2",
        "progress": False}

ANYTHING = st.one_of(
    st.none(), st.booleans(), st.text(max_size=4), st.complex_numbers(max_magnitude=10),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
    st.just([1, 2]), st.just(torch.zeros(2)), st.just(np.float32("nan")), st.just(np.int64(3)),
)
SMALL_INTS = st.one_of(st.integers(-3, 12), ANYTHING)
FLOATS = st.one_of(st.floats(-1e3, 1e3), st.floats(1e-40, 1e-2), ANYTHING)
WORDS = st.one_of(st.text(max_size=12), ANYTHING)


def _array(draw_shape, values, dtype) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(draw_shape).astype(dtype)


@st.composite
def images(draw):
    """Arrays of any small shape, several dtypes, values in and far out of range."""
    height, width = draw(st.integers(0, 24)), draw(st.integers(0, 24))
    shape = draw(st.sampled_from([(height, width), (height, width, draw(st.integers(0, 5))),
                                  (1, height, width, 3)]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int32,
                                  np.bool_]))
    scale = draw(st.sampled_from([1.0, 255.0, 1e6, -1.0]))
    count = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.random(count) * scale
    if count and draw(st.booleans()):
        values[rng.integers(count)] = draw(st.sampled_from([math.nan, math.inf, -1.0]))
    with np.errstate(invalid="ignore", over="ignore"):
        return _array(shape, values, dtype)


@st.composite
def kernels(draw):
    size = draw(st.integers(1, 9))
    shape = draw(st.sampled_from([(size, size), (size, size + 1), (size,), (1, size, size)]))
    scale = draw(st.sampled_from([1.0, 1e38, 1e-30, -1.0]))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(int(np.prod(shape)))
    kernel = torch.from_numpy(values * scale).reshape(shape).float()
    if draw(st.booleans()):
        kernel.view(-1)[0] = draw(st.sampled_from([math.nan, -0.5, 0.0, math.inf]))
    return kernel


RUN_ARGUMENTS = {
    "sigma": FLOATS,
    "particles": SMALL_INTS,
    "kernel_size": SMALL_INTS,
    "steps": st.one_of(st.text(alphabet="0123456789dim,", max_size=2), SMALL_INTS),
    "seed": st.one_of(st.integers(-(2**65), 2**65), ANYTHING),
    "guidance_scale": FLOATS,
    "method": WORDS,
    "boundary": WORDS,
    "regularizer": WORDS,
    "engine": WORDS,
    "r2": WORDS,
    "rounds": SMALL_INTS,
    "device": st.one_of(st.sampled_from(["meta", "cuda", "tpu", "cpu:0"]), WORDS),
    "prior": st.one_of(st.sampled_from(["", "nonexistent", "x.pt", "ffhq"]), ANYTHING),
    "kernel": st.one_of(kernels(), ANYTHING),
    "blurry": st.one_of(images(), ANYTHING),
    "callback": ANYTHING,
    "mstep": st.one_of(ANYTHING, st.builds(HQSConfig, iters=SMALL_INTS, beta=FLOATS,
                                            lam=FLOATS, regularizer=WORDS, ridge=FLOATS,
                                            coupling_floor=FLOATS)),
}
# What a message may call an argument besides its own name.
ALIASES = {"blurry": ("blurry", "image"), "kernel": ("kernel",), "mstep": (
    "mstep", "iters", "beta", "lam", "regularizer", "ridge", "coupling_floor"),
    "steps": ("steps", "respacing", "section", "timesteps"), "prior": ("prior", "checkpoint"),
    "kernel_size": ("kernel_size", "kernel", "image"), "sigma": ("sigma", "noise level"),
    "method": ("method", "kernel=")}


def _finite_result(result, image_shape) -> None:
    assert torch.isfinite(result.image).all() and torch.isfinite(result.kernel).all()
    assert result.image.shape == image_shape
    assert abs(float(result.kernel.sum()) - 1) < 1e-4


@PROPERTY
@given(st.data())
def test_run_ends_in_a_result_or_a_named_error(data):
    name = data.draw(st.sampled_from(sorted(RUN_ARGUMENTS)))
    value = data.draw(RUN_ARGUMENTS[name], label=name)
    args = {"blurry": torch.rand(3, 20, 22, generator=torch.Generator().manual_seed(0)),
            "sigma": 0.02, **FAST, name: value}
    if name == "method" and value in ("diffem-pigdm",):
        args["rounds"] = 2
    try:
        result = run(args.pop("blurry"), args.pop("sigma"), **args)
    except ValueError as err:
        message = str(err)
        assert message and any(word in message for word in ALIASES.get(name, (name,))), \
            (name, value, message)
    except RuntimeError as err:  # a diverged run: it must say so
        assert "NaN or infinite" in str(err), (name, value, err)
    else:
        channels = 1 if (name == "blurry" and result.image.shape[0] == 1) else 3
        height, width = result.image.shape[-2:]
        _finite_result(result, (channels, height, width))


ESTIMATE_ARGUMENTS = {
    "sigma": FLOATS, "kernel_size": SMALL_INTS, "regularizer": WORDS, "iters": SMALL_INTS,
    "lam": FLOATS, "beta": FLOATS, "init": st.one_of(kernels(), ANYTHING),
    "sharp": st.one_of(st.just(torch.rand(3, 16, 16).half()), st.just(torch.rand(2, 16, 16)),
                       st.just(torch.rand(4, 3, 16, 16)), ANYTHING),
}


@PROPERTY
@given(st.data())
def test_estimate_kernel_ends_in_a_kernel_or_a_named_error(data):
    name = data.draw(st.sampled_from(sorted(ESTIMATE_ARGUMENTS)))
    value = data.draw(ESTIMATE_ARGUMENTS[name], label=name)
    args = {"sharp": torch.rand(3, 16, 16), "blurry": torch.rand(3, 16, 16), "sigma": 0.02,
            "kernel_size": 5, "regularizer": "l2", name: value}
    try:
        kernel = estimate_kernel(args.pop("sharp"), args.pop("blurry"), args.pop("sigma"),
                                 **args)
    except ValueError as err:
        words = {"init": ("init",), "kernel_size": ("kernel_size", "image"),
                 "regularizer": ("regularizer", "denoiser")}.get(name, (name,))
        assert any(word in str(err) for word in words), (name, value, str(err))
    else:
        assert torch.isfinite(kernel).all() and abs(float(kernel.sum()) - 1) < 1e-4


CLI_OPTIONS = st.lists(st.sampled_from([
    ["--sigma", "-5"], ["--sigma", "nan"], ["--sigma", "1e-30"], ["--sigma", "x"],
    ["--sigma", "300"], ["--kernel-size", "0"], ["--kernel-size", "4"], ["--particles", "-1"],
    ["--steps", "0"], ["--steps", "abc"], ["--seed", "-1"], ["--threads", "0"],
    ["--method", "pigdm"], ["--method", "dps", "--kernel", "k.txt"], ["--boundary", "mirror"],
    ["--report", "r.txt"], ["--report", "nodir/r.json"], ["--kernel-out", "k.png"],
    ["--kernel-out", "out.png"], ["--mean-out", "in.png"], ["--prior", "nope.pt"],
    ["--device", "tpu"], ["--regularizer", "tv"], [],
]), max_size=3).map(lambda parts: [word for part in parts for word in part])


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("cli")
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "in.png")
    return folder


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(CLI_OPTIONS)
def test_the_command_line_fails_cleanly_and_writes_all_or_nothing(cli_folder, monkeypatch,
                                                                   options):
    monkeypatch.chdir(cli_folder)
    for path in cli_folder.iterdir():
        if path.name != "in.png":
            path.unlink()
    argv = ["deblur", "in.png", "-o", "out.png", "--prior", "gaussian", "--steps", "3",
            "--kernel-size", "5", "--regularizer", "l2", "--quiet", *options]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)  # argparse's usage errors too return 2 (no SystemExit)
    assert code in (0, 2), (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    written = sorted(p.name for p in cli_folder.iterdir() if p.name != "in.png")
    if code == 2:
        assert written == [], (argv, written)
    else:
        assert "out.png" in written
