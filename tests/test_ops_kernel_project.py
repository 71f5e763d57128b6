"""kernel_project (crop, clamp, normalise, threshold, re-centre, grid) against its reference."""

from __future__ import annotations

import os

import pytest
import torch
from ops_helpers import SHAPES, assert_float64_rule, generator, randn, registered_op

from fastem_ext import ops
from fastem_ext.ops.kernel_project import project_kernel, recenter_kernel, soft_threshold
from fastem_ext.physics import kernel_grid, otf2psf


def _reference(z, fallback, threshold, recenter):
    k1 = project_kernel(otf2psf(z, fallback.shape[-1]), fallback)
    kernel = project_kernel(soft_threshold(k1, threshold), k1)
    if recenter:
        kernel = recenter_kernel(kernel)
    return kernel, kernel_grid(kernel, tuple(z.shape))


def _off_centre_z(shape, size, g, device):
    """A full-grid z whose support has mass off-centre (so re-centring moves it) and negative
    entries (so the clamp matters)."""
    z = 0.05 * randn(shape, g, device)
    bump = torch.zeros(size, size, device=device)
    bump[: size // 2 + 1, : size // 2 + 1] = torch.rand(size // 2 + 1, size // 2 + 1, generator=g)
    return z + kernel_grid(bump, shape)


@pytest.mark.parametrize("shape", SHAPES + [(70, 66)])
@pytest.mark.parametrize("size", [1, 5, 6])
@pytest.mark.parametrize("threshold", [0.0, 0.01])
@pytest.mark.parametrize("recenter", [False, True])
def test_kernel_project(op_backend, shape, size, threshold, recenter):
    g = generator(*shape, size, recenter)
    z = _off_centre_z(shape, size, g, op_backend)
    fallback = torch.rand(size, size, generator=g).to(op_backend)
    args = (z, fallback, threshold, recenter)
    kernel, grid = ops.kernel_project(*args)
    assert_float64_rule((kernel, grid), _reference, args)
    assert torch.equal(grid, kernel_grid(kernel, shape))
    if recenter and size > 1:  # the case really moved the kernel
        assert not torch.allclose(kernel, _reference(z, fallback, threshold, False)[0])


def test_large_kernel_on_a_large_grid(op_backend):
    # K = 64 (the fused kernels' limit) fills a whole program; the grid spans several tiles.
    g = generator(64)
    z = _off_centre_z((130, 96), 64, g, op_backend)
    fallback = torch.rand(64, 64, generator=g).to(op_backend)
    args = (z, fallback, 1e-4, True)
    assert_float64_rule(ops.kernel_project(*args), _reference, args)


def test_recentring_rounds_ties_half_to_even(op_backend):
    # Four equal pixels put the centre of mass exactly 1.5 rows and 2.5 columns off centre:
    # torch.round takes the shifts to -2 and -2 (half to even), not -1 and -2 or -2 and -3.
    size, c = 7, 3
    support = torch.zeros(size, size)
    support[c + 1 : c + 3, c + 2 : c + 4] = 1.0
    z = kernel_grid(support, (12, 11)).to(op_backend)
    fallback = torch.rand(size, size, generator=generator(4)).to(op_backend)
    kernel, _ = ops.kernel_project(z, fallback, 0.0, True)
    expected = torch.zeros(size, size)
    expected[c - 1 : c + 1, c : c + 2] = 0.25
    assert torch.equal(kernel.cpu(), expected)
    assert torch.equal(kernel, _reference(z, fallback, 0.0, True)[0])


def test_vanishing_mass_keeps_the_fallback(op_backend):
    z = -torch.rand(9, 10, generator=generator(1)).to(op_backend)  # nothing survives the clamp
    fallback = torch.rand(3, 3, generator=generator(2)).to(op_backend)
    kernel, _ = ops.kernel_project(z, fallback, 0.0, False)
    torch.testing.assert_close(kernel, fallback / fallback.sum())


def test_rejects_bad_inputs(fused_backend):
    z = torch.rand(8, 8, device=fused_backend)
    with pytest.raises((ValueError, RuntimeError), match="kernel size"):
        ops.kernel_project(z, torch.rand(9, 9, device=fused_backend))
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        ops.kernel_project(z.t()[:, :7], torch.rand(3, 3, device=fused_backend))


def test_opcheck(fused_backend):
    g = generator(3)
    z = _off_centre_z((9, 12), 5, g, fused_backend)
    fallback = torch.rand(5, 5, generator=g).to(fused_backend)
    op = registered_op("kernel_project", os.environ["FASTEM_BACKEND"])
    torch.library.opcheck(op, (z, fallback, 0.001, True))
