"""The guidance vectors (image units) against dense float64 formulas."""

import pytest
import torch
from dense import circular_convolve, operator_matrix

from fastem_ext.guidance import dps_vector, pigdm_vector
from fastem_ext.observation import OUTSIDE_WEIGHT, Observation
from fastem_ext.physics import psf2otf

HW, C = (6, 5), 3


def _setup(seed=0, n=2, size=3, masked=False):
    g = torch.Generator().manual_seed(seed)
    kernel = torch.rand(size, size, generator=g, dtype=torch.float64) + 0.05
    kernel = kernel / kernel.sum()
    x0 = torch.rand(n, C, *HW, generator=g, dtype=torch.float64)
    y = torch.rand(C, *HW, generator=g, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(1, *HW, dtype=torch.float64)
        mask[:, 0], mask[:, :, -1] = 0.0, 0.0
    dense_h = operator_matrix(lambda img: circular_convolve(img, kernel), (C, *HW))
    return Observation(y, 0.08, mask), kernel, x0, dense_h


def _weights(obs: Observation) -> torch.Tensor:
    """The guidance's weights, flattened: 1 on the observed pixels, ``OUTSIDE_WEIGHT``
    elsewhere."""
    if obs.mask is None:
        return torch.ones(C * HW[0] * HW[1], dtype=torch.float64)
    mask = obs.mask.expand(C, *HW).reshape(-1)
    return torch.where(mask > 0, 1.0, torch.tensor(OUTSIDE_WEIGHT, dtype=mask.dtype))


@pytest.mark.parametrize("masked", [False, True])
def test_pigdm_vector_equals_dense_formula(masked):
    obs, kernel, x0, h = _setup(masked=masked)
    r2 = torch.tensor([0.5, 0.37, 0.1], dtype=torch.float64)
    step = torch.tensor(1)
    v = pigdm_vector(obs, torch.fft.rfft2(x0), psf2otf(kernel, HW), r2, step)
    cov = 0.37 * h @ h.T + obs.sigma**2 * torch.eye(h.shape[0], dtype=torch.float64)
    for i in range(x0.shape[0]):
        residual = _weights(obs) * (obs.y.reshape(-1) - h @ x0[i].reshape(-1))
        expected = h.T @ torch.linalg.solve(cov, residual)
        torch.testing.assert_close(v[i].reshape(-1), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_dps_vector_is_the_gradient_of_each_particles_own_norm(masked):
    obs, kernel, x0, h = _setup(seed=3, n=3, masked=masked)
    v = dps_vector(obs, torch.fft.rfft2(x0), psf2otf(kernel, HW))
    for i in range(3):
        xi = x0[i].detach().clone().requires_grad_(True)
        norm = (_weights(obs).sqrt() * (obs.y.reshape(-1) - h @ xi.reshape(-1))).norm()
        (expected,) = torch.autograd.grad(norm, xi)
        torch.testing.assert_close(v[i], -expected, rtol=1e-9, atol=1e-12)
