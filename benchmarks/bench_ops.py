"""One-shot benchmark of the fused ops against their references: one device, one run (issue 7).

GPU (build the CUDA extension first; about 4 minutes on an H100 in all):

    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTEM_FORCE_CUDA=1 python3 setup.py build_ext --inplace
    PYTHONPATH=. python3 benchmarks/bench_ops.py --device cuda --out $OUT

(benchmarks/RESULTS.md has the one prepared command that also runs the CUDA tests.)

CPU (small shapes; tests/test_bench_tools.py runs this):

    PYTHONPATH=. python benchmarks/bench_ops.py --device cpu --size 32 --particles 1 3

Every case calls the library's own entry point once per backend (``FASTEM_BACKEND``): the ops,
the M-step (``mstep.hqs``, 10 HQS iterations, ℓ1, ΠGDM ridge) and the whole step
(``step.guided_step``: the same Fast EM ΠGDM step as the engine's, with a one-layer stand-in for
the network so that the step's own cost shows). For each case and n: the median time of the
references (eager and, on CUDA, captured in a CUDA graph), of the Triton kernels and of the C++
ops (graph-captured on CUDA), the bytes the op must move at least, the fraction of the measured
copy bandwidth that the fastest fused version reaches, and each fused result's max deviation from
the references (relative to its scale). The L2 is flushed before every timed run. Writes
bench_ops.json and bench_ops.csv (device, versions, date, command) under --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fastem_ext import ops
from fastem_ext.mstep import HQSConfig, hqs, kernel_spectra
from fastem_ext.observation import Observation
from fastem_ext.ops import _backend
from fastem_ext.physics import gaussian_kernel, kernel_grid, psf2otf
from fastem_ext.schedule import Schedule
from fastem_ext.step import StepConfig, guided_step, plan_step

C, STEP, SIGMA = 3, 50, 10 / 255
# Issue 7: fused at n = 16 vs the graph-captured reference; whole step in a graph, in ms.
SPEEDUP_TARGETS = {"pigdm_filter": 3.0, "ddpm_update": 3.0, "wiener_hqs": 2.0,
                   "kernel_project": 2.0}
STEP_TARGET_MS = {1: 0.25, 16: 0.4}


@dataclass
class Case:
    """One library call at one n, timed and checked under each backend."""

    name: str
    run: Callable[[], object]
    bytes: int
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)


def stand_in_network(x: Tensor, t: Tensor) -> Tensor:
    """ε = x/2: cheap, differentiable, and the same on every backend."""
    return 0.5 * x


def problem(n: int, size: int, kernel_size: int, device: torch.device) -> dict:
    """Random inputs of one step at ``n`` particles on a ``size²`` grid (never zeros)."""
    g = torch.Generator().manual_seed(n)
    shape = (size, size)
    tables = Schedule("100").tables(device)
    kernel = gaussian_kernel(kernel_size, kernel_size / 8, device=device)
    config = HQSConfig(iters=10, regularizer="l1").validate()
    y = torch.rand(C, *shape, generator=g).to(device)
    p = {"n": n, "shape": shape, "tables": tables, "kernel": kernel, "config": config,
         "step": torch.tensor(STEP, device=device),
         "x_t": torch.randn(n, C, *shape, generator=g).to(device),
         "eps": torch.randn(n, C, *shape, generator=g).to(device),
         "noise": torch.randn(n, C, *shape, generator=g).to(device),
         "x0": torch.rand(n, C, *shape, generator=g).to(device),
         "coefs": ops.ddpm_coefficients(tables),
         "plan": plan_step(Observation(y, SIGMA), tables, StepConfig("pigdm", config))}
    p["spec_x"], p["spec_y"] = torch.fft.rfft2(p["x0"]), torch.fft.rfft2(y)
    p["otf"] = psf2otf(kernel, shape)
    p["z"] = kernel_grid(kernel, shape) + 1e-4 * torch.randn(shape, generator=g).to(device)
    return p


def mstep(p: dict) -> Tensor:
    """The M-step of one Fast EM ΠGDM step (its spectral sums included)."""
    spectra = kernel_spectra(p["spec_y"], p["spec_x"])
    return hqs(spectra, p["kernel"], SIGMA, p["config"], p["shape"],
               ridge_r2=p["tables"].x0_var, step=p["step"])


def step(p: dict) -> tuple[Tensor, Tensor, Tensor]:
    """The engine's step with the stand-in network (its noise from the default generator)."""
    return guided_step(stand_in_network, p["plan"], p["step"], p["x_t"], p["kernel"], None)


