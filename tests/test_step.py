"""The step's guidance against the paper's formulas written in the network's units.

The step works in image units and converts at the network boundary (``schedule``); the oracle
below works in [-1, 1] units throughout, as the papers do (ΠGDM, Eq. 17: ``log N(y'; H x̂0',
r² HHᵀ + σ'² I)`` with ``y' = 2y − 1``, ``σ' = 2σ``; DPS, Eq. 16: ``−ζ ∇‖y' − H x̂0'‖``), with
the straight-through clamp written out. ``x_t`` is wide enough that x̂0 saturates on a good part
of the pixels: a plain clamp there would zero the guidance.
"""

import pytest
import torch
from dense import circular_convolve, operator_matrix

from fastem_ext.mstep import HQSConfig
from fastem_ext.observation import OUTSIDE_WEIGHT, Observation
from fastem_ext.schedule import Schedule
from fastem_ext.step import StepConfig, guided_step, plan_step

HW, C, N, STEP = (6, 5), 3, 2, 4


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A linear 'network' that mixes neighbours, the same in float32 and float64."""
    return 0.3 * x - 0.2 * x.roll(1, -1) + 0.1 * x.roll(1, -3)


def _problem(masked: bool):
    g = torch.Generator().manual_seed(int(masked))
    kernel = torch.rand(3, 3, generator=g) + 0.1
    kernel = kernel / kernel.sum()
    y = torch.rand(C, *HW, generator=g)
    mask = None
    if masked:
        mask = torch.ones(1, *HW)
        mask[:, :, 0] = 0.0
    x = 1.2 * torch.randn(N, C, *HW, generator=g)
    return Observation(y, 0.05, mask), kernel, x


def _increment(obs, kernel, x, guidance, mstep=None):
    """``w_i g``: the guided step minus the unguided one, with the same noise."""
    tables = Schedule("10").tables("cpu")
    step = torch.tensor(STEP)
    out = []
    for config in (StepConfig(guidance, mstep), StepConfig(None)):
        plan = plan_step(obs, tables, config)
        out.append(guided_step(eps_model, plan, step, x, kernel,
                               torch.Generator().manual_seed(9)))
    return out[0][0] - out[1][0], out[0][2]


def _oracle(obs, kernel, x, guidance):
    """The same increment in network units, float64, dense ``H``."""
    schedule = Schedule("10")
    ac = schedule.alphas_cumprod[STEP]
    h = operator_matrix(lambda img: circular_convolve(img, kernel.double()), (C, *HW))
    weight = torch.ones(C * HW[0] * HW[1], dtype=torch.float64)
    if obs.mask is not None:  # the outside weakly observed (observation.OUTSIDE_WEIGHT)
        observed = obs.mask.double().expand(C, *HW).reshape(-1) > 0
        weight = torch.where(observed, 1.0, torch.tensor(OUTSIDE_WEIGHT, dtype=torch.float64))
    y_net = 2 * obs.y.double().reshape(-1) - 1
    x_t = x.double().requires_grad_(True)
    x0 = (x_t - (1 - ac).sqrt() * eps_model(x_t, None)) / ac.sqrt()
    x0 = x0 + (x0.clamp(-1, 1) - x0).detach()  # straight-through
    residuals = [y_net - h @ x0[i].reshape(-1) for i in range(N)]
    if guidance == "dps":  # the weighted norm ‖r‖_w = ‖√w r‖
        norms = sum((weight.sqrt() * r).norm() for r in residuals)
        (grad,) = torch.autograd.grad(-norms, x_t)
        return ac.sqrt() * grad
    r2 = schedule.pigdm_r2[STEP]
    cov = r2 * h @ h.T + (2 * obs.sigma) ** 2 * torch.eye(h.shape[0], dtype=torch.float64)
    v = torch.stack([h.T @ torch.linalg.solve(cov, weight * r.detach()) for r in residuals])
    (grad,) = torch.autograd.grad(x0, x_t, grad_outputs=v.reshape(x0.shape))
    return schedule.pigdm_weight[STEP] * grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("guidance", ["pigdm", "dps"])
def test_guidance_step_is_the_papers_in_network_units(guidance, masked):
    obs, kernel, x = _problem(masked)
    increment, x0 = _increment(obs, kernel, x, guidance)
    saturated = ((x0 == 0) | (x0 == 1)).float().mean()
    assert 0.2 < saturated < 0.8  # the clamp is exercised, not everywhere
    expected = _oracle(obs, kernel, x, guidance).float()
    torch.testing.assert_close(increment, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_mstep_settings_ridge_and_gradient_change_the_step():
    """``HQSConfig.ridge`` (0, the default: no ridge) and ``gradient`` reach the step's M-step."""
    obs, kernel, x = _problem(False)
    x = 0.5 * x  # less saturation: an informative x̂0

    def kernel_after(**settings):
        tables = Schedule("10").tables("cpu")
        mstep = HQSConfig(regularizer="none", **settings).validate(3)
        plan = plan_step(obs, tables, StepConfig("pigdm", mstep))
        return guided_step(eps_model, plan, torch.tensor(STEP), x, kernel, None)[1]

    default = kernel_after()
    assert not torch.equal(default, kernel)
    assert torch.equal(kernel_after(ridge=0.0, gradient=True), default)  # the defaults
    for ridge in (1.0, 0.5):  # the ridge r²/4 times the setting
        assert not torch.allclose(kernel_after(ridge=ridge), default, rtol=0, atol=1e-6)
    assert not torch.allclose(kernel_after(ridge=1.0), kernel_after(ridge=0.5), rtol=0,
                              atol=1e-6)
    assert not torch.allclose(kernel_after(gradient=False), default, rtol=0, atol=1e-6)
