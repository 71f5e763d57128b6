"""predict_x0 and ddpm_update against their references."""

from __future__ import annotations

import os

import pytest
import torch
from ops_helpers import (
    PARTICLES,
    SHAPES,
    assert_float64_rule,
    generator,
    rand,
    randn,
    registered_op,
)

from fastem_ext import ops
from fastem_ext.schedule import Schedule

C = 3


def _x0(x_t, eps, coefs, step):
    return ((x_t - coefs[1, step] * eps) / coefs[0, step]).clamp(-1.0, 1.0)


def _predict_reference(x_t, eps, coefs, step):
    return (_x0(x_t, eps[:, :C], coefs, step) + 1.0) / 2.0


def _update_reference(x_t, eps, coefs, step, noise, grad, scale):
    x0 = _x0(x_t, eps[:, :C], coefs, step)
    x = coefs[2, step] * x0 + coefs[3, step] * x_t + coefs[4, step] * noise
    return x if grad is None else x + (scale * coefs[5, step]) * grad, (x0 + 1.0) / 2.0


def _inputs(n, shape, device, eps_channels=C):
    g = generator(n, *shape, eps_channels)
    x_t = 1.5 * randn((n, C, *shape), g, device)  # wide enough for x̂0 to hit the clamp
    eps = randn((n, eps_channels, *shape), g, device)
    coefs = ops.ddpm_coefficients(Schedule("20").tables(device))
    return x_t, eps, coefs, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("eps_channels", [C, 2 * C], ids=["eps", "eps-learned-variance"])
def test_predict_x0(op_backend, shape, n, eps_channels):
    x_t, eps, coefs, _ = _inputs(n, shape, op_backend, eps_channels)
    step = torch.tensor(4, device=op_backend)
    out = ops.predict_x0(x_t, eps, coefs, step)
    assert_float64_rule(out, _predict_reference, (x_t, eps, coefs, step))
    saturated = ((out == 0) | (out == 1)).float().mean()
    assert 0 < saturated < 0.9  # the clamp was exercised, and not everywhere


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("guided", [True, False])
def test_ddpm_update(op_backend, shape, n, guided):
    x_t, eps, coefs, g = _inputs(n, shape, op_backend, 2 * C)
    noise, grad = randn(x_t.shape, g, op_backend), randn(x_t.shape, g, op_backend)
    grad = grad if guided else None
    step = torch.tensor(9, device=op_backend)
    out = ops.ddpm_update(x_t, eps, coefs, step, noise=noise, grad=grad, scale=0.7)
    assert_float64_rule(out, _update_reference, (x_t, eps, coefs, step, noise, grad, 0.7))


def test_rejects_bad_inputs(fused_backend):
    x_t, eps, coefs, _ = _inputs(2, (6, 5), fused_backend)
    step = torch.tensor(0, device=fused_backend)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        ops.ddpm_update(x_t, eps.transpose(2, 3).contiguous().transpose(2, 3), coefs, step, x_t)
    with pytest.raises((ValueError, RuntimeError), match="step"):
        ops.ddpm_update(x_t, eps, coefs, step[None], x_t)
    with pytest.raises((ValueError, RuntimeError), match="noise"):
        ops.ddpm_update(x_t, eps, coefs, step, x_t[:1])


def test_opcheck(fused_backend):
    x_t, eps, coefs, g = _inputs(2, (6, 5), fused_backend, 2 * C)
    step = torch.tensor(5, device=fused_backend)
    backend = os.environ["FASTEM_BACKEND"]
    eps = eps[:, :C]
    torch.library.opcheck(registered_op("predict_x0", backend), (x_t, eps, coefs, step))
    grad = rand(x_t.shape, g, fused_backend)
    update = registered_op("ddpm_update", backend)
    noise = randn(x_t.shape, g, fused_backend)
    torch.library.opcheck(update, (x_t, eps, coefs, step, noise, grad, 0.5))
    torch.library.opcheck(update, (x_t, eps, coefs, step, noise, None, 1.0))