def cases(p: dict) -> list[Case]:
    n, (h, w), k = p["n"], p["shape"], p["kernel"].shape[-1]
    image, freqs, grid = n * C * h * w * 4, h * (w // 2 + 1), h * w * 4
    spectra = n * C * freqs * 8
    x_t, eps, coefs, index, noise = p["x_t"], p["eps"], p["coefs"], p["step"], p["noise"]
    filter_args = (p["spec_x"], p["otf"], p["spec_y"], p["tables"].x0_var, index, SIGMA)
    # Per HQS iteration: rfft2 of the grid, the Z-update, irfft2, the projection.
    iteration = 2 * grid + freqs * 8 * 4 + freqs * 4 + grid + k * k * 8
    return [
        Case("spectral_sums", lambda: ops.spectral_sums(p["spec_y"], p["spec_x"]),
             spectra + C * freqs * 8 + freqs * 12),
        Case("wiener_hqs", lambda: mstep(p), spectra + C * freqs * 8 + 10 * iteration),
        Case("kernel_project", lambda: ops.kernel_project(p["z"], p["kernel"], 1e-5, True),
             2 * k * k * 4 + grid + k * k * 4),
        Case("pigdm_filter", lambda: ops.pigdm_filter(*filter_args),
             2 * spectra + (C + 1) * freqs * 8),
        Case("ddpm_update", lambda: ops.ddpm_update(x_t, eps, coefs, index, noise, grad=noise),
             5 * image),
        Case("step", lambda: step(p), 0),
    ]


def deviation(fused: object, reference: object) -> float:
    fused = fused if isinstance(fused, tuple) else (fused,)
    reference = reference if isinstance(reference, tuple) else (reference,)
    worst = 0.0
    for f, r in zip(fused, reference, strict=True):
        f, r = torch.view_as_real(f) if f.is_complex() else f, r
        r = torch.view_as_real(r) if r.is_complex() else r
        worst = max(worst, ((f - r).abs().max() / r.abs().max()).item())
    return worst


class Timer:
    """Median seconds of ``fn`` (CUDA events on GPU, the L2 flushed before each run)."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats
        self.flush = torch.empty(256 * 2**20 if device.type == "cuda" else 1,
                                 dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)

    def graphed(self, fn: Callable[[], object]) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay)

    def bandwidth(self) -> float:
        """Bytes read plus written per second by a large device copy."""
        size = 2**29 if self.device.type == "cuda" else 2**26
        src = torch.ones(size, dtype=torch.int8, device=self.device)
        dst = torch.empty_like(src)
        return 2 * size / self(lambda: dst.copy_(src))


def with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ["FASTEM_BACKEND"] = backend
        return fn()

    return run


def checked(backend: str, fn: Callable[[], object]) -> object:
    """``fn()`` under ``backend`` with the default generators reseeded (the step's noise)."""
    torch.manual_seed(0)
    return with_backend(backend, fn)()


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    timer = Timer(device, args.repeats)
    fused = [b for b in ("triton", "cpp") if _backend.unavailable(b, device) is None]
    on_gpu = device.type == "cuda"
    rows = []
    for n in args.particles:
        p = problem(n, args.size, args.kernel_size, device)
        for case in cases(p):
            reference = with_backend("reference", case.run)
            case.times["reference"] = timer(reference)
            if on_gpu:
                case.times["reference_graph"] = timer.graphed(reference)
            expected = checked("reference", case.run)
            for backend in fused:
                run = with_backend(backend, case.run)
                case.times[backend] = timer.graphed(run) if on_gpu else timer(run)
                case.errors[backend] = deviation(checked(backend, case.run), expected)
            rows.append({"op": case.name, "n": n, "bytes": case.bytes, "times_s": case.times,
                         "max_rel_deviation": case.errors})
    os.environ.pop("FASTEM_BACKEND", None)
    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "torch": torch.__version__, "triton": getattr(_backend.triton, "__version__", None),
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "size": args.size, "kernel_size": args.kernel_size,
            "bandwidth_bytes_per_s": timer.bandwidth(), "fused_backends": fused, "rows": rows}


def verdicts(row: dict, bandwidth: float) -> tuple[str, str]:
    """(fraction of bandwidth, target verdict) of the fastest fused version."""
    times = row["times_s"]
    fused = [times[b] for b in ("triton", "cpp") if b in times]
    if not fused:
        return "", ""
    best = min(fused)
    share = f"{row['bytes'] / best / bandwidth:6.1%}" if row["bytes"] else ""
    baseline = times.get("reference_graph", times["reference"])
    target = SPEEDUP_TARGETS.get(row["op"]) if row["n"] == 16 else None
    if row["op"] == "step" and row["n"] in STEP_TARGET_MS:
        target_ms = STEP_TARGET_MS[row["n"]]
        return share, f"{'PASS' if best * 1e3 <= target_ms else 'FAIL'} (<= {target_ms} ms)"
    if target is not None:
        verdict = "PASS" if baseline / best >= target else "FAIL"
        return share, f"{verdict} ({baseline / best:.1f}x vs >= {target}x)"
    return share, f"{baseline / best:.1f}x"


def report(result: dict, out: Path | None) -> None:
    bandwidth = result["bandwidth_bytes_per_s"]
    print(f"# {result['device']}, torch {result['torch']}, triton {result['triton']}, "
          f"{result['date']}; {result['size']}² grid, K = {result['kernel_size']}; copy "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s; times in µs (median)")
    columns = ["reference", "reference_graph", "triton", "cpp"]
    header = f"{'op':15} {'n':>3} " + " ".join(f"{c:>15}" for c in columns)
    print(header + f" {'MB':>7} {'of bw':>6}  vs graph / target   max rel dev")
    table = []
    for row in result["rows"]:
        times = [row["times_s"].get(c) for c in columns]
        share, verdict = verdicts(row, bandwidth)
        cells = " ".join(f"{t * 1e6:15.1f}" if t is not None else f"{'-':>15}" for t in times)
        dev = " ".join(f"{b}:{e:.1e}" for b, e in row["max_rel_deviation"].items())
        print(f"{row['op']:15} {row['n']:3d} {cells} {row['bytes'] / 1e6:7.2f} {share:>6}  "
              f"{verdict:18} {dev}")
        table.append({"op": row["op"], "n": row["n"], "mb": row["bytes"] / 1e6,
                      **{f"{c}_us": None if t is None else t * 1e6
                         for c, t in zip(columns, times, strict=True)},
                      "verdict": verdict})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_ops.json").write_text(json.dumps(result, indent=1))
        with open(out / "bench_ops.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--kernel-size", type=int, default=33)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (default: 50 on CUDA, 3 on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 50 if args.device.startswith("cuda") else 3
    args.kernel_size = min(args.kernel_size, args.size)
    report(measure(args), args.out)


if __name__ == "__main__":
    main()
