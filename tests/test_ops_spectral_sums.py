"""spectral_sums (the M-step's loop-invariant sums) against its reference."""

from __future__ import annotations

import os

import pytest
import torch
from ops_helpers import PARTICLES, SHAPES, assert_float64_rule, generator, registered_op, spectrum

from fastem_ext import ops

C = 3


def _reference(spec_y, spec_x):
    return (spec_x.conj() * spec_y).sum(dim=(0, 1)), spec_x.abs().square().sum(dim=(0, 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("shared", [True, False], ids=["y-shared", "y-per-particle"])
def test_spectral_sums(op_backend, shape, n, shared):
    g = generator(n, *shape, shared)
    spec_x = spectrum((n, C, *shape), g, op_backend)
    spec_y = spectrum((C, *shape) if shared else (n, C, *shape), g, op_backend)
    out = ops.spectral_sums(spec_y, spec_x)
    assert_float64_rule(out, _reference, (spec_y, spec_x))


def test_opcheck(fused_backend):
    g = generator(7)
    spec_x = spectrum((3, C, 6, 9), g, fused_backend)
    spec_y = spectrum((C, 6, 9), g, fused_backend)
    backend = os.environ["FASTEM_BACKEND"]
    torch.library.opcheck(registered_op("spectral_sums", backend), (spec_y, spec_x))
