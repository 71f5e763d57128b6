"""wiener_z (the Z-update of one HQS iteration) against its reference."""

from __future__ import annotations

import os

import pytest
import torch
from ops_helpers import SHAPES, assert_float64_rule, generator, rand, registered_op, spectrum

from fastem_ext import ops


def _reference(cross, energy, otf, shift, step, coupling):
    return (cross + coupling * otf) / (energy + shift[step])


@pytest.mark.parametrize("shape", SHAPES)
def test_wiener_z(op_backend, shape):
    g = generator(*shape)
    cross, otf = spectrum(shape, g, op_backend), spectrum(shape, g, op_backend)
    energy = rand((shape[0], shape[1] // 2 + 1), g, op_backend) * 50
    shift = rand((5,), g, op_backend) + 0.5
    step = torch.tensor(3, device=op_backend)
    args = (cross, energy, otf, shift, step, 2.5)
    assert_float64_rule(ops.wiener_z(*args), _reference, args)


def test_opcheck(fused_backend):
    g = generator(7)
    spec = spectrum((6, 9), g, fused_backend)
    energy = rand((6, 5), g, fused_backend) + 1
    shift = rand((2,), g, fused_backend) + 1
    step = torch.tensor(1, device=fused_backend)
    torch.library.opcheck(registered_op("wiener_z", os.environ["FASTEM_BACKEND"]),
                          (spec, energy, spectrum((6, 9), g, fused_backend), shift, step, 3.0))
