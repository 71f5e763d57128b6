"""``fastem batch`` / ``run_batch``: results equal to single runs, failed images recorded, resume
after a killed job, stable output names, and a 2-process gloo job under ``torchrun``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

import fastem_ext.batch as batch_module
import fastem_ext.batch_plan as batch_plan
from fastem_ext.batch import run_batch
from fastem_ext.cli import SOME_FAILED, main
from fastem_ext.manifest import file_sha256, read_records

REPO = Path(__file__).resolve().parents[1]
# One thread: the default follows the idle cores at start-up, and two runs on a busy machine
# could then reduce in different orders (outputs compared bit for bit below).
FAST = ["--prior", "gaussian", "--steps", "3", "--kernel-size", "5", "--regularizer", "l2",
        "--threads", "1", "--quiet"]
SETTINGS = dict(prior="gaussian", steps="3", kernel_size=5, regularizer="l2", progress=False)


def _photos(folder: Path, count: int, seed: int = 0, stem: str = "p") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{stem}{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _files(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


class _CountingRun:
    """Stands in for ``run`` in the batch module: counts calls, raises ``KeyboardInterrupt``
    (a Ctrl-C, or the kill of a job) at call number ``stop_at``."""

    def __init__(self, original, stop_at: int | None) -> None:
        self.original, self.stop_at, self.calls = original, stop_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.original(*args, **kwargs)


@pytest.fixture
def counting_run(monkeypatch):
    original = batch_module.run

    def install(stop_at: int | None = None) -> _CountingRun:
        counter = _CountingRun(original, stop_at)
        monkeypatch.setattr(batch_module, "run", counter)
        return counter

    return install


def test_batch_outputs_equal_single_deblur_runs(tmp_path):
    photos = _photos(tmp_path / "in", 2)
    grey = tmp_path / "in" / "grey.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (26, 20), np.uint8)).save(grey)
    tagged = tmp_path / "in" / "tagged.png"  # its sRGB profile is kept, as deblur keeps it
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (22, 28, 3), np.uint8)).save(
        tagged, icc_profile=srgb)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "-o", str(out), "--seed", "3", *FAST]) == 0
    with Image.open(out / tagged.name) as restored:
        assert restored.info.get("icc_profile") == srgb
    for photo in [*photos, grey, tagged]:
        single, kernel = tmp_path / f"single_{photo.name}", tmp_path / f"{photo.stem}.npy"
        assert main(["deblur", str(photo), "-o", str(single), "--kernel-out", str(kernel),
                     "--seed", "3", *FAST]) == 0
        assert (out / photo.name).read_bytes() == single.read_bytes()
        np.testing.assert_array_equal(np.load(out / f"{photo.stem}.kernel.npy"), np.load(kernel))
    records = read_records(out)
    assert [r["status"] for r in records] == ["ok"] * 4
    assert {r["sha256"] for r in records} == {file_sha256(p) for p in [*photos, grey, tagged]}
    assert all(r["sigma_estimated"] and 0 < r["sigma"] < 0.5 for r in records)


def test_bad_inputs_are_recorded_and_the_job_goes_on(tmp_path, capsys):
    folder = tmp_path / "in"
    good = _photos(folder, 2)
    (folder / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "tiny.png")
    nan = np.full((20, 20), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(folder / "nan.tif")
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), *FAST]) == SOME_FAILED
    assert "3 of 5 failed" in capsys.readouterr().err
    reasons = {Path(r["input"]).name: r["error"] for r in read_records(out)
               if r["status"] == "failed"}
    assert "cannot read" in reasons["text.png"] and "too small" in reasons["tiny.png"]
    assert "NaN" in reasons["nan.tif"]
    assert _files(out) == {"manifest.jsonl", *(f"{p.stem}{s}" for p in good
                                               for s in (".png", ".kernel.npy"))}


def test_interrupted_job_resumes_without_duplicates_or_losses(tmp_path, counting_run):
    photos = _photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    counting_run(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_batch([tmp_path / "in"], out, **SETTINGS)
    first = read_records(out)
    assert len(first) == 2 and all(r["status"] == "ok" for r in first)
    assert len(_files(out)) == 1 + 2 * 2  # the manifest and two finished images, nothing partial
    edited = [dict(first[0], output=5, sha256="edited"),  # hand-edited lines: names are text,
              dict(first[1], kernel=None)]  # and a finished image has both files
    with open(out / "manifest.jsonl", "a") as handle:  # and a writer killed mid-line
        handle.writelines(json.dumps(record) + "\n" for record in edited)
        handle.write('{"input": "in/p9.png", "sha2')
    counter = counting_run()
    result = run_batch([tmp_path / "in"], out, **SETTINGS)
    assert counter.calls == 3 and (result.processed, result.skipped) == (3, 2)
    records = read_records(out)
    assert sorted(r["sha256"] for r in records) == sorted(file_sha256(p) for p in photos)
    assert all(r["status"] == "ok" for r in records)
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 0
    assert counter.calls == 3


def test_changed_settings_or_missing_outputs_are_redone(tmp_path, counting_run):
    _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    counter = counting_run()
    run_batch([tmp_path / "in"], out, **SETTINGS)
    (out / "p1.kernel.npy").unlink()
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 1
    result = run_batch([tmp_path / "in"], out, seed=1, **SETTINGS)
    assert (result.processed, counter.calls) == (3, 7)
    assert _files(out) == {"manifest.jsonl", *(f"p{i}{s}" for i in range(3)
                                               for s in (".png", ".kernel.npy"))}


def test_an_output_folder_inside_the_input_folder_is_not_read_back(tmp_path, counting_run):
    _photos(tmp_path / "in", 2)
    out = tmp_path / "in" / "deblurred"
    counter = counting_run()
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 2
    assert run_batch([str(tmp_path / "in" / "*")], out, **SETTINGS).processed == 0
    assert counter.calls == 2 and len(read_records(out)) == 2


def test_output_names_never_collide_and_stay_with_their_content(tmp_path):
    a, = _photos(tmp_path / "a", 1, seed=1, stem="x")
    b, = _photos(tmp_path / "b", 1, seed=2, stem="x")
    copy = tmp_path / "c" / "copy.png"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    out = tmp_path / "out"
    result = run_batch([a, b, copy], out, **SETTINGS)
    b_name = f"x0-{file_sha256(b)[:8]}"
    assert {r["output"] for r in result.records} == {"x0.png", f"{b_name}.png"}
    assert result.duplicates == {str(copy): str(a)}
    before = (out / "x0.png").read_bytes()
    # b alone, other settings: it keeps its name and a's x0.png is left alone
    again = run_batch([tmp_path / "b"], out, seed=2, **SETTINGS)
    assert again.processed == 1 and again.records[0]["output"] == f"{b_name}.png"
    assert (out / "x0.png").read_bytes() == before


def test_records_of_a_dead_rank_are_used_and_merged(tmp_path, counting_run):
    """A 2-process job whose rank 1 died: its manifest file stays; the rerun (here with one
    process, so also another world size) skips its finished images and merges the file."""
    _photos(tmp_path / "in", 4)
    out = tmp_path / "out"
    run_batch([tmp_path / "in"], out, **SETTINGS)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (out / "manifest.rank1.jsonl").write_text("\n".join(lines[2:]) + "\n")
    (out / Path(json.loads(lines[3])["output"])).unlink()  # in flight when the rank died
    counter = counting_run()
    result = run_batch([tmp_path / "in"], out, **SETTINGS)
    assert (counter.calls, result.skipped) == (1, 3)
    assert not (out / "manifest.rank1.jsonl").exists()
    assert len({r["sha256"] for r in read_records(out)}) == 4 and len(read_records(out)) == 5


@pytest.mark.parametrize("inputs, options, match", [
    ([], {}, "non-empty"),
    (["missing.png"], {}, "no such file"),
    (["*.nothing"], {}, "matches no file"),
    (["in"], {"method": "pigdm"}, "method"),
    (["in"], {"particles": 0}, "particles"),
    (["in"], {"steps": "zero"}, "steps"),
    (["in"], {"sigma": 3.0}, "sigma"),
])
def test_job_errors_raise_before_any_work(tmp_path, monkeypatch, inputs, options, match):
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "in", 1)
    with pytest.raises(ValueError, match=match):
        run_batch(inputs, tmp_path / "out", **{**SETTINGS, **options})
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == set()


def test_the_command_offers_only_blind_methods(tmp_path, capsys):
    assert main(["batch", str(tmp_path), "-o", str(tmp_path / "out"), "--method", "pigdm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastem: error: argument --method: invalid choice: 'pigdm'")
    assert err.count("\n") == 1 and "see fastem batch --help" in err  # one line, no usage


def test_output_folder_errors(tmp_path, capsys):
    photo, = _photos(tmp_path / "in", 1)
    (tmp_path / "file").write_text("")
    assert main(["batch", str(photo), "-o", str(tmp_path / "file"), *FAST]) == 2
    assert main(["batch", str(photo), "-o", str(tmp_path / "no" / "out"), *FAST]) == 2
    assert main(["batch", str(photo), "-o", str(tmp_path / "in"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("fastem: error:") == 3 and "inside the output folder" in err
    assert "Traceback" not in err


def test_ctrl_c_exits_130_and_keeps_finished_images(tmp_path, counting_run, capsys):
    _photos(tmp_path / "in", 3)
    counting_run(stop_at=2)
    assert main(["batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST]) == 130
    assert "finished images are kept" in capsys.readouterr().err
    assert len(read_records(tmp_path / "out")) == 1


def test_two_ranks_under_torchrun_share_the_work(tmp_path, counting_run):
    photos = _photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "fastem_ext.launch", "batch",
               str(tmp_path / "in"), "-o", str(out), *FAST]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 of 6 images done (6 run now, 0 done before)" in done.stdout
    assert sorted(_files(out)) == sorted(["manifest.jsonl", *(f"p{i}{s}" for i in range(6)
                                                             for s in (".png", ".kernel.npy"))])
    records = read_records(out)
    ranks = {r["sha256"]: r["rank"] for r in records}
    assert len(records) == 6 and set(ranks.values()) == {0, 1}
    assert all(ranks[file_sha256(p)] == int(file_sha256(p)[:16], 16) % 2 for p in photos)
    # one process, the same settings: nothing to redo; its results equal the ranks' results
    counter = counting_run()
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 0 and counter.calls == 0
    alone = tmp_path / "alone"
    run_batch([tmp_path / "in"], alone, **SETTINGS)
    for photo in photos:
        assert (alone / photo.name).read_bytes() == (out / photo.name).read_bytes()


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, "do not describe"),
    ({"WORLD_SIZE": "two"}, "integers"),
])
def test_a_broken_torchrun_environment_is_an_error(tmp_path, monkeypatch, env, match):
    _photos(tmp_path / "in", 1)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        run_batch([tmp_path / "in"], tmp_path / "out", **SETTINGS)


def test_an_unreadable_file_is_recorded_as_failed(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "in", 2)
    hash_file = batch_plan.file_sha256

    def denied(path):
        if path == photos[0]:
            raise PermissionError(13, "Permission denied")
        return hash_file(path)

    monkeypatch.setattr(batch_plan, "file_sha256", denied)
    result = run_batch([tmp_path / "in"], tmp_path / "out", **SETTINGS)
    assert [r["status"] for r in result.records] == ["ok", "failed"]
    assert "Permission denied" in result.failed[0]["error"]
    assert result.failed[0]["input"] == str(photos[0])


def test_a_named_pipe_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        run_batch([tmp_path / "pipe.png"], tmp_path / "out", **SETTINGS)


def test_a_name_stays_reserved_after_its_content_failed(tmp_path, monkeypatch):
    """A is done as x0.png, then fails in a run with other settings: a new content B with the
    same stem must not take x0.png (and overwrite A's result), and A keeps its name."""
    a, = _photos(tmp_path / "a", 1, seed=1, stem="x")
    b, = _photos(tmp_path / "b", 1, seed=2, stem="x")
    out = tmp_path / "out"
    assert run_batch([a], out, **SETTINGS).records[0]["output"] == "x0.png"
    before = (out / "x0.png").read_bytes()
    original = batch_module.run

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batch_module, "run", failing)
    failed = run_batch([a], out, seed=1, **SETTINGS)
    assert failed.failed and failed.records[0]["output"] == "x0.png"
    monkeypatch.setattr(batch_module, "run", original)
    b_name = f"x0-{file_sha256(b)[:8]}.png"
    assert run_batch([b], out, **SETTINGS).records[0]["output"] == b_name
    assert (out / "x0.png").read_bytes() == before
    assert run_batch([a], out, **SETTINGS).records[0]["output"] == "x0.png"


