import math

import pytest
import torch

from fastem_ext.schedule import Schedule, at, space_timesteps


def test_base_alphas_cumprod_closed_form():
    sched = Schedule("1000")
    expected, prod = [], 1.0
    for j in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * j / 999)
        expected.append(prod)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(sched.base_alphas_cumprod, expected, rtol=1e-12, atol=0)


def test_space_timesteps_100_matches_guided_diffusion_rounding():
    steps = space_timesteps(1000, "100")
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999
    assert steps == [round(j * 999 / 99) for j in range(100)]


def test_space_timesteps_sections_and_ddim():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1") == space_timesteps(1000, "1") == [0]
    steps = space_timesteps(1000, "10,5")
    assert steps[:10] == [round(j * 499 / 9) for j in range(10)]
    assert steps[10:] == [500 + round(j * 499 / 4) for j in range(5)]
    assert space_timesteps(1000, [5, 1, 999]) == [1, 5, 999]


@pytest.mark.parametrize("bad", ["abc", "0", "ddimx", "ddim999", "2000", [1000], True])
def test_space_timesteps_rejects_bad_strings(bad):
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, bad)


@pytest.mark.parametrize("steps", ["100", "1000", "ddim25", "7"])
def test_respaced_tables_closed_forms(steps):
    sched = Schedule(steps)
    ac = sched.base_alphas_cumprod[sched.timesteps]
    torch.testing.assert_close(sched.alphas_cumprod, ac)
    # ᾱ_i = Π_{j ≤ i} (1 − β_j) with the respaced betas
    torch.testing.assert_close(torch.cumprod(1 - sched.betas, 0), ac, rtol=1e-12, atol=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    torch.testing.assert_close(sched.posterior_variance, sched.betas * (1 - prev) / (1 - ac))
    # With a noiseless x_t = √ᾱ x0, the posterior mean is exactly √ᾱ_prev x0.
    torch.testing.assert_close(
        sched.posterior_mean_coef_x0 + sched.posterior_mean_coef_xt * ac.sqrt(), prev.sqrt(),
        rtol=1e-12, atol=1e-12)
    assert sched.posterior_variance[0] == 0


def test_identity_respacing_gives_the_base_betas():
    sched = Schedule("1000")
    torch.testing.assert_close(sched.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_pigdm_r2_rules_and_weights():
    ref, paper = Schedule("100"), Schedule("100", r2="pigdm")
    v = ref.posterior_variance
    torch.testing.assert_close(ref.pigdm_r2, v / (1 + v))
    torch.testing.assert_close(paper.pigdm_r2, 1 - paper.alphas_cumprod)
    i = 57
    expected = math.sqrt(ref.alphas_cumprod[i]) * float(v[i] / (1 + v[i])) / math.sqrt(1 + v[i])
    assert math.isclose(float(ref.pigdm_weight[i]), expected, rel_tol=1e-12)
    with pytest.raises(ValueError, match="r2"):
        Schedule("100", r2="bogus")


def test_device_tables():
    tables = Schedule("100").tables("cpu")
    assert len(tables) == 100
    assert tables.t.dtype == torch.int64 and tables.sqrt_ac.dtype == torch.float32
    assert float(tables.noise_std[0]) == 0.0 and float(tables.noise_std[1]) > 0
    # Image units (schedule's docstring): ΠGDM's variance / 4, DPS's step × 2.
    sched = Schedule("100")
    torch.testing.assert_close(tables.x0_var, (sched.pigdm_r2 / 4).float())
    torch.testing.assert_close(tables.dps_weight, 2 * tables.sqrt_ac)


def test_at_reads_a_table_entry_without_a_host_copy():
    table = torch.arange(5.0)
    step = torch.tensor(3)
    value = at(table, step)
    assert value.shape == () and value.item() == 3.0
    assert value._base is None  # a gather, not the .item()-driven select of table[step]
    assert at(table, 3).item() == 3.0
