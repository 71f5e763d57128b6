"""Camera-shake kernel generator: determinism, normalisation, centring, extent, seed splits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastem_ext.motion import (
    EVAL_SEEDS,
    SEED_LIMIT,
    TRAIN_SEEDS,
    TUNE_SEEDS,
    check_seed_range,
    motion_kernel,
    motion_kernels,
    seed_split,
)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "python" / "train_kernel_denoiser.py"


def _train_module():
    spec = importlib.util.spec_from_file_location("train_kernel_denoiser", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _centre_of_mass(k: torch.Tensor) -> torch.Tensor:
    """``k: [B, K, K]`` → ``[B, 2]`` (row, col), in float64."""
    k = k.double()
    idx = torch.arange(k.shape[-1], dtype=torch.float64)
    mass = k.sum(dim=(1, 2))
    return torch.stack(((k.sum(2) * idx).sum(1), (k.sum(1) * idx).sum(1)), dim=1) / mass[:, None]


def _extent(k: torch.Tensor, rel: float = 0.02) -> torch.Tensor:
    """Larger side of the bounding box of pixels above ``rel`` × the peak, per kernel: ``[B]``."""
    on = k > rel * k.amax(dim=(1, 2), keepdim=True)
    idx = torch.arange(k.shape[-1])
    out = []
    for axis in (1, 2):
        hit = on.any(dim=axis)  # [B, K]
        lo = torch.where(hit, idx, k.shape[-1]).amin(dim=1)
        hi = torch.where(hit, idx, -1).amax(dim=1)
        out.append(hi - lo + 1)
    return torch.maximum(*out).double()


def test_deterministic_per_seed() -> None:
    a = motion_kernel(33, seed=7)
    assert torch.equal(a, motion_kernel(33, seed=7))
    assert not torch.allclose(a, motion_kernel(33, seed=8))


def test_batch_element_is_the_kernel_of_its_seed() -> None:
    batch = motion_kernels(9, 33, seed=2024)
    for i in (0, 4, 8):
        assert torch.equal(batch[i], motion_kernel(33, seed=2024 + i))
    assert torch.equal(motion_kernels(3, 33, seed=2024), batch[:3])
    assert torch.equal(motion_kernels(1, 33, seed=2027)[0], batch[3])


@pytest.mark.parametrize("size", [9, 10, 17, 32, 33, 48, 63, 64])
def test_normalised_nonnegative_centred(size: int) -> None:
    k = motion_kernels(64, size, seed=50_000)
    assert k.shape == (64, size, size) and k.dtype == torch.float32
    assert torch.isfinite(k).all() and (k >= 0).all()
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(64), atol=1e-5, rtol=0)
    # Sub-pixel centring on (K//2, K//2); documented accuracy is float rounding (~1e-5 px).
    err = (_centre_of_mass(k) - size // 2).abs().max().item()
    assert err < 0.01, err
    # The margin: the outermost rows and columns stay empty (up to float rounding at the splats).
    border = k[:, 0].sum() + k[:, -1].sum() + k[:, :, 0].sum() + k[:, :, -1].sum()
    assert border.item() < 1e-7


def test_every_size_from_9_to_64() -> None:
    for size in range(9, 65):
        k = motion_kernels(4, size, seed=size)
        assert k.shape == (4, size, size)
        assert torch.isfinite(k).all()
        torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(4), atol=1e-5, rtol=0)


def test_extent_grows_with_size() -> None:
    means = [_extent(motion_kernels(128, s, seed=0)).mean().item() for s in (17, 33, 64)]
    assert means[0] < means[1] < means[2], means
    # Roughly proportional to the size: long blurs at 64 reach well past the 33 ones.
    assert means[2] > 1.6 * means[1], means


def test_variety_of_lengths() -> None:
    k = motion_kernels(256, 33, seed=10_000)
    ext = _extent(k)
    support = (k > 0.02 * k.amax(dim=(1, 2), keepdim=True)).sum(dim=(1, 2))
    assert (support > 4).float().mean() > 0.95  # not Diracs
    assert ext.min() <= 8 and ext.max() >= 20, (ext.min(), ext.max())  # short and long
    assert ext.std() > 3.0, ext.std()
    # Kernels differ from one another (not one shape repeated).
    assert (k[1:] - k[:-1]).abs().sum(dim=(1, 2)).min() > 0.1


def test_seed_splits_are_disjoint() -> None:
    splits = [EVAL_SEEDS, TUNE_SEEDS, TRAIN_SEEDS]
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start
    assert EVAL_SEEDS.start == 0 and TRAIN_SEEDS.stop == SEED_LIMIT
    assert seed_split(0) == "eval" and seed_split(EVAL_SEEDS.stop - 1) == "eval"
    assert seed_split(TUNE_SEEDS.start) == "tune"
    assert seed_split(TRAIN_SEEDS.start) == "train" and seed_split(SEED_LIMIT - 1) == "train"
    check_seed_range(TRAIN_SEEDS.start, 10, "train")
    with pytest.raises(ValueError, match="train"):
        check_seed_range(TRAIN_SEEDS.start - 5, 10, "train")
    with pytest.raises(ValueError, match="seed"):
        seed_split(SEED_LIMIT)


def test_training_script_uses_only_training_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    train = _train_module()
    for run_seed in (0, 1, train.MAX_RUN_SEED):
        for step in (0, 1, 12_345, train.RUN_STRIDE // 64 - 1):
            start = train.kernel_seed_start(run_seed, step, 64)
            assert seed_split(start) == "train" and seed_split(start + 63) == "train"
    with pytest.raises(ValueError):
        train.kernel_seed_start(train.MAX_RUN_SEED + 1, 0, 64)
    with pytest.raises(ValueError):
        train.kernel_seed_start(0, train.RUN_STRIDE // 64, 64)
    # Run two real training steps and record every seed handed to the generator.
    seen: list[tuple[int, int]] = []

    def spy(count: int, size: int, *, seed: int, **kw: object) -> torch.Tensor:
        seen.append((seed, count))
        return motion_kernels(count, size, seed=seed, **kw)

    monkeypatch.setattr(train, "motion_kernels", spy)
    args = type("A", (), {"size": 9, "seed": 3, "batch": 4, "lr": 1e-3, "warmup": 1})()
    train.train(args, 2, None, float("inf"))
    assert len(seen) == 2
    for seed, count in seen:
        check_seed_range(seed, count, "train")
    seen.clear()
    train.validation_set(9, 8)
    assert seen == [(EVAL_SEEDS.start, 8)]


def test_simulated_z_updates_are_projected_kernels_with_their_noise_level() -> None:
    train = _train_module()
    bank = 10.0 ** (4 * torch.rand(2, 256, 129, generator=torch.Generator().manual_seed(0)))
    clean = motion_kernels(4, 15, seed=TRAIN_SEEDS.start)[:, None]

    def draw(noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        return train.hqs_inputs(clean, bank, torch.Generator().manual_seed(1),
                                noise=torch.tensor(noise), beta=torch.tensor(1e5), start="true")

    z, sigma_z = draw(10 / 255)
    assert z.shape == clean.shape and sigma_z.shape == (4,)
    assert (z >= 0).all() and torch.allclose(z.sum(dim=(1, 2, 3)), torch.ones(4))
    assert torch.equal(z, draw(10 / 255)[0])  # deterministic per generator
    assert torch.isfinite(sigma_z).all() and (sigma_z > 0).all()
    low, high = draw(2 / 255), draw(20 / 255)
    error = [float((zz - clean).square().mean()) for zz, _ in (low, high)]
    assert error[0] < error[1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"count": 1, "size": 2}, "size"),
        ({"count": 1, "size": 8}, "size"),
        ({"count": 1, "size": 129}, "size"),
        ({"count": 1, "size": 33.0}, "size"),
        ({"count": 1, "size": "33"}, "size"),
        ({"count": 1, "size": True}, "size"),
        ({"count": -1, "size": 33}, "count"),
        ({"count": 1.5, "size": 33}, "count"),
        ({"count": 1, "size": 33, "seed": -1}, "seed"),
        ({"count": 2, "size": 33, "seed": SEED_LIMIT - 1}, "seed"),
        ({"count": 1, "size": 33, "extent": (0.5, 1.5)}, "extent"),
        ({"count": 1, "size": 33, "momentum": (0.5, 1.0)}, "momentum"),
        ({"count": 1, "size": 33, "jerk_prob": 2.0}, "jerk_prob"),
    ],
)
def test_bad_input_raises(kwargs: dict, name: str) -> None:
    kwargs = {"seed": 0, **kwargs}
    count, size = kwargs.pop("count"), kwargs.pop("size")
    with pytest.raises(ValueError, match=name):
        motion_kernels(count, size, **kwargs)


def test_bad_size_single_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="size"):
        motion_kernel(1, seed=0)
    assert motion_kernels(0, 33, seed=0).shape == (0, 33, 33)
