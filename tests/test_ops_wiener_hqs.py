"""The M-step ops (spectral_sums, wiener_z) and the fused HQS loop against their references."""

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
from fastem_ext.mstep import HQSConfig, KernelSpectra, spectral_sums, z_spectrum
from fastem_ext.mstep import hqs as reference_hqs
from fastem_ext.physics import gaussian_kernel, kernel_grid

C = 3


def _wiener_reference(cross, energy, otf, shift, step, coupling):
    return z_spectrum(cross, energy + shift[step], otf, coupling)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("shared", [True, False], ids=["y-shared", "y-per-particle"])
def test_spectral_sums(op_backend, shape, n, shared):
    g = generator(n, *shape, shared)
    spec_x = spectrum((n, C, *shape), g, op_backend)
    spec_y = spectrum((C, *shape) if shared else (n, C, *shape), g, op_backend)
    out = ops.spectral_sums(spec_y, spec_x)
    assert_float64_rule(out, spectral_sums, (spec_y, spec_x))


@pytest.mark.parametrize("shape", SHAPES)
def test_wiener_z(op_backend, shape):
    g = generator(*shape)
    cross, otf = spectrum(shape, g, op_backend), spectrum(shape, g, op_backend)
    energy = rand((shape[0], shape[1] // 2 + 1), g, op_backend) * 50
    shift = rand((5,), g, op_backend) + 0.5
    step = torch.tensor(3, device=op_backend)
    args = (cross, energy, otf, shift, step, 2.5)
    assert_float64_rule(ops.wiener_z(*args), _wiener_reference, args)


def _hqs_problem(n: int, device: torch.device, seed: int):
    """Particles and a noisy blurred target on a 16×12 grid; spectra and a ridge table."""
    g = generator(n, seed)
    shape = (16, 12)
    x = rand((n, C, *shape), g, device)
    truth = rand((5, 5), g, device)
    otf = torch.fft.rfft2(torch.roll(torch.nn.functional.pad(truth / truth.sum(), (0, 7, 0, 11)),
                                     (-2, -2), (0, 1)))
    y = torch.fft.irfft2(torch.fft.rfft2(x[0]) * otf, s=shape) + 0.01 * rand((C, *shape), g, device)
    spectra = ops.kernel_spectra(torch.fft.rfft2(y), torch.fft.rfft2(x))
    ridge = rand((4,), g, device) * 1e-3
    return spectra, shape, ridge


@pytest.mark.parametrize("regularizer", ["l1", "l2", "none"])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_hqs_matches_mstep_hqs(op_backend, regularizer, n):
    spectra, shape, ridge = _hqs_problem(n, op_backend, 0)
    config = HQSConfig(iters=10, regularizer=regularizer, lam={"l1": 1e2}.get(regularizer))
    init = gaussian_kernel(7, 1.0, device=op_backend)
    step = torch.tensor(2, device=op_backend)

    def reference(cross, energy, kernel, ridge_table):
        spec = KernelSpectra(cross, energy, spectra.particles, spectra.channels)
        return reference_hqs(spec, kernel, 0.05, config, shape, ridge_r2=ridge_table[step])

    fused, grid = ops.hqs(spectra, init, 0.05, config, shape, ridge_r2=ridge, step=step)
    assert fused.shape == (7, 7) and abs(fused.sum().item() - 1) < 1e-5
    assert torch.equal(grid, kernel_grid(fused, shape))
    # Ten projections with clamps compound rounding: the same rule on the whole M-step.
    assert_float64_rule(fused, reference, (spectra.cross, spectra.energy, init, ridge))


def test_fused_hqs_rejects_pnp():
    spectra, shape, _ = _hqs_problem(1, torch.device("cpu"), 1)
    config = HQSConfig(regularizer=lambda k, s: k)
    with pytest.raises(ValueError, match="plug-and-play"):
        ops.hqs(spectra, gaussian_kernel(5, 1.0), 0.05, config, shape)


def test_opcheck(op_backend):
    g = generator(7)
    spec_x = spectrum((3, C, 6, 9), g, op_backend)
    spec_y = spectrum((C, 6, 9), g, op_backend)
    backend = os.environ["FASTEM_BACKEND"]
    torch.library.opcheck(registered_op("spectral_sums", backend), (spec_y, spec_x))
    cross, energy = ops.spectral_sums(spec_y, spec_x)
    shift = rand((2,), g, op_backend) + 1
    step = torch.tensor(1, device=op_backend)
    torch.library.opcheck(registered_op("wiener_z", backend),
                          (cross, energy, spec_y[0], shift, step, 3.0))
