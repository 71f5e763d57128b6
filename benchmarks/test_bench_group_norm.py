"""Benchmark of ops.group_norm_silu (pytest-benchmark): the UNet's norm + scale-shift + SiLU,
forward and forward + input-VJP, against the plain modules (issue 14).

    MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_MMAP_THRESHOLD_=268435456 \
        python -m pytest benchmarks/test_bench_group_norm.py --benchmark-json=/tmp/gn.json
    python -m pytest benchmarks/test_bench_group_norm.py -m cuda   # on a GPU

(the ``MALLOC_*`` settings keep glibc from giving the heap back on every call: RESULTS.md).

``modules`` is what the UNet runs without fusion: GroupNorm32, the scale-shift and SiLU as
separate torch ops under torch's autograd (``norm_silu`` with no fused op). ``reference``,
``triton`` and ``cpp`` are the op's backends (``reference``: the op's pure-torch forward with its
hand-written backward). CPU: one FFHQ-like layer at 64×64 (128 channels, 4 per group), float32.
CUDA (``cuda``, skipped without a GPU): the FFHQ-256 UNet's largest and a middle layer at n = 1
and 4 in bfloat16 (the fast engine's dtype). Not in the CPU regression gate (baseline_cpu.json).
"""

from __future__ import annotations

import pytest
import torch

from fastem_ext import ops
from fastem_ext.models.unet_blocks import GroupNorm32, norm_silu
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


def case(inputs: tuple[torch.Tensor, ...], vjp: bool, backend: str):
    """The norm alone, or with its input-VJP (what the engine's step runs): by the plain modules
    (``backend == "modules"``), else by ops.group_norm_silu on ``backend`` (FASTEM_BACKEND)."""
    x, weight, bias, scale, shift, v = inputs
    norm = GroupNorm32(x.shape[1]).to(x.device).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    fused = None if backend == "modules" else ops.group_norm_silu
    scale, shift = scale[:, :, None, None], shift[:, :, None, None]  # the ResBlock's form

    def run() -> torch.Tensor:
        if not vjp:
            with torch.no_grad():
                out = norm_silu(norm, x, fused, scale, shift)
        else:
            xg = x.detach().requires_grad_(True)
            out = torch.autograd.grad(norm_silu(norm, xg, fused, scale, shift), xg, v)[0]
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    return run


@pytest.mark.parametrize("backend", ["modules", "reference", "cpp"])
@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "forward+vjp"])
def test_group_norm_silu_cpu(benchmark, monkeypatch, backend, vjp):
    if backend == "cpp" and _backend.unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    torch.set_num_threads(1)  # the two CI cores are shared: one thread times more steadily
    if backend != "modules":
        monkeypatch.setenv("FASTEM_BACKEND", backend)
    benchmark.group = f"group_norm_silu cpu 1x128x64x64 {'forward+vjp' if vjp else 'forward'}"
    benchmark(case(layer(1, 128, 64, torch.device("cpu"), torch.float32), vjp, backend))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["modules", "reference", "triton", "cpp"])
@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "forward+vjp"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("channels, size", [(128, 256), (256, 64)], ids=["128x256", "256x64"])
def test_group_norm_silu_cuda(benchmark, monkeypatch, backend, vjp, n, channels, size):
    device = torch.device("cuda")
    if backend != "modules":
        if _backend.unavailable(backend, device):
            pytest.skip(_backend.unavailable(backend, device))
        monkeypatch.setenv("FASTEM_BACKEND", backend)
    benchmark.group = (f"group_norm_silu cuda bf16 {n}x{channels}x{size}x{size} "
                       f"{'forward+vjp' if vjp else 'forward'}")
    benchmark(case(layer(n, channels, size, device, torch.bfloat16), vjp, backend))
