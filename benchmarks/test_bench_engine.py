"""Throughput regression suite of whole Fast EM runs (pytest-benchmark), beside test_bench_ops.

CPU: a small configuration (tiny random UNet, 64×64, 4 steps), reference and fast engines, gated
against ``baseline_cpu.json`` by ``compare_bench.py``. CUDA (``-m cuda``): the FFHQ-256 UNet and
the bundled natural prior at 256×256, 10 ΠGDM steps, the reference, fast and compiled engines —
the per-step figures behind bench_engine.py (no GPU baseline is committed yet).
"""

from __future__ import annotations

import pytest
import torch
from bench_engine import build_model, problem, run_case


@pytest.fixture(scope="module")
def cpu_setup():
    torch.set_num_threads(1)
    device = torch.device("cpu")
    obs, truth = problem(64, device)
    return build_model("tiny", device), obs, truth.shape[-1], device


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("guidance", ["pigdm", "dps"])
def test_fastem_cpu(benchmark, cpu_setup, engine, guidance):
    model, obs, ksize, device = cpu_setup
    benchmark.group = f"fastem-{guidance} cpu tiny 64"
    benchmark.pedantic(run_case, args=(model, obs, ksize),
                       kwargs=dict(engine=engine, guidance=guidance, particles=1, steps=4,
                                   device=device, precision="fp32"),
                       rounds=3, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["reference", "fast", "compiled"])
@pytest.mark.parametrize("particles", [1, 4])
@pytest.mark.parametrize("model_name", ["ffhq", "natural"])
def test_fastem_cuda(benchmark, engine, particles, model_name):
    device = torch.device("cuda")
    obs, truth = problem(256, device)
    model = build_model(model_name, device)
    benchmark.group = f"fastem-pigdm {model_name} 256 n={particles}"
    benchmark.pedantic(run_case, args=(model, obs, truth.shape[-1]),
                       kwargs=dict(engine=engine, guidance="pigdm", particles=particles,
                                   steps=10, device=device),
                       rounds=3, warmup_rounds=1)
