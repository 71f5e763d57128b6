"""Kernel groups (``step``'s docstring): independent runs batched into one network call, each group
with its own observation, σ, kernel and random stream, equal to running each group alone; and
``run(batch_restarts=True)``, the restarts as groups."""

import pytest
import torch

from fastem_ext import run
from fastem_ext.engine import EngineConfig, graphed_sample
from fastem_ext.mstep import HQSConfig
from fastem_ext.observation import Observation
from fastem_ext.samplers import sample
from fastem_ext.schedule import Schedule
from fastem_ext.step import StepConfig, plan_step, standard_normal, step_with_noise

HW, C, PER_GROUP, GROUPS, STEP = (8, 10), 3, 2, 3, 4


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A linear 'network' acting on each sample alone, as a real one does."""
    return 0.3 * x - 0.2 * x.roll(1, -1) + 0.1 * x.roll(1, -3)


def _groups(masked: bool):
    """Three groups: their own photo, σ, mask and kernel."""
    g = torch.Generator().manual_seed(3 + masked)
    observations, kernels = [], []
    for index in range(GROUPS):
        mask = None
        if masked:
            mask = torch.ones(1, *HW)
            mask[:, :, index] = 0.0
        observations.append(Observation(torch.rand(C, *HW, generator=g), 0.03 + 0.02 * index,
                                        mask))
        kernel = torch.rand(3, 3, generator=g) + 0.1
        kernels.append(kernel / kernel.sum())
    x = 0.8 * torch.randn(GROUPS * PER_GROUP, C, *HW, generator=g)
    noise = torch.randn(x.shape, generator=g)
    return observations, torch.stack(kernels), x, noise


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("guidance, blind", [("pigdm", True), ("dps", True), ("pigdm", False)])
def test_a_grouped_step_is_each_groups_own_step(guidance, blind, masked):
    """One step over three groups = three steps, one per group with its own observation (σ,
    mask), kernel, particles and noise; M-step (blind) or fixed kernels."""
    observations, kernels, x, noise = _groups(masked)
    tables = Schedule("10").tables("cpu")
    mstep = HQSConfig(regularizer="none", iters=3).validate(3) if blind else None
    config = StepConfig(guidance, mstep)
    step = torch.tensor(STEP)
    got = step_with_noise(eps_model, plan_step(observations, tables, config), step, x, kernels,
                          noise)
    for index, obs in enumerate(observations):
        rows = slice(index * PER_GROUP, (index + 1) * PER_GROUP)
        want = step_with_noise(eps_model, plan_step(obs, tables, config), step, x[rows],
                               kernels[index], noise[rows])
        torch.testing.assert_close(got[0][rows], want[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[1][index], want[1], rtol=0, atol=1e-7)
        torch.testing.assert_close(got[2][rows], want[2], rtol=0, atol=1e-7)
    if blind:  # the M-step moved every group's kernel its own way
        assert not torch.allclose(got[1], kernels, rtol=0, atol=1e-4)


def test_a_grouped_step_refuses_kernels_and_particles_that_do_not_split():
    observations, kernels, x, noise = _groups(False)
    plan = plan_step(observations, Schedule("10").tables("cpu"), StepConfig("pigdm"))
    step = torch.tensor(STEP)
    for kernel in (kernels[0], kernels[:2]):
        with pytest.raises(ValueError, match=r"3 kernel groups need a \[3, K, K\] kernel"):
            step_with_noise(eps_model, plan, step, x, kernel, noise)
    with pytest.raises(ValueError, match="particles in 3 equal groups"):
        step_with_noise(eps_model, plan, step, x[:5], kernels, noise[:5])


def test_kernel_groups_share_one_grid():
    tables = Schedule("10").tables("cpu")
    other = Observation(torch.rand(C, 8, 12), 0.05)
    with pytest.raises(ValueError, match="one observation each, all on one grid"):
        plan_step([Observation(torch.rand(C, *HW), 0.05), other], tables, StepConfig("pigdm"))
    with pytest.raises(ValueError, match="one observation each"):
        plan_step([], tables, StepConfig("pigdm"))


def test_each_group_draws_its_own_stream():
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
    got = standard_normal((4, 3, 2, 2), generators, torch.device("cpu"), torch.float32)
    for index, seed in enumerate((5, 6)):
        want = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got[2 * index:2 * index + 2], want)
    with pytest.raises(ValueError, match="5 particles cannot be split into 2 groups"):
        standard_normal((5, 3), generators, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("engine", ["reference", "fast", "fast, undone first step"])
def test_a_grouped_run_is_each_groups_own_run(engine, monkeypatch):
    """The whole loop (Fast EM, 6 steps): groups with one generator each = each group's run
    alone, on the reference loop and on the fast engine's step (eager on the CPU). The third
    case compiles first (``torch.compile`` stubbed out): a step run and undone, the path a CUDA
    capture's warm-up also takes, so every group's generator must be saved and restored."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    observations, kernels, _, _ = _groups(True)
    mstep = HQSConfig(regularizer="none", iters=3).validate(3)
    schedule = Schedule("6")
    config = EngineConfig(precision="fp32", compile=engine.endswith("step"))
    runner = sample if engine == "reference" else (
        lambda *a, **k: graphed_sample(*a, engine=config, **k))
    seeds = (11, 12, 13)
    got = runner(eps_model, observations, schedule=schedule,
                 shape=(GROUPS * PER_GROUP, C, *HW),
                 generator=[torch.Generator().manual_seed(s) for s in seeds],
                 kernel=kernels, mstep=mstep)
    assert (got.compile_seconds is not None) == config.compile
    for index, obs in enumerate(observations):
        want = sample(eps_model, obs, schedule=schedule, shape=(PER_GROUP, C, *HW),
                      generator=torch.Generator().manual_seed(seeds[index]),
                      kernel=kernels[index], mstep=mstep)
        rows = slice(index * PER_GROUP, (index + 1) * PER_GROUP)
        torch.testing.assert_close(got.particles[rows], want.particles, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.kernel[index], want.kernel, rtol=0, atol=1e-6)


