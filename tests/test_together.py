"""``run_together()``: photos of one size share each network call (kernel groups, ``step``), each
photo's result its own ``run()``; failures stay with their photo. And ``fastem batch
--batch-images``, which uses it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastem_ext.batch as batch_module
from fastem_ext import Diverged, run, run_batch, run_together
from fastem_ext.api import SharedCallFailed
from fastem_ext.cli import SOME_FAILED, main
from fastem_ext.io import LoadedImage
from fastem_ext.manifest import read_records

SMALL = dict(prior="gaussian", steps="4", kernel_size=5, progress=False, seed=2)


def _photos(count: int, shape=(3, 24, 28), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) for _ in range(count)]


def _assert_same(got, want) -> None:
    """Bit for bit: the Gaussian prior treats every sample alone, as groups do."""
    assert torch.equal(got.particles, want.particles)
    assert torch.equal(got.kernel, want.kernel)
    assert got.info["restarts"] == want.info["restarts"]
    assert got.info["sigma"] == want.info["sigma"]


@pytest.mark.parametrize("method", ["fastem-pigdm", "fastem-dps"])
@pytest.mark.parametrize("batch_restarts", [False, True])
def test_photos_together_are_their_single_runs(method, batch_restarts):
    """Colour and grey photos, noise levels estimated each, three restarts."""
    photos = [*_photos(2), _photos(1, (1, 24, 28), seed=1)[0]]
    options = dict(SMALL, method=method, restarts=3, batch_restarts=batch_restarts)
    together = run_together(photos, None, **options)
    for photo, got in zip(photos, together, strict=True):
        want = run(photo, None, **options)
        _assert_same(got, want)
        assert got.info["images_together"] == 3 and want.info["images_together"] == 1
        assert got.image.shape == photo.shape


def test_sizes_and_paths_are_grouped_and_the_order_kept():
    """Two sizes on the whole-image path and one photo on the crops path: each its own run,
    in the order given; only photos of one size share calls."""
    a, b = _photos(2)
    c, = _photos(1, (3, 26, 22), seed=2)
    large, = _photos(1, (3, 40, 64), seed=3)
    options = dict(SMALL, working_size=32, tile_steps="2", restarts=2)
    together = run_together([a, c, large, b], 0.05, **options)
    assert [r.info["path"] for r in together] == ["whole image", "whole image",
                                                  "crops + tiles", "whole image"]
    assert [r.info["images_together"] for r in together] == [2, 1, 1, 2]
    for photo, got in zip([a, c, large, b], together, strict=True):
        _assert_same(got, run(photo, 0.05, **options))


def test_a_photo_that_fails_gets_its_error_and_the_others_go_on(tmp_path):
    text = tmp_path / "text.png"
    text.write_text("not an image")
    good, other = _photos(2)
    tiny = torch.rand(3, 8, 8)  # too small for a 5×5 kernel
    nan = good.clone()
    nan[0, 3, 4] = float("nan")
    results = run_together([good, text, tiny, nan, other], 0.05, **SMALL)
    assert isinstance(results[1], ValueError) and "cannot read" in str(results[1])
    assert isinstance(results[2], ValueError) and "kernel_size" in str(results[2])
    assert isinstance(results[3], ValueError) and "NaN" in str(results[3])
    _assert_same(results[0], run(good, 0.05, **SMALL))
    _assert_same(results[4], run(other, 0.05, **SMALL))
    assert results[0].info["images_together"] == 2


def test_a_photo_whose_restarts_all_diverge_fails_alone():
    """The network turns the second photo's rows NaN (rows are photo-major): that photo
    diverges in every restart, the first is its single run."""
    def eps(x, t):
        out = 0.5 * x
        if len(x) == 2:
            out = out.clone()
            out[1] = float("nan")
        return out

    first, second = _photos(2)
    options = dict(SMALL, prior=eps, restarts=2, steps="3")
    results = run_together([first, second], 0.05, **options)
    assert isinstance(results[1], Diverged) and "all 2 restarts diverged" in str(results[1])
    want = run(first, 0.05, **dict(options, prior=lambda x, t: 0.5 * x))
    _assert_same(results[0], want)


def test_a_restart_that_diverges_is_named_by_its_photo(tmp_path):
    """The second photo's rows go NaN in the first restart only (three steps per restart):
    the warning names that photo, and both photos keep a result."""
    calls = []

    def eps(x, t):  # the first call is the prior's probe, of one row
        calls.append(len(x))
        out = 0.5 * x
        if len(x) == 2 and len(calls) <= 4:
            out = out.clone()
            out[1] = float("nan")
        return out

    paths = []
    for index, photo in enumerate(_photos(2)):
        paths.append(tmp_path / f"p{index}.png")
        Image.fromarray((photo.permute(1, 2, 0) * 255).byte().numpy()).save(paths[-1])
    with pytest.warns(RuntimeWarning, match=r"^photo 2 of 2 \(.*p1\.png\): restarts \[0\] "
                      r"of 2 diverged"):
        results = run_together(paths, 0.05, **dict(SMALL, prior=eps, restarts=2, steps="3"))
    assert [r.info["restarts"]["diverged"] for r in results] == [[], [0]]
    assert calls == [1] + [2] * 6


def test_a_photo_read_from_a_file_is_named_alone_and_on_the_crops_path(tmp_path):
    """run() on a file: the warning names the file; here on the crops path (2 crops of a
    45×88 photo, whose first restart's crops go NaN after the prior's probe)."""
    calls = []

    def eps(x, t):
        calls.append(len(x))
        out = 0.5 * x
        if 2 <= len(calls) <= 4:
            out = out.clone()
            out[0] = float("nan")
        return out

    path = tmp_path / "shaken.png"
    Image.fromarray((_photos(1, (3, 45, 88))[0].permute(1, 2, 0) * 255).byte().numpy()).save(path)
    with pytest.warns(RuntimeWarning, match=r"^.*shaken\.png: restarts \[0\] of 2 diverged"):
        result = run(path, 0.05, **dict(SMALL, prior=eps, restarts=2, steps="3", crops=2,
                                        working_size=48, tile_steps="2"))
    assert result.info["path"] == "crops + tiles"
    assert result.info["restarts"]["diverged"] == [0]


def test_a_shared_call_that_fails_runs_its_photos_alone():
    """A network that cannot take more than one input: the shared call raises, then each photo
    runs alone and succeeds, as ``run()`` would."""
    calls = []

    def eps(x, t):
        calls.append(len(x))
        if len(x) > 1:
            raise RuntimeError("out of memory (pretend)")
        return 0.5 * x

    photos = _photos(2)
    options = dict(SMALL, prior=eps, restarts=1, steps="3")
    with pytest.warns(SharedCallFailed, match="2 photos could not share"):
        results = run_together(photos, 0.05, **options)
    assert 2 in calls and all(r.info["images_together"] == 1 for r in results)
    for photo, got in zip(photos, results, strict=True):
        _assert_same(got, run(photo, 0.05, **dict(options, prior=lambda x, t: 0.5 * x)))


@pytest.mark.parametrize("blurries, options, error, match", [
    ("photo.png", {}, ValueError, "a list of photos"),
    ([torch.rand(3, 24, 24)], {"method": "nope"}, ValueError, "method"),
    ([torch.rand(3, 24, 24)], {"kernel_sise": 5}, TypeError, "kernel_sise"),
    ([torch.rand(3, 24, 24)], {"kernel_size": 2}, ValueError, "kernel_size must be >= 3"),
])
def test_errors_of_the_settings_raise(blurries, options, error, match):
    with pytest.raises(error, match=match):
        run_together(blurries, 0.05, **{**SMALL, **options})


def _folder(path, count: int, shape=(24, 30, 3), seed: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path / f"p{index}.png")


FAST = ["--prior", "gaussian", "--steps", "3", "--kernel-size", "5", "--regularizer", "l2",
        "--threads", "1", "--quiet"]


def test_batch_images_give_the_outputs_of_one_at_a_time(tmp_path, monkeypatch):
    """Three photos of one size, one of another size, one bad file: the outputs of one at a
    time, in calls of at most two photos."""
    calls = []

    def counting(blurries, *args, **kwargs):
        calls.append(len(blurries))
        assert all(isinstance(b, LoadedImage) and b.path.endswith(".png") for b in blurries)
        return run_together(blurries, *args, **kwargs)

    def alone(blurry, *args, **kwargs):  # the photo read from its file, named in warnings
        assert isinstance(blurry, LoadedImage) and blurry.path.endswith(".png")
        return run(blurry, *args, **kwargs)

    monkeypatch.setattr(batch_module, "run_together", counting)
    monkeypatch.setattr(batch_module, "run", alone)
    folder = tmp_path / "in"
    _folder(folder, 3)
    _folder(folder / "other", 1, (26, 20, 3), seed=1)
    (folder / "text.png").write_text("not an image")
    alone, together = tmp_path / "alone", tmp_path / "together"
    assert main(["batch", str(folder), "-o", str(alone), *FAST]) == SOME_FAILED
    assert main(["batch", str(folder), "-o", str(together), "--batch-images", "2",
                 *FAST]) == SOME_FAILED
    names = sorted(path.name for path in alone.iterdir() if path.name != "manifest.jsonl")
    assert names == sorted(path.name for path in together.iterdir()
                           if path.name != "manifest.jsonl") and len(names) == 8
    for name in names:
        assert (alone / name).read_bytes() == (together / name).read_bytes(), name
    statuses = {str(Path(r["input"]).relative_to(folder)): r["status"]
                for r in read_records(together)}
    assert statuses == {"p0.png": "ok", "p1.png": "ok", "p2.png": "ok", "other/p0.png": "ok",
                        "text.png": "failed"}
    assert sorted(calls) == [1, 1, 2]


def test_batch_images_is_a_setting_and_is_checked(tmp_path):
    folder = tmp_path / "in"
    _folder(folder, 2)
    out = tmp_path / "out"
    settings = dict(prior="gaussian", steps="3", kernel_size=5, regularizer="l2",
                    progress=False)
    assert run_batch([folder], out, **settings).processed == 2
    assert run_batch([folder], out, batch_images=1, **settings).processed == 0  # the same job
    assert run_batch([folder], out, batch_images=2, **settings).processed == 2  # another one
    for value, match in ((0, r"batch_images must be \[1, 64\]"), (1.5, "integer")):
        with pytest.raises(ValueError, match=match):
            run_batch([folder], out, batch_images=value, **settings)
    with pytest.raises(ValueError, match="batch_images applies to fastem-pigdm"):
        run_batch([folder], out, method="diffem-pigdm", batch_images=2, **settings)
