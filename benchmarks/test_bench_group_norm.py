"""Benchmark of ops.group_norm_silu (pytest-benchmark): the UNet's norm + scale-shift + SiLU,
forward and forward + input-VJP, per backend (issue 14).

    python -m pytest benchmarks/test_bench_group_norm.py --benchmark-json=/tmp/gn.json
    python -m pytest benchmarks/test_bench_group_norm.py -m cuda   # on a GPU

CPU: one FFHQ-like layer at 64×64 (128 channels, 4 per group), float32, reference vs C++.
CUDA (``cuda``, skipped without a GPU): the FFHQ-256 UNet's largest and a middle layer at
n = 1 and 4 in bfloat16 (the fast engine's dtype), reference vs Triton vs C++. Not in the CPU
regression gate (baseline_cpu.json) yet.
"""

from __future__ import annotations

import pytest
import torch

from fastem_ext import ops
from fastem_ext.ops import _backend


def layer(n: int, channels: int, size: int, device: torch.device,
          dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x, γ, β, scale, shift and an upstream gradient of one ResBlock norm (never zeros)."""
    g = torch.Generator().manual_seed(n * channels + size)

    def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return (randn(n, channels, size, size), 1 + 0.1 * randn(channels, dtype=torch.float32),
            0.1 * randn(channels, dtype=torch.float32), 0.5 * randn(n, channels),
            0.5 * randn(n, channels), randn(n, channels, size, size))


def case(inputs: tuple[torch.Tensor, ...], vjp: bool):
    """The op alone, or the op and its input-VJP (what the engine's step runs)."""
    x, weight, bias, scale, shift, v = inputs

    def run() -> torch.Tensor:
        if not vjp:
            out = ops.group_norm_silu(x, weight, bias, scale, shift)
        else:
            xg = x.detach().requires_grad_(True)
            out = torch.autograd.grad(ops.group_norm_silu(xg, weight, bias, scale, shift), xg,
                                      v)[0]
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    return run


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "forward+vjp"])
def test_group_norm_silu_cpu(benchmark, monkeypatch, backend, vjp):
    if backend == "cpp" and _backend.unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    torch.set_num_threads(1)  # the two CI cores are shared: one thread times more steadily
    monkeypatch.setenv("FASTEM_BACKEND", backend)
    benchmark.group = f"group_norm_silu cpu 1x128x64x64 {'forward+vjp' if vjp else 'forward'}"
    benchmark(case(layer(1, 128, 64, torch.device("cpu"), torch.float32), vjp))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "forward+vjp"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("channels, size", [(128, 256), (256, 64)], ids=["128x256", "256x64"])
def test_group_norm_silu_cuda(benchmark, monkeypatch, backend, vjp, n, channels, size):
    device = torch.device("cuda")
    if _backend.unavailable(backend, device):
        pytest.skip(_backend.unavailable(backend, device))
    monkeypatch.setenv("FASTEM_BACKEND", backend)
    benchmark.group = (f"group_norm_silu cuda bf16 {n}x{channels}x{size}x{size} "
                       f"{'forward+vjp' if vjp else 'forward'}")
    benchmark(case(layer(n, channels, size, device, torch.bfloat16), vjp))
