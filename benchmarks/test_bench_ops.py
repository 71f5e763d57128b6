"""CPU benchmark suite of the fused ops (pytest-benchmark): reference vs C++ per op and n.

The workloads are bench_ops.py's (one definition). Run and gate against the committed baseline:

    python -m pytest benchmarks/test_bench_ops.py --benchmark-json=/tmp/bench.json
    python benchmarks/compare_bench.py benchmarks/baseline_cpu.json /tmp/bench.json

Timings are normalised by the ``calibration`` benchmark (a fixed torch FFT workload) of the same
run, so that the gate compares the ops with torch on whatever machine runs it.
"""

from __future__ import annotations

import pytest
import torch
from bench_ops import cases, problem

from fastem_ext.ops import _backend

SIZE, KERNEL = 64, 15
PARTICLES = [1, 4]
CASES = [case.name for case in cases(problem(1, 16, 5, torch.device("cpu")))]


@pytest.fixture(scope="module")
def problems() -> dict[int, dict]:
    torch.set_num_threads(1)  # the two CI cores are shared: one thread times more steadily
    return {n: problem(n, SIZE, KERNEL, torch.device("cpu")) for n in PARTICLES}


def test_calibration(benchmark):
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    benchmark(lambda: torch.fft.irfft2(torch.fft.rfft2(x) * 0.5, s=x.shape[-2:]))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("n", PARTICLES)
@pytest.mark.parametrize("name", CASES)
def test_op(benchmark, monkeypatch, problems, name, n, backend):
    if backend == "cpp" and _backend.unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    monkeypatch.setenv("FASTEM_BACKEND", backend)
    case = next(c for c in cases(problems[n]) if c.name == name)
    benchmark.group = f"{name} n={n}"
    benchmark(case.run)
