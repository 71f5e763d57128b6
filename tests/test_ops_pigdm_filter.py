"""pigdm_filter against its reference."""

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
    registered_op,
    spectrum,
)

from fastem_ext import ops
from fastem_ext.physics import psf2otf

C = 3


def _pigdm_reference(spec, otf, spec_y, r2, step, sigma):
    residual = spec if spec_y is None else spec_y - otf * spec
    return otf.conj() * residual / (r2[step] * otf.abs().square() + sigma**2)


def _inputs(n, shape, target, device):
    g = generator(n, *shape, str(target))
    spec = spectrum((n, C, *shape), g, device)
    otf = psf2otf(rand((3, 3), g, device) / 4.5, shape)  # a kernel: |K| ≤ 1, K(0) = 1 or so
    spec_y = {None: None, "shared": spectrum((C, *shape), g, device),
              "per-particle": spectrum((n, C, *shape), g, device)}[target]
    return spec, otf, spec_y, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("target", [None, "shared", "per-particle"])
def test_pigdm_filter(op_backend, shape, n, target):
    spec, otf, spec_y, g = _inputs(n, shape, target, op_backend)
    r2 = rand((6,), g, op_backend)
    args = (spec, otf, spec_y, r2, torch.tensor(4, device=op_backend), 0.08)
    assert_float64_rule(ops.pigdm_filter(*args), _pigdm_reference, args)


def test_opcheck(fused_backend):
    backend = os.environ["FASTEM_BACKEND"]
    spec, otf, spec_y, g = _inputs(2, (6, 9), "shared", fused_backend)
    otf = otf.contiguous()  # the registered ops take dense tensors (cuFFT may return strided)
    step = torch.tensor(0, device=fused_backend)
    r2 = rand((2,), g, fused_backend)
    torch.library.opcheck(registered_op("pigdm_filter", backend),
                          (spec, otf, spec_y, r2, step, 0.1))
    torch.library.opcheck(registered_op("pigdm_filter", backend), (spec, otf, None, r2, step, 0.1))


def test_wrappers_take_strided_spectra(op_backend):
    """cuFFT may return strided spectra (rfft2 of a 2-D grid on CUDA): the op wrappers densify."""
    spec, otf, spec_y, g = _inputs(2, (6, 9), "shared", op_backend)
    strided = otf.t().contiguous().t()
    assert not strided.is_contiguous()
    r2, step = rand((2,), g, op_backend), torch.tensor(1, device=op_backend)
    torch.testing.assert_close(ops.pigdm_filter(spec, strided, spec_y, r2, step, 0.1),
                               ops.pigdm_filter(spec, otf, spec_y, r2, step, 0.1), rtol=0, atol=0)
    cross, energy = ops.spectral_sums(spec_y, spec)
    shift = rand((2,), g, op_backend)
    torch.testing.assert_close(ops.wiener_z(cross, energy, strided, shift, step, 0.5),
                               ops.wiener_z(cross, energy, otf, shift, step, 0.5), rtol=0, atol=0)
