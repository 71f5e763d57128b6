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
    natural_prior_metadata,
    natural_prior_path,
    save_natural_prior,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import prior_common  # noqa: E402
import train_prior  # noqa: E402

SIGMA = 25 / 255
# kodak_01 256×256 centre crop at σ = 25/255 (t = 56): the noisy input scores 20.32 dB; the
# interim ε-prediction weights reached 26.99 dB. Neither an untrained ε-network (x̂0 = the noisy
# input) nor an untrained v-network (x̂0 = √ᾱ x_t) comes within 4 dB of this margin (checked below).
MIN_GAIN_DB = 5.0


def _train(*argv: str) -> None:
    """``train_prior.main`` on one thread (reproducible losses need a fixed thread count; one
    thread also avoids OpenMP stalls on a shared 2-core machine), restoring the thread count."""
    threads = torch.get_num_threads()
    try:
        train_prior.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _history(path: Path) -> list[dict]:
    return json.loads(natural_prior_metadata(path)["history"])


@pytest.fixture(scope="module")
def prior() -> NaturalPrior:
    return load_natural_prior()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset (6 steps, batch 2, 32×32 crops) from scratch."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    _train("--config", "smoke", "--init", "none", "--out", str(out))
    return out


def test_training_files_exclude_validation(data_dir: Path, tmp_path: Path) -> None:
    files = prior_common.train_files(data_dir)
    assert len(files) == 552
    assert sum(p.suffix == ".jpg" for p in files) == 432
    val = {p.resolve() for p in prior_common.val_files(data_dir)}
    assert len(val) == 24 and not val & {p.resolve() for p in files}
    assert all(p.parent.name == "train" for p in files)
    # The guard fires when a validation image sits among the training files, re-encoded too.
    (tmp_path / "natural" / "train").mkdir(parents=True)
    (tmp_path / "natural" / "val").symlink_to(data_dir / "natural" / "val")
    (tmp_path / "natural" / "train" / "a.png").symlink_to(files[0])
    (tmp_path / "natural" / "train" / "kodak_05.jpg").symlink_to(files[0])
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


def test_crop_sampler_geometry(tmp_path: Path) -> None:
    """On a ramp image every crop is a ramp: the window's scale sets the slope (bilinear and the
    2×2 average are exact on linear images), the flip/rotation its direction, all 8 appear."""
    from PIL import Image

    ramp = (torch.arange(200)[:, None] + torch.zeros(1, 120)).to(torch.uint8)  # value = row
    Image.fromarray(ramp.numpy()).convert("RGB").save(tmp_path / "ramp.png")
    crop = 16
    sampler = train_prior.CropSampler([tmp_path / "ramp.png"], crop, 0.5, torch.device("cpu"))
    batch = (sampler.batch(64, torch.Generator().manual_seed(0)) + 1) * 127.5  # back to 0..255
    directions, native = set(), 0
    for patch in batch[:, 0]:
        native += bool((patch - patch.round()).abs().max() < 1e-3)  # exact pixels
        dy, dx = patch.diff(dim=0), patch.diff(dim=1)
        slope = dy.mean() if dy.abs().mean() > dx.abs().mean() else dx.mean()
        along_rows = bool(dy.abs().mean() > dx.abs().mean())
        directions.add((along_rows, bool(slope > 0)))
        # The short side is 120 px: windows of 16/s px, s in [0.5, 1], capped at 120.
        assert 1 - 1e-3 <= abs(slope) <= 2 + 1e-3
        torch.testing.assert_close((dy if along_rows else dx),
                                   torch.full_like(dy if along_rows else dx, float(slope)),
                                   atol=2e-3, rtol=0)
        torch.testing.assert_close((dx if along_rows else dy),
                                   torch.zeros_like(dx if along_rows else dy), atol=2e-3, rtol=0)
    assert directions == {(True, True), (True, False), (False, True), (False, False)}
    assert 16 <= native <= 48  # half of the crops at the native scale
    # A 16-px-tall ramp: every window is the whole short side, so the crop's values are the
    # rows themselves (pixel centres land on pixel centres), in one of the 8 orders.
    short = (torch.arange(16)[:, None] * 10 + torch.zeros(1, 40)).to(torch.uint8)
    Image.fromarray(short.numpy()).convert("RGB").save(tmp_path / "short.png")
    sampler = train_prior.CropSampler([tmp_path / "short.png"], 16, 0.5, torch.device("cpu"))
    batch = (sampler.batch(16, torch.Generator().manual_seed(1)) + 1) * 127.5
    ramp = torch.arange(16.0) * 10
    for patch in batch[:, 0]:
        line = patch[:, 0] if (patch[:, 0] - patch[0, 0]).abs().max() > 1 else patch[0]
        assert any(torch.allclose(line, r, atol=1e-3) for r in (ramp, ramp.flip(0)))


