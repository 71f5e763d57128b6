"""One-shot benchmark of the fused ops against their references: one device, one run (issue 7).

GPU (build the CUDA extension first; about 4 minutes on an H100 in all):

    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTEM_FORCE_CUDA=1 python3 setup.py build_ext --inplace
    PYTHONPATH=. python3 benchmarks/bench_ops.py --device cuda --out $OUT

(benchmarks/RESULTS.md has the one prepared command that also runs the CUDA tests.)

CPU (small shapes; tests/test_bench_ops_script.py runs this):

    PYTHONPATH=. python benchmarks/bench_ops.py --device cpu --size 32 --particles 1 3

For each op and n: the median time of the reference (eager and, on CUDA, captured in a CUDA
graph), of the Triton kernels and of the C++ ops (graph-captured on CUDA), the bytes the op must
move at least, the fraction of the measured copy bandwidth that the fastest fused version
reaches, and each fused result's max deviation from the reference (relative to its scale). Then
the whole non-UNet part of a step: Fast-EM M-step (10 HQS iterations, ℓ1, ΠGDM ridge), ΠGDM
filter and DDPM update. The network's VJP is not part of it: the filtered vector stands in for
the guidance gradient. The L2 is flushed before every timed run. Writes bench_ops.json and
bench_ops.csv (device, versions, date, command) under --out.
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
from fastem_ext.guidance import pigdm_vector
from fastem_ext.mstep import HQSConfig, KernelSpectra, hqs
from fastem_ext.mstep import spectral_sums as reference_sums
from fastem_ext.ops import _backend
from fastem_ext.ops.ddpm_update import _update_reference as ddpm_reference
from fastem_ext.ops.kernel_project import _reference as project_reference
from fastem_ext.ops.pigdm_filter import _pigdm_reference
from fastem_ext.physics import gaussian_kernel, kernel_grid, psf2otf
from fastem_ext.samplers import ancestral_step, tweedie_x0
from fastem_ext.schedule import Schedule, at

C, STEP, SIGMA = 3, 50, 10 / 255
# Issue 7: fused at n = 16 vs the graph-captured reference; whole step in a graph, in ms.
SPEEDUP_TARGETS = {"pigdm_filter": 3.0, "ddpm_update": 3.0,
                   "wiener_hqs": 2.0, "kernel_project": 2.0}
STEP_TARGET_MS = {1: 0.25, 16: 0.4}


@dataclass
class Case:
    """One op at one n: ``fused`` (run under each fused backend) and ``reference``, timed and
    compared for the deviation."""

    name: str
    fused: Callable[[], object]
    reference: Callable[[], object]
    bytes: int
    times: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)


def problem(n: int, size: int, kernel_size: int, device: torch.device) -> dict:
    """Random inputs of one step at ``n`` particles on a ``size²`` grid (never zeros)."""
    g = torch.Generator().manual_seed(n)
    shape = (size, size)
    tables = Schedule("100").tables(device)
    kernel = gaussian_kernel(kernel_size, kernel_size / 8, device=device)
    p = {"n": n, "shape": shape, "tables": tables, "kernel": kernel,
         "step": torch.tensor(STEP, device=device),
         "x_t": torch.randn(n, C, *shape, generator=g).to(device),
         "eps": torch.randn(n, C, *shape, generator=g).to(device),
         "noise": torch.randn(n, C, *shape, generator=g).to(device),
         "x0": torch.rand(n, C, *shape, generator=g).to(device),
         "y": torch.rand(C, *shape, generator=g).to(device),
         "config": HQSConfig(iters=10, regularizer="l1").validate(),
         # ΠGDM in image units: r²/4 is both the M-step ridge and the filter's r² (the factor
         # 1/2 between the net- and image-unit filters goes into the guidance weight row).
         "r2_image": tables.r2 / 4}
    p["coefs"] = ops.ddpm_coefficients(tables)
    p["coefs"][5] *= 0.5
    p["spec_x"], p["spec_y"] = torch.fft.rfft2(p["x0"]), torch.fft.rfft2(p["y"])
    p["otf"] = psf2otf(kernel, shape)
    p["z"] = kernel_grid(kernel, shape) + 1e-4 * torch.randn(shape, generator=g).to(device)
    return p


def reference_mstep(p: dict) -> Tensor:
    spectra = KernelSpectra(*reference_sums(p["spec_y"], p["spec_x"]), p["n"], C)
    return hqs(spectra, p["kernel"], SIGMA, p["config"], p["shape"],
               ridge_r2=at(p["r2_image"], p["step"]))


def fused_mstep(p: dict) -> Tensor:
    spectra = ops.kernel_spectra(p["spec_y"], p["spec_x"])
    return ops.hqs(spectra, p["kernel"], SIGMA, p["config"], p["shape"], ridge_r2=p["r2_image"],
                   step=p["step"])[0]


def reference_step(p: dict, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The reference engine's step (samplers.guided_step) minus the network and its VJP."""
    t, i = p["tables"], p["step"]
    x0 = tweedie_x0(p["x_t"], p["eps"], at(t.sqrt_ac, i), at(t.sqrt_one_minus_ac, i))
    x0 = x0.clamp(-1.0, 1.0)
    x0_image = (x0 + 1.0) / 2.0
    spectra = KernelSpectra(*reference_sums(p["spec_y"], torch.fft.rfft2(x0_image)), p["n"], C)
    kernel = hqs(spectra, p["kernel"], SIGMA, p["config"], p["shape"], ridge_r2=at(t.r2, i) / 4.0)
    otf = psf2otf(kernel, p["shape"])
    residual = torch.fft.rfft2(2.0 * p["y"] - 1.0) - otf * torch.fft.rfft2(x0)
    v = pigdm_vector(residual, otf, at(t.r2, i), 2.0 * SIGMA, p["shape"])
    x = ancestral_step(x0, p["x_t"], noise, at(t.coef_x0, i), at(t.coef_xt, i), at(t.noise_std, i))
    return x + at(t.pigdm_weight, i) * v, kernel