def test_one_group_given_as_groups_is_the_plain_step():
    observations, kernels, x, noise = _groups(False)
    tables = Schedule("10").tables("cpu")
    config = StepConfig("pigdm", HQSConfig(regularizer="none", iters=3).validate(3))
    rows, step = slice(0, PER_GROUP), torch.tensor(STEP)
    got = step_with_noise(eps_model, plan_step(observations[:1], tables, config), step, x[rows],
                          kernels[:1], noise[rows])
    want = step_with_noise(eps_model, plan_step(observations[0], tables, config), step, x[rows],
                           kernels[0], noise[rows])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1])


def test_batched_restarts_on_the_crops_path_are_the_restarts_one_after_another():
    """A photo above the working size: the crops' restarts as kernel groups, the tiles then
    drawn from the kept restart's generator, bit for bit as one after another."""
    photo = torch.rand(3, 40, 64, generator=torch.Generator().manual_seed(3))
    settings = dict(SMALL, working_size=32, kernel_size=5, tile_steps="2", prior="gaussian")
    one_by_one = run(photo, 0.05, **settings)
    together = run(photo, 0.05, batch_restarts=True, **settings)
    assert together.info["path"] == "crops + tiles" and together.info["restarts"]["batched"]
    assert together.info["restarts"]["kept"] == one_by_one.info["restarts"]["kept"]
    assert torch.equal(together.kernel, one_by_one.kernel)
    assert torch.equal(together.particles, one_by_one.particles)


SMALL = dict(steps="5", kernel_size=7, progress=False, restarts=3, seed=2)


@pytest.mark.parametrize("method", ["fastem-pigdm", "fastem-dps"])
def test_batched_restarts_are_the_restarts_one_after_another(method):
    """The Gaussian prior treats every sample alone: bit for bit the same numbers, the same
    restart kept."""
    photo = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    one_by_one = run(photo, 0.05, method=method, prior="gaussian", **SMALL)
    together = run(photo, 0.05, method=method, prior="gaussian", batch_restarts=True, **SMALL)
    assert torch.equal(together.particles, one_by_one.particles)
    assert torch.equal(together.kernel, one_by_one.kernel)
    got, want = together.info["restarts"], one_by_one.info["restarts"]
    assert got.pop("batched") and not want.pop("batched")
    assert got["kept"] == want["kept"] and got["seeds"] == want["seeds"]
    assert got["total_variation"] == pytest.approx(want["total_variation"], abs=1e-6)


