"""predict_x0 and ddpm_update (with given or in-kernel Philox noise) against their references."""

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
from fastem_ext.ops.ddpm_update import philox4x32_10
from fastem_ext.samplers import ancestral_step, tweedie_x0
from fastem_ext.schedule import Schedule

C = 3


def _x0(x_t, eps, coefs, step):
    return tweedie_x0(x_t, eps, coefs[0, step], coefs[1, step]).clamp(-1.0, 1.0)


def _predict_reference(x_t, eps, coefs, step):
    return (_x0(x_t, eps[:, :C], coefs, step) + 1.0) / 2.0


def _update_reference(x_t, eps, coefs, step, noise, grad, scale):
    x0 = _x0(x_t, eps[:, :C], coefs, step)
    x = ancestral_step(x0, x_t, noise, coefs[2, step], coefs[3, step], coefs[4, step])
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
def test_ddpm_update_with_given_noise(op_backend, shape, n, guided):
    x_t, eps, coefs, g = _inputs(n, shape, op_backend, 2 * C)
    noise, grad = randn(x_t.shape, g, op_backend), randn(x_t.shape, g, op_backend)
    grad = grad if guided else None
    step = torch.tensor(9, device=op_backend)
    out = ops.ddpm_update(x_t, eps, coefs, step, noise=noise, grad=grad, scale=0.7)
    assert_float64_rule(out, _update_reference, (x_t, eps, coefs, step, noise, grad, 0.7))


def test_in_kernel_noise_is_the_reference_philox(op_backend):
    # With coef_x0 = coef_xt = 0 and √β̃ = 1 the update returns the noise itself.
    x_t, eps, _, _ = _inputs(4, (33, 20), op_backend)
    coefs = torch.tensor([[1.0] * 3, [0.5] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3],
                         device=op_backend)
    for seed, step in [(0, 0), (2**40 + 7, 2)]:
        index = torch.tensor(step, device=op_backend)
        noise, _ = ops.ddpm_update(x_t, eps, coefs, index, seed=seed)
        expected = ops.philox_normal(tuple(x_t.shape), seed, index)
        torch.testing.assert_close(noise, expected, rtol=0, atol=2e-5)


def test_noise_statistics():
    step = torch.tensor(3)
    z = ops.philox_normal((200_000,), 123, step)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    assert not torch.equal(z, ops.philox_normal((200_000,), 124, step))
    assert not torch.equal(z, ops.philox_normal((200_000,), 123, torch.tensor(4)))
    assert torch.equal(z, ops.philox_normal((200_000,), 123, step))
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.01


@pytest.mark.parametrize(("key", "counter", "expected"), [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, counter, expected):
    # Random123's known-answer vectors for Philox-4x32-10.
    words = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key[0] | key[1] << 32)
    assert tuple(int(w) for w in words) == expected


def test_rejects_bad_inputs(op_backend):
    x_t, eps, coefs, _ = _inputs(2, (6, 5), op_backend)
    step = torch.tensor(0, device=op_backend)
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        ops.ddpm_update(x_t, eps.transpose(2, 3).contiguous().transpose(2, 3), coefs, step)
    with pytest.raises((ValueError, RuntimeError), match="step"):
        ops.ddpm_update(x_t, eps, coefs, step[None])


def test_opcheck(op_backend):
    x_t, eps, coefs, g = _inputs(2, (6, 5), op_backend, 2 * C)
    step = torch.tensor(5, device=op_backend)
    backend = os.environ["FASTEM_BACKEND"]
    eps = eps[:, :C]
    torch.library.opcheck(registered_op("predict_x0", backend), (x_t, eps, coefs, step))
    grad = rand(x_t.shape, g, op_backend)
    update = registered_op("ddpm_update", backend)
    torch.library.opcheck(update, (x_t, eps, coefs, step, None, grad, 0.5, 3))
    torch.library.opcheck(update, (x_t, eps, coefs, step, grad, None, 1.0, 0))