def fused_step(p: dict, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The same step on the fused ops."""
    step, shape = p["step"], p["shape"]
    x0_image = ops.predict_x0(p["x_t"], p["eps"], p["coefs"], step)
    spec_x = torch.fft.rfft2(x0_image)
    kernel, grid = ops.hqs(ops.kernel_spectra(p["spec_y"], spec_x), p["kernel"], SIGMA,
                           p["config"], shape, ridge_r2=p["r2_image"], step=step)
    filtered = ops.pigdm_filter(spec_x, torch.fft.rfft2(grid), p["spec_y"], p["r2_image"], step,
                                SIGMA)
    v = torch.fft.irfft2(filtered, s=shape)
    x, _ = ops.ddpm_update(p["x_t"], p["eps"], p["coefs"], step, noise, grad=v)
    return x, kernel


def cases(p: dict) -> list[Case]:
    n, (h, w), k = p["n"], p["shape"], p["kernel"].shape[-1]
    image, freqs, grid = n * C * h * w * 4, h * (w // 2 + 1), h * w * 4
    spectra = n * C * freqs * 8
    x_t, eps, coefs, step, noise = p["x_t"], p["eps"], p["coefs"], p["step"], p["noise"]
    filter_args = (p["spec_x"], p["otf"], p["spec_y"], p["r2_image"], step, SIGMA)
    project_args = (p["z"], p["kernel"], 1e-5, True)
    # Per HQS iteration: rfft2 of the grid, the Z-update, irfft2, the projection.
    iteration = 2 * grid + freqs * 8 * 4 + freqs * 4 + grid + k * k * 8
    return [
        Case("spectral_sums", lambda: ops.spectral_sums(p["spec_y"], p["spec_x"]),
             lambda: reference_sums(p["spec_y"], p["spec_x"]),
             spectra + C * freqs * 8 + freqs * 12),
        Case("wiener_hqs", lambda: fused_mstep(p), lambda: reference_mstep(p),
             spectra + C * freqs * 8 + 10 * iteration),
        Case("kernel_project", lambda: ops.kernel_project(*project_args),
             lambda: project_reference(*project_args), 2 * k * k * 4 + grid + k * k * 4),
        Case("pigdm_filter", lambda: ops.pigdm_filter(*filter_args),
             lambda: _pigdm_reference(*filter_args),
             2 * spectra + (C + 1) * freqs * 8),
        Case("ddpm_update", lambda: ops.ddpm_update(x_t, eps, coefs, step, noise, grad=noise),
             lambda: ddpm_reference(x_t, eps, coefs, step, noise, noise, 1.0), 5 * image),
        Case("step", lambda: fused_step(p, noise), lambda: reference_step(p, noise), 0),
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


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    timer = Timer(device, args.repeats)
    fused = [b for b in ("triton", "cpp") if _backend.unavailable(b, device) is None]
    on_gpu = device.type == "cuda"
    rows = []
    for n in args.particles:
        p = problem(n, args.size, args.kernel_size, device)
        for case in cases(p):
            reference = with_backend("reference", case.reference)
            case.times["reference"] = timer(reference)
            if on_gpu:
                case.times["reference_graph"] = timer.graphed(reference)
            expected = with_backend("reference", case.reference)()
            for backend in fused:
                run = with_backend(backend, case.fused)
                case.times[backend] = timer.graphed(run) if on_gpu else timer(run)
                case.errors[backend] = deviation(with_backend(backend, case.fused)(), expected)
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
