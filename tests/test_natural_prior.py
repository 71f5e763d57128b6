"""The bundled natural-image prior (fastem_ext.models.natural_prior) and its training script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastem_ext.models.natural_prior import (
    NATURAL_PRIOR_SIZE_MULTIPLE,
    NATURAL_PRIOR_WEIGHTS,
    NaturalPrior,
    build_natural_prior,
    load_natural_prior,
    natural_prior_path,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import prior_common  # noqa: E402
import train_prior  # noqa: E402

SIGMA = 25 / 255
# kodak_01 256×256 centre crop at σ = 25/255 (t = 56), bundled interim CPU weights (3793 steps):
# noisy input 20.32 dB, x̂0 26.99 dB (+6.67). An untrained network (ε̂ = 0) scores exactly the
# noisy input (checked below), so this margin can only be met by a trained prior.
MIN_GAIN_DB = 5.0


def _train(*argv: str) -> None:
    """``train_prior.main`` on one thread (bit-exact losses need a fixed thread count; one
    thread also avoids OpenMP stalls on a shared 2-core machine), restoring the thread count."""
    threads = torch.get_num_threads()
    try:
        train_prior.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _manifest(out: Path) -> dict:
    return json.loads((out / (out / "latest").read_text() / "manifest.json").read_text())


@pytest.fixture(scope="module")
def prior() -> NaturalPrior:
    return load_natural_prior()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset trained in one go (6 steps, batch 2, 32×32 crops)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    _train("--config", "smoke", "--out", str(out))
    return out


def test_training_files_exclude_validation(data_dir: Path, tmp_path: Path) -> None:
    files = prior_common.train_files(data_dir)
    assert len(files) == 120
    val = {p.resolve() for p in prior_common.val_files(data_dir)}
    assert len(val) == 24 and not val & {p.resolve() for p in files}
    assert all(p.parent.name == "train" for p in files)
    # The guard fires when a validation image sits among the training files.
    (tmp_path / "natural" / "train").mkdir(parents=True)
    (tmp_path / "natural" / "val").symlink_to(data_dir / "natural" / "val")
    (tmp_path / "natural" / "train" / "a.png").symlink_to(files[0])
    (tmp_path / "natural" / "train" / "kodak_05.png").symlink_to(
        data_dir / "natural" / "val" / "kodak_05.png")
    with pytest.raises(ValueError, match="kodak_05"):
        prior_common.train_files(tmp_path)


def test_crop_sampler_is_deterministic_and_in_range(data_dir: Path) -> None:
    files = prior_common.train_files(data_dir)[:3]
    sampler = train_prior.CropSampler(files, 40, 0.5, torch.device("cpu"))
    a = sampler.batch(5, torch.Generator().manual_seed(3))
    b = sampler.batch(5, torch.Generator().manual_seed(3))
    c = sampler.batch(5, torch.Generator().manual_seed(4))
    assert a.shape == (5, 3, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.05


def test_timestep_of_sigma() -> None:
    t = prior_common.timestep_of_sigma(SIGMA)
    assert t == 56
    gap = abs(prior_common.sigma_of_timestep(t) - SIGMA)
    assert gap <= abs(prior_common.sigma_of_timestep(t - 1) - SIGMA)
    assert gap <= abs(prior_common.sigma_of_timestep(t + 1) - SIGMA)
    assert prior_common.timestep_of_sigma(0.0) == 0


def test_smoke_training_resumes_deterministically(smoke_run: Path, tmp_path: Path) -> None:
    full = _log(smoke_run)
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert all("val_psnr_ema" in full[i] for i in (2, 5))
    split = tmp_path / "split"
    _train("--config", "smoke", "--out", str(split), "--steps", "3")
    assert _manifest(split)["step"] == 3
    _train("--out", str(split))  # resumes with the run's own preset
    resumed, manifest = _log(split), _manifest(split)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # same seed, same sequence
    assert manifest["step"] == 6
    assert [(s["start_step"], s["end_step"]) for s in manifest["segments"]] == [(0, 3), (3, 6)]
    sizes = [p.stat().st_size for p in split.rglob("*") if p.is_file()]
    assert max(sizes) <= 16 * 10**6 and sum(sizes) > 100 * 10**6  # float32, sharded
    with pytest.raises(SystemExit, match="batch"):
        _train("--out", str(split), "--steps", "7", "--batch", "3")


def test_compact_checkpoint_resumes_closely(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "compact"
    args = ["--config", "smoke", "--out", str(out), "--ckpt-precision", "compact"]
    _train(*args, "--steps", "3")
    _train(*args)
    sizes = [p.stat().st_size for p in out.rglob("*") if p.is_file()]
    assert sum(sizes) < 64 * 2**20  # fits a fresh machine's 64 MiB carry
    losses = torch.tensor([r["loss"] for r in _log(out)])
    reference = torch.tensor([r["loss"] for r in _log(smoke_run)])
    assert torch.equal(losses[:3], reference[:3])
    torch.testing.assert_close(losses, reference, rtol=1e-2, atol=0)


def test_export_loads_back(smoke_run: Path, tmp_path: Path) -> None:
    weights = tmp_path / "natural_smoke.safetensors"
    _train("--out", str(smoke_run), "--export", "--export-to", str(weights))
    model = load_natural_prior(path=weights)
    ema = train_prior.load_checkpoint(smoke_run)[1]
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, ema[f"ema/{name}"].half().float(), rtol=0, atol=0)
    card = weights.with_suffix(".md").read_text()
    assert "INTERIM" in card and "--config gpu" in card and "| 56 |" in card
    assert (smoke_run / "curve.json").is_file()


def test_bundled_weights_load(prior: NaturalPrior) -> None:
    path = natural_prior_path()
    assert path.name == NATURAL_PRIOR_WEIGHTS and path.stat().st_size <= 40 * 10**6
    assert path.with_suffix(".md").is_file()
    assert 5e6 <= sum(p.numel() for p in prior.parameters()) <= 15e6
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    assert prior.size_multiple == NATURAL_PRIOR_SIZE_MULTIPLE == 16
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        eps = prior(x, torch.tensor([56, 900]))
    assert eps.shape == (2, 3, 48, 80) and eps.dtype == torch.float32
    assert torch.isfinite(eps).all() and eps.abs().mean() > 0.1
    with pytest.raises(ValueError, match="multiples of 16"):
        prior(x[..., :40], torch.tensor([56, 900]))


def test_phase_cycling_balances_the_grid_offsets() -> None:
    """Over a 100-step sampling run the sub-pixel offsets are balanced, so each of the three
    period-2 patterns (the characters of Z2×Z2) keeps a bounded partial sum instead of adding
    up at every step as it does without cycling."""
    from fastem_ext.schedule import space_timesteps

    model = build_natural_prior().eval()
    offsets = [tuple(int(v) for v in model._phase(torch.tensor([t])))
               for t in reversed(space_timesteps(1000, "100"))]
    assert all(offsets.count((dy, dx)) >= 20 for dy in (0, 1) for dx in (0, 1))
    for cy, cx in ((1, 0), (0, 1), (1, 1)):
        sums = torch.tensor([(-1) ** (cy * dy + cx * dx) for dy, dx in offsets]).cumsum(0)
        assert sums.abs().max() <= 8


@pytest.mark.parametrize("size", [16, 48])
def test_phase_shift_mirror_pads(size: int) -> None:
    model = build_natural_prior().eval()
    x = torch.arange(size, dtype=torch.float32)
    for shift in (0, 1):
        index = model._shifted_index(size, torch.tensor([shift]))
        assert index.shape == (size + 16,) and index.min() >= 0 and index.max() < size
        assert torch.equal(index[shift : shift + size], torch.arange(size))  # the image, shifted
        if size > 16:
            padded = torch.nn.functional.pad(x[None, None], (shift, 16 - shift), mode="reflect")
            assert torch.equal(x[index], padded[0, 0])


def test_missing_or_foreign_weights_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="natural_nothing.safetensors"):
        load_natural_prior(path=tmp_path / "natural_nothing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(1)}, foreign, metadata={"format": "other"})
    with pytest.raises(ValueError, match="architecture"):
        load_natural_prior(path=foreign)


def test_bundled_prior_denoises(prior: NaturalPrior, val_crop: torch.Tensor) -> None:
    t = prior_common.timestep_of_sigma(SIGMA)
    ours, noisy = prior_common.x0_psnr(prior, val_crop[None], t)
    untrained, _ = prior_common.x0_psnr(build_natural_prior().eval(), val_crop[None], t)
    assert 20.0 < noisy < 20.6
    assert untrained == pytest.approx(noisy, abs=1e-4)  # so the margin below can fail
    assert ours >= noisy + MIN_GAIN_DB, (ours, noisy)