def test_an_empty_output_is_redone(tmp_path, counting_run):
    """After a power loss an ok line may point at an empty file: it is not taken as done."""
    _photos(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_batch([tmp_path / "in"], out, **SETTINGS)
    good = (out / "p1.png").read_bytes()
    (out / "p1.png").write_bytes(b"")
    (out / "p0.kernel.npy").write_bytes(b"")
    counter = counting_run()
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 2 and counter.calls == 2
    assert (out / "p1.png").read_bytes() == good


LARGE_OPTIONS = dict(working_size=64, crops=2, max_batch=4, tile_steps="5", fast=False,
                     full_diffusion=True)


def test_the_large_photo_options_reach_run_and_a_changed_one_is_redone(tmp_path, monkeypatch):
    _photos(tmp_path / "in", 2)
    out = tmp_path / "out"
    original, seen = batch_module.run, []

    def recording(*args, **kwargs):
        seen.append({name: kwargs[name] for name in LARGE_OPTIONS})
        return original(*args, **kwargs)

    monkeypatch.setattr(batch_module, "run", recording)
    assert main(["batch", str(tmp_path / "in"), "-o", str(out), "--working-size", "64",
                 "--crops", "2", "--max-batch", "4", "--tile-steps", "5", "--full-diffusion",
                 *FAST]) == 0
    assert seen == [LARGE_OPTIONS] * 2
    assert run_batch([tmp_path / "in"], out, **LARGE_OPTIONS, **SETTINGS).processed == 0
    for changed in ({"crops": 3}, {"max_batch": 8}, {"tile_steps": "6"},
                    {"full_diffusion": False}, {"working_size": 96}):
        options = {**LARGE_OPTIONS, **changed}
        assert run_batch([tmp_path / "in"], out, **options, **SETTINGS).processed == 2
        assert seen[-1] == options
    assert len(seen) == 2 + 5 * 2


def test_outputs_of_another_fastem_version_are_redone(tmp_path, monkeypatch, counting_run):
    _photos(tmp_path / "in", 2)
    out = tmp_path / "out"
    counter = counting_run()
    run_batch([tmp_path / "in"], out, **SETTINGS)
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 0

    def missing(name):
        raise batch_module.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(batch_module.importlib.metadata, "version", missing)
    assert batch_module.fastem_version() == batch_module.UNKNOWN_VERSION
    assert run_batch([tmp_path / "in"], out, **SETTINGS).processed == 2
    assert counter.calls == 4


@pytest.mark.parametrize("options, match", [
    ({"working_size": 16}, "working_size"),
    ({"crops": 0}, "crops"),
    ({"max_batch": 0}, "max_batch"),
    ({"tile_steps": "zero"}, "tile_steps: steps"),
    ({"fast": True, "full_diffusion": True}, "choose one"),
    ({"fast": "yes"}, "fast"),
    ({"working_size": 32, "kernel_size": 9}, "at least 4 × kernel_size"),  # not only for fast
    ({"max_batch": 1, "particles": 2}, "max_batch"),
    ({"working_size": 100, "prior": "natural"}, "multiple of 16"),
])
def test_large_photo_option_errors_raise_before_any_work(tmp_path, options, match):
    """Settings that every image larger than the working size would fail on are errors of the
    job (the photos here are small: no image would have taken the crops path)."""
    _photos(tmp_path / "in", 1)
    with pytest.raises(ValueError, match=match):
        run_batch([tmp_path / "in"], tmp_path / "out", **{**SETTINGS, **options})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_one_gpu_for_every_rank_is_refused(tmp_path, monkeypatch, device):
    """Under torchrun an explicit cuda:N would put every process on the same GPU."""
    _photos(tmp_path / "in", 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="every process"):
        run_batch([tmp_path / "in"], tmp_path / "out", device=device, **SETTINGS)
