"""Throughput of whole restorations: reference engine vs fast engine, one run, one device.

GPU (the issue-8 table; ~6 minutes on an H100):

    python benchmarks/bench_engine.py --device cuda --model ffhq --out $OUT/bench_engine.json

CPU (the bundled prior at 256×256, n = 1, 100 steps; the README's CPU figure):

    python benchmarks/bench_engine.py --device cpu --model natural --particles 1 --no-dps \\
        --engines reference

Engines: ``reference`` (eager fp32), ``fast`` (bf16, CUDA graph, fused ops, the UNet's norms as
torch modules), ``fused`` (the fast engine with the UNet's norms as ``ops.group_norm_silu``,
``EngineConfig(fused_norms=True)``: what ``run()`` uses on CUDA) and ``compiled`` (the fast
engine with the network Inductor-compiled, ``run(..., compile=True)``; its compile time is
reported cold, the process's first compilation, and warm, the timed run's, served from torch's
caches). Prints a table and writes JSON with the device name. The reference engine at large n is
timed once over ``--reference-steps`` steps and extrapolated per step (marked in the table); the
fast engines always run the full schedule, CUDA-graph capture (and the compiled step) included,
``--repeats`` times (each run in the JSON, the best in the table).
Random weights are fine for speed (``--model ffhq``: the FFHQ-256 guided-diffusion UNet, 93.6 M
parameters). Also reports each fast engine's agreement with the reference (``_agreement``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from fastem_ext.demo import sample_image
from fastem_ext.engine import EngineConfig, graphed_sample
from fastem_ext.hardware import describe_device
from fastem_ext.metrics import psnr
from fastem_ext.motion import motion_kernel
from fastem_ext.mstep import HQSConfig, bundled_denoiser
from fastem_ext.observation import Observation
from fastem_ext.physics import blur, gaussian_kernel
from fastem_ext.samplers import fast_em, nonblind, sample
from fastem_ext.schedule import Schedule

FAST_ENGINES = ("fast", "fused", "compiled")  # the fast engine's variants


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """``ffhq``/``tiny``: random-weight UNets (zero-initialised layers re-drawn so the output is
    not trivially 0); ``natural``: the bundled prior."""
    if name == "natural":
        from fastem_ext.models.natural_prior import load_natural_prior

        return load_natural_prior(device=device)
    from fastem_ext.models.unet import FFHQ_256_CONFIG, UNet

    config = dict(FFHQ_256_CONFIG) if name == "ffhq" else {
        "image_size": 64, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "32", "num_head_channels": 16, "learn_sigma": True}
    torch.manual_seed(0)
    model = UNet.from_config(**config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, 0.02)
    return model.to(device).eval().requires_grad_(False)


def problem(size: int, device: torch.device) -> tuple[Observation, torch.Tensor]:
    sharp = sample_image(size)
    truth = motion_kernel(33 if size >= 128 else 9, seed=11)
    noise = torch.randn(sharp.shape, generator=torch.Generator().manual_seed(12))
    blurry = blur(sharp, truth) + 10 / 255 * noise
    return Observation(blurry.to(device), 10 / 255), truth


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def run_case(model, obs: Observation, truth_size: int, *, engine: str, guidance: str,
             particles: int, steps: int, device: torch.device, precision: str = "bf16",
             graphs: bool = True, known: torch.Tensor | None = None):
    """Seconds for ``steps`` steps of Fast EM (or, given the ``known`` kernel, of non-blind
    guidance with it) and the output."""
    kernel = gaussian_kernel(truth_size, truth_size / 16, device=device)
    runner = sample if engine == "reference" else partial(
        graphed_sample, engine=EngineConfig(precision=precision, graphs=graphs,
                                            compile=engine == "compiled",
                                            fused_norms=engine == "fused"))
    mstep = HQSConfig(regularizer="pnp", denoiser=bundled_denoiser(truth_size, device)
                      ).validate(truth_size)

    def go():
        generator = torch.Generator(device).manual_seed(0)
        if known is not None:
            return nonblind(model, obs, known.to(device), schedule=Schedule(str(steps)),
                            particles=particles, generator=generator, guidance=guidance,
                            runner=runner)
        return fast_em(model, obs, kernel, schedule=Schedule(str(steps)), particles=particles,
                       generator=generator, guidance=guidance, mstep=mstep, runner=runner)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, out = timed(go, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["ffhq", "natural", "tiny"], default="ffhq")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reference-steps", type=int, default=10,
                        help="steps timed for the reference engine (extrapolated per step)")
    parser.add_argument("--dps-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each fast engine (the best is kept)")
    parser.add_argument("--no-dps", action="store_true")
    parser.add_argument("--engines", nargs="+", default=["reference", "fast"],
                        choices=["reference", *FAST_ENGINES])
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--profile", default=None,
                        help="write a torch.profiler table of 5 eager fast-engine steps at the "
                             "largest n to this file (where a step's time goes)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args.model, device)
    obs, truth = problem(args.size, device)
    ksize = truth.shape[-1]
    name = describe_device(device)
    rows = []
    cases = [("pigdm", n, args.steps) for n in args.particles]
    if not args.no_dps:
        cases.append(("dps", 1, args.dps_steps))
    for guidance, n, steps in cases:
        row = {"method": f"fastem-{guidance}", "particles": n, "steps": steps}
        for engine in args.engines:
            timed_steps = min(steps, args.reference_steps) if engine == "reference" else steps
            # warm-up: lazy CUDA/cuFFT initialisation, cuDNN autotuning, compilation
            _, _, warm = run_case(model, obs, ksize, engine=engine, guidance=guidance,
                                  particles=n, steps=min(steps, 5), device=device)
            # The fast engines are timed `repeats` times, the best kept (a compiled engine's
            # first timed run once read 2.4x the previous session's time: RESULTS.md).
            runs = [run_case(model, obs, ksize, engine=engine, guidance=guidance, particles=n,
                             steps=timed_steps, device=device)
                    for _ in range(1 if engine == "reference" else args.repeats)]
            seconds, peak, out = min(runs, key=lambda run: run[0])
            row[f"{engine}_s_runs"] = [run[0] * steps / timed_steps for run in runs]
            row[f"{engine}_s_per_image"] = seconds * steps / timed_steps
            row[f"{engine}_extrapolated"] = timed_steps != steps
            row[f"{engine}_peak_bytes"] = peak
            if engine == "compiled":
                row["compile_s_first"] = warm.compile_seconds
                row["compile_s_again"] = out.compile_seconds
        for engine in FAST_ENGINES:
            if "reference" in args.engines and engine in args.engines:
                row[f"{engine}_speedup"] = (row["reference_s_per_image"]
                                            / row[f"{engine}_s_per_image"])
        rows.append(row)
        print(_format(row), flush=True)
        result = {"device": name, "torch": torch.__version__, "model": args.model,
                  "size": args.size, "date": time.strftime("%Y-%m-%d"), "rows": rows,
                  "fp32_agreement": None, "command": " ".join(sys.argv)}
        _write(args.out, result)  # after every row: a run cut short keeps what it measured
    if "reference" in args.engines and len(args.engines) > 1:
        agreement = _agreement(model, obs, truth, device, args)
        print("agreement with the reference: " + ", ".join(
            f"{key} {value:.4g}" for key, value in agreement.items()))
        result["fp32_agreement"] = agreement
        _write(args.out, result)
    if args.profile:
        _profile(model, obs, ksize, device, max(args.particles), args.profile)
    return 0


def _profile(model, obs, ksize, device, particles: int, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        run_case(model, obs, ksize, engine="fast", guidance="pigdm", particles=particles,
                 steps=5, device=device, graphs=False)
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=30)
    Path(path).write_text(f"fast engine, eager, n={particles}, 5 steps\n{table}\n")


def _write(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def _agreement(model, obs, truth, device, args) -> dict[str, float]:
    """The fast engines' fp32 runs (``fast``, ``fused``, ``compiled``: those benchmarked) against
    the reference, same seed, 20 steps, n = 1, with cuDNN's TF32 and non-deterministic algorithms
    off (a random-weight sampler amplifies their rounding): PSNR between the outputs and the
    kernels' MSE. With the natural prior, also each engine's full-schedule restoration in its
    default precision (bf16) against the sharp image, beside the reference's: blind (chaotic: a
    small difference can change the estimate) and with the true kernel (``nonblind_``: what
    measures the precision's cost)."""
    ksize = truth.shape[-1]
    steps = min(args.steps, 20)
    engines = [engine for engine in FAST_ENGINES if engine in args.engines]
    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark
    cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, True, False
    out: dict[str, float] = {"steps": steps}
    try:
        _, _, ref = run_case(model, obs, ksize, engine="reference", guidance="pigdm",
                             particles=1, steps=steps, device=device)
        for engine in engines:
            _, _, fast = run_case(model, obs, ksize, engine=engine, guidance="pigdm",
                                  particles=1, steps=steps, device=device, precision="fp32")
            out[f"{engine}_psnr_db"] = float(psnr(fast.particles[0], ref.particles[0]))
            out[f"{engine}_kernel_mse"] = float((fast.kernel - ref.kernel).square().mean())
    finally:
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved
    if args.model == "natural":
        sharp = sample_image(args.size).to(device)
        for engine in ["reference", *engines]:
            for prefix, known in (("", None), ("nonblind_", truth)):
                _, _, result = run_case(model, obs, ksize, engine=engine, guidance="pigdm",
                                        particles=1, steps=args.steps, device=device,
                                        known=known)
                out[f"{prefix}{engine}_restored_psnr_db"] = float(psnr(result.particles[0],
                                                                       sharp))
    return out


def _format(row: dict) -> str:
    parts = [f"{row['method']:13s} n={row['particles']:<3d} steps={row['steps']:<5d}"]
    for engine in ("reference", *FAST_ENGINES):
        if f"{engine}_s_per_image" in row:
            mark = "*" if row[f"{engine}_extrapolated"] else ""
            parts.append(f"{engine} {row[f'{engine}_s_per_image']:8.2f} s{mark}")
            if row[f"{engine}_peak_bytes"]:
                parts.append(f"peak {row[f'{engine}_peak_bytes'] / 2**30:.2f} GiB")
            if f"{engine}_speedup" in row:
                parts.append(f"{row[f'{engine}_speedup']:.1f}x")
    if row.get("compile_s_first") is not None:
        again = row["compile_s_again"]
        parts.append(f"compile {row['compile_s_first']:.1f} s first, "
                     + (f"{again:.1f} s again" if again is not None else "failed again"))
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