def test_timestep_of_sigma() -> None:
    t = prior_common.timestep_of_sigma(SIGMA)
    assert t == 56
    gap = abs(prior_common.sigma_of_timestep(t) - SIGMA)
    assert gap <= abs(prior_common.sigma_of_timestep(t - 1) - SIGMA)
    assert gap <= abs(prior_common.sigma_of_timestep(t + 1) - SIGMA)
    assert prior_common.timestep_of_sigma(0.0) == 0


def test_training_timesteps_uniform_or_tilted_to_low_noise() -> None:
    """A share of 0 draws exactly a uniform run's t; with a share, that part of the batch is
    log-uniform on [0, 999] (2/3 of it below t = 100), the rest stays uniform."""
    dev = torch.device("cpu")
    plain = torch.randint(1000, (4096,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(train_prior.draw_timesteps(4096, 0.0, torch.Generator().manual_seed(1),
                                                  dev), plain)
    t = train_prior.draw_timesteps(4096, 0.5, torch.Generator().manual_seed(1), dev)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    low, rest = t[:2048].float(), t[2048:].float()
    assert abs(float((low < 100).float().mean()) - 2 / 3) < 0.03
    assert abs(float((rest < 100).float().mean()) - 0.1) < 0.03
    assert abs(float((low < 10).float().mean()) - 1 / 3) < 0.03  # log-uniform: equal per decade
    with pytest.raises(SystemExit, match="low-t-share must be in"):
        train_prior.resolve(train_prior.parse_args(["--out", "x", "--minutes", "1",
                                                   "--low-t-share", "1.5"]))


def test_smoke_training_writes_weights_with_their_history(smoke_run: Path) -> None:
    log = _log(smoke_run)
    assert [r["run_step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all("val_psnr_ema" in log[i] for i in (2, 5))
    weights = smoke_run / "natural_s2c32.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == "0o644"
    assert not list(smoke_run.glob("*.tmp"))
    model = load_natural_prior(path=weights)
    assert model.prediction == "v"
    (run,) = _history(weights)
    assert run["steps"] == 6 and run["start_step"] == 0 and run["init"] == "scratch"
    assert run["batch"] == 2 and run["images"] == 552 and run["prediction"] == "v"
    assert run["low_t_share"] == 0.5  # the smoke preset's
    assert run["val"][-1][0] == 6 and run["val_psnr_ema_end"] == run["val"][-1][3]


def test_model_card_lists_every_run_and_the_curve(smoke_run: Path) -> None:
    import evaluate_prior

    weights = smoke_run / "natural_s2c32.safetensors"
    model = load_natural_prior(path=weights)
    curve = prior_common.denoising_curve(model, prior_common.val_crops(1, 64), timesteps=(999,))
    text = evaluate_prior.card(weights, curve, 1, 64, [])
    assert "Does not yet meet" in text and "| 1 | " in text
    assert "| 6 (0–6) | 2 × 32² | 0.5 |" in text
    assert "| 56 |" in text and "| 999 |" in text and "clamped" in text
    assert "train_prior_gpu.sh" in text and "v = √ᾱ ε − √(1−ᾱ) x0" in text


def test_training_resumes_from_the_weights_file(smoke_run: Path, tmp_path: Path) -> None:
    """A run started from a weights file continues its history and its step count (so it draws
    new data), with the weights it was given as its starting point."""
    first = smoke_run / "natural_s2c32.safetensors"
    out = tmp_path / "next"
    _train("--config", "smoke", "--init", str(first), "--out", str(out), "--steps", "2")
    history = _history(out / "natural_s2c32.safetensors")
    assert [r["start_step"] for r in history] == [0, 6]
    assert [r["steps"] for r in history] == [6, 2]
    assert _log(out)[0]["step"] == 7
    assert natural_prior_metadata(out / "natural_s2c32.safetensors")["step"] == "8"
    again = tmp_path / "again"
    _train("--config", "smoke", "--init", str(first), "--out", str(again), "--steps", "2")
    assert [r["loss"] for r in _log(again)] == [r["loss"] for r in _log(out)]  # reproducible
    with pytest.raises(SystemExit, match="minutes"):
        _train("--config", "cpu", "--init", "none", "--out", str(tmp_path / "x"))


def test_v_prediction_identities() -> None:
    """ε̂ = √ᾱ v̂ + √(1−ᾱ) x_t, so the samplers' Tweedie estimate is x̂0 = √ᾱ x_t − √(1−ᾱ) v̂ and
    the exact v of a noised image gives back ε and x0."""
    from fastem_ext.schedule import Schedule, tweedie_x0

    model = build_natural_prior(cycle_phase=False).eval()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1
    eps = torch.randn(4, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 56, 500, 999])
    ac = Schedule("1").base_alphas_cumprod[t].float()[:, None, None, None]
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    v = ac.sqrt() * eps - (1 - ac).sqrt() * x0
    model.network_output = lambda x, tt: v  # an oracle network
    eps_hat = model(xt, t)
    torch.testing.assert_close(eps_hat, eps, atol=2e-5, rtol=0)
    x0_hat = tweedie_x0(xt, eps_hat, ac.sqrt(), (1 - ac).sqrt())
    torch.testing.assert_close(x0_hat[:3], x0[:3], atol=1e-3, rtol=0)
    # t = 999 divides by √ᾱ = 0.0064: float32 rounding of ε̂, not the conversion, limits it.
    torch.testing.assert_close(x0_hat[3], x0[3], atol=2e-2, rtol=0)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_untrained_network_x0_is_bounded_only_for_v(prediction: str) -> None:
    """A network that outputs zeros: x̂0 = √ᾱ x_t with v-prediction (|x̂0| ≤ |x_t|, at every t);
    x̂0 = x_t/√ᾱ with ε-prediction, which explodes as t → 1000."""
    from fastem_ext.schedule import Schedule, tweedie_x0

    model = build_natural_prior(prediction=prediction).eval()  # zero output conv
    xt = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    schedule = Schedule("1")
    worst = 0.0
    for t in (0, 250, 500, 750, 900, 999):
        ac = float(schedule.base_alphas_cumprod[t])
        with torch.no_grad():
            eps = model(xt, torch.tensor([t]))
        x0 = tweedie_x0(xt, eps, ac**0.5, (1 - ac) ** 0.5)
        worst = max(worst, float(x0.abs().max() / xt.abs().max()))
    if prediction == "v":
        assert worst <= 1 + 1e-5
    else:
        assert worst > 100


def test_bf16_weights_keep_the_schedule_tables_in_float32() -> None:
    model = load_natural_prior(dtype=torch.bfloat16)
    assert model.sqrt_ac.dtype == model.sqrt_one_minus_ac.dtype == torch.float32
    assert next(model.unet.parameters()).dtype == torch.bfloat16


def test_files_without_a_prediction_tag_load_as_eps(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_natural_prior(prediction="eps")
    path = tmp_path / "old.safetensors"
    save_natural_prior(model, path)
    assert load_natural_prior(path=path).prediction == "eps"
    meta = natural_prior_metadata(path)
    del meta["prediction"]
    state = {k: v.half() for k, v in model.unet.state_dict().items()}
    save_file(state, path, metadata=meta)
    assert load_natural_prior(path=path).prediction == "eps"
    meta["prediction"] = "x0"
    save_file(state, path, metadata=meta)
    with pytest.raises(ValueError, match="unknown prediction"):
        load_natural_prior(path=path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        load_natural_prior(path=path)


def test_pack_holds_the_training_set_and_validation_crops(data_dir: Path, tmp_path: Path) -> None:
    import pack_training_data

    out = tmp_path / "pack"
    size = pack_training_data.pack(out, val_count=2, val_crop=64, data_dir=data_dir)
    files = prior_common.train_files(out)
    assert [p.stem for p in files] == [p.stem for p in prior_common.train_files(data_dir)]
    assert all(p.suffix == ".jpg" for p in files) and size < 50 * 2**20
    crops = prior_common.val_crops(2, 64, data_dir=out)
    torch.testing.assert_close(crops, prior_common.val_crops(2, 64, data_dir=data_dir),
                               atol=0, rtol=0)  # lossless validation crops
    with pytest.raises(SystemExit, match="replace"):
        pack_training_data.pack(data_dir, 1, 64, data_dir=data_dir)


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
    assert 20.0 < noisy < 20.6
    for prediction in ("eps", "v"):  # so the margin below can fail
        untrained = build_natural_prior(prediction=prediction).eval()
        score, _ = prior_common.x0_psnr(untrained, val_crop[None], t)
        assert score < noisy + MIN_GAIN_DB - 4, (prediction, score)
    assert ours >= noisy + MIN_GAIN_DB, (ours, noisy)