def test_batched_restarts_on_the_natural_prior_agree_with_one_after_another():
    """A convolutional network may round a batch of three differently: a few steps agree."""
    photo = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    settings = {**SMALL, "steps": "3"}
    one_by_one = run(photo, 0.05, **settings)
    together = run(photo, 0.05, batch_restarts=True, **settings)
    torch.testing.assert_close(together.particles, one_by_one.particles, rtol=0, atol=1e-4)
    torch.testing.assert_close(together.kernel, one_by_one.kernel, rtol=0, atol=1e-5)
    assert together.info["restarts"]["kept"] == one_by_one.info["restarts"]["kept"]


def test_batched_restarts_check_their_argument():
    photo = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="batch_restarts must be True or False"):
        run(photo, 0.05, prior="gaussian", batch_restarts=1, **{**SMALL, "progress": False})
    with pytest.raises(ValueError, match="batch_restarts applies to fastem-pigdm and "
                                         "fastem-dps; 'diffem-pigdm'"):
        run(photo, 0.05, method="diffem-pigdm", prior="gaussian", batch_restarts=True, **SMALL)


def test_a_batched_run_leaves_out_a_diverging_restart(monkeypatch):
    """Restart 1's particles turn NaN: left out with the warning, as one after another."""
    import fastem_ext.api as api

    sampled = api._sample

    def second_diverges(*args, **kwargs):
        out = sampled(*args, **kwargs)
        rows = out.particles.shape[0] // 3
        out.particles[rows:2 * rows] = float("nan")
        return out

    monkeypatch.setattr(api, "_sample", second_diverges)
    photo = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"restarts \[1\] of 3 diverged"):
        got = run(photo, 0.05, prior="gaussian", batch_restarts=True, **SMALL)
    assert got.info["restarts"]["diverged"] == [1]
    assert bool(torch.isfinite(got.particles).all())


def test_the_cli_batches_restarts_and_batch_refuses_them_for_diffusion_em(tmp_path, capsys):
    import json

    from fastem_ext.cli import main
    from fastem_ext.io import encode_image

    photo = tmp_path / "in.png"
    photo.write_bytes(encode_image(photo, torch.rand(3, 24, 30), 8))
    fast = ["--prior", "gaussian", "--steps", "3", "--kernel-size", "5", "--quiet"]
    report = tmp_path / "r.json"
    assert main(["deblur", str(photo), "-o", str(tmp_path / "out.png"), "--sigma", "5",
                 "--report", str(report), "--batch-restarts", *fast]) == 0
    assert json.loads(report.read_text())["restarts"]["batched"] is True
    capsys.readouterr()
    assert main(["batch", str(photo), "-o", str(tmp_path / "job"), "--method", "diffem-pigdm",
                 "--batch-restarts", *fast]) == 2
    assert "batch_restarts applies to fastem-pigdm and fastem-dps" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()


def test_batched_restarts_on_the_crops_path_count_against_max_batch():
    """crops × particles × restarts inputs in one call: ``max_batch`` must hold them (its
    default makes room)."""
    photo = torch.rand(3, 40, 64, generator=torch.Generator().manual_seed(3))
    settings = dict(SMALL, working_size=32, kernel_size=5, tile_steps="2", prior="gaussian")
    with pytest.raises(ValueError, match=r"crops × particles × restarts \(batch_restarts\) of "
                                         r"one network call \(9\), got 8"):
        run(photo, 0.05, batch_restarts=True, max_batch=8, **settings)
    assert run(photo, 0.05, max_batch=8, **settings).info["stages"]["tiles"]["max_batch"] == 8
    default = run(photo, 0.05, batch_restarts=True, **settings)
    assert default.info["stages"]["tiles"]["max_batch"] == 9
