"""Evaluate the natural-image prior: the x̂0 denoising curve on Kodak, CPU timing, and the model
card of a weights file.

    python python/evaluate_prior.py                       # curve of the bundled weights, all 24
    python python/evaluate_prior.py --card                # ... and rewrite their model card
    python python/evaluate_prior.py --timing --threads 1 --json python/results/prior_timing/x.json

The curve is the acceptance metric of ``prior_common`` (PSNR of x̂0 on 256×256 centre crops of
``natural/val`` at the timesteps of σ ∈ {5, 10, 15, 25, 50}/255 and at t = 100, 250, 500, 750, 900,
999, with the share of x̂0 clamped).
``--timing`` measures, at 256×256 batch 1, one forward pass and one forward + input-VJP (what a
ΠGDM step costs) for the shipped architecture and the candidates it was chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prior_common import (  # noqa: E402
    ACCEPT_SIGMA_255,
    REPO,
    curve_table,
    denoising_curve,
    timestep_of_sigma,
    val_crops,
)

from fastem_ext.hardware import describe_device  # noqa: E402
from fastem_ext.models.natural_prior import (  # noqa: E402
    NATURAL_PRIOR_CONFIG,
    NATURAL_PRIOR_PATCH,
    NaturalPrior,
    build_natural_prior,
    load_natural_prior,
    natural_prior_metadata,
    natural_prior_path,
)
from fastem_ext.models.unet import UNet  # noqa: E402

ACCEPT_PSNR = 30.5
ACCEPT_CLAMPED = 0.01  # share of x̂0 clamped (prior_common.x0_stats), at every curve timestep
_BASE = {"attention_resolutions": (), "num_head_channels": 32, "use_scale_shift_norm": True,
         "resblock_updown": True}
# (patch, UNet kwargs): plain full-resolution UNets and 2× pixel-unshuffled ones.
CANDIDATES: dict[str, tuple[int, dict]] = {
    "plain c32 (1,2,3,4) r1": (1, {"model_channels": 32, "num_res_blocks": 1,
                                   "channel_mult": (1, 2, 3, 4)}),
    "plain c32 (1,1,2,4) r1": (1, {"model_channels": 32, "num_res_blocks": 1,
                                   "channel_mult": (1, 1, 2, 4)}),
    "s2 c32 (1,2,3,4) r1": (2, {"model_channels": 32, "num_res_blocks": 1,
                                "channel_mult": (1, 2, 3, 4)}),
    "s2 c32 (1,2,4,4) r2 [shipped]": (2, {k: NATURAL_PRIOR_CONFIG[k] for k in (
        "model_channels", "num_res_blocks", "channel_mult")}),
    "s2 c32 (1,2,4,4,4) r2": (2, {"model_channels": 32, "num_res_blocks": 2,
                                  "channel_mult": (1, 2, 4, 4, 4)}),
    "s2 c32 (1,2,4,8) r2": (2, {"model_channels": 32, "num_res_blocks": 2,
                                "channel_mult": (1, 2, 4, 8)}),
    "s2 c64 (1,1,2,3) r1": (2, {"model_channels": 64, "num_res_blocks": 1,
                                "channel_mult": (1, 1, 2, 3)}),
}
def candidate(patch: int, kwargs: dict) -> NaturalPrior:
    """A random-weight prior of the given core shape, frozen, in eval mode (with the phase
    cycling and its mirror padding when ``patch`` > 1, as shipped)."""
    config = {**_BASE, **kwargs, "in_channels": 3 * patch**2, "out_channels": 3 * patch**2}
    return NaturalPrior(UNet(**config), patch, cycle_phase=patch > 1).eval().requires_grad_(False)


def time_model(model: NaturalPrior, size: int = 256, repeats: int = 5, bf16: bool = False) -> dict:
    """Median seconds of one forward and one forward + VJP w.r.t. the input at ``size``², batch 1
    (CPU; ``bf16`` runs the network under bfloat16 autocast)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)
    v = torch.randn(1, 3, size, size, generator=gen)
    t = torch.tensor([500])

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(x, t)

    def forward_vjp() -> None:
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            eps = model(xx, t)
        torch.autograd.grad(eps.float(), xx, v)

    out = {}
    for name, fn in (("forward_s", forward), ("forward_vjp_s", forward_vjp)):
        fn()  # warm-up: oneDNN primitive caches, allocator
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(sorted(times)[repeats // 2], 4)
    return out


def timing_table(rows: list[dict]) -> str:
    """Markdown table of ``--timing`` rows."""
    lines = ["| architecture | params | fwd fp32 (ms) | fwd+VJP fp32 (ms) | fwd+VJP bf16 (ms) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['params'] / 1e6:.2f} M | {1000 * r['fp32']['forward_s']:.0f} "
              f"| {1000 * r['fp32']['forward_vjp_s']:.0f} "
              f"| {1000 * r['bf16']['forward_vjp_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def run_timing() -> dict:
    """Timing rows of every candidate on this CPU, with the host description."""
    rows = []
    for name, (patch, kwargs) in CANDIDATES.items():
        model = candidate(patch, kwargs)
        rows.append({"name": name, "params": sum(p.numel() for p in model.parameters()),
                     "fp32": time_model(model), "bf16": time_model(model, bf16=True)})
        print(json.dumps(rows[-1]), flush=True)
    return {"hardware": describe_device("cpu"), "size": 256, "rows": rows}


def run_rows(history: list[dict]) -> str:
    """Markdown table of the training runs recorded in a weights file's header."""
    lines = ["| # | date | hardware | prediction | start from | steps | batch × crop | low-t share "
             "| lr | minutes | val PSNR EMA at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for number, run in enumerate(history, 1):
        if "hardware" not in run:  # the first, interim run, recorded before runs had records
            lines.append(f"| {number} | 2026-11-26 | {run.get('note', '')} | {run['prediction']} "
                         f"| scratch | {run['steps']} | 8 × 96² | 0 | 5e-4 "
                         f"| {run['seconds'] / 60:.0f} | 29.91 (4 crops) |")
            continue
        end = run.get("val_psnr_ema_end")
        lines.append(
            f"| {number} | {run['date']} | {run['hardware']}, {run['amp']} | {run['prediction']} "
            f"| {run['init']} | {run['steps']} ({run['start_step']}–"
            f"{run['start_step'] + run['steps']}) | {run['batch']} × {run['crop']}² "
            f"| {run.get('low_t_share', 0):g} | {run['lr']:g} | {run['seconds'] / 60:.1f} "
            f"| {'– (stopped early)' if end is None else f'{end:.2f}'} |")
    return "\n".join(lines)


def card(weights: Path, curve: list[dict], n_val: int, crop: int, timings: list[dict]) -> str:
    """Markdown model card of a weights file: its header's history, the curve, the timings."""
    meta = natural_prior_metadata(weights)
    history = json.loads(meta.get("history", "[]"))
    t25 = timestep_of_sigma(ACCEPT_SIGMA_255 / 255)
    psnr25 = next(r["psnr"] for r in curve if r["t"] == t25)
    clamped = max(r["clamped"] for r in curve)
    met = psnr25 >= ACCEPT_PSNR and clamped < ACCEPT_CLAMPED and n_val == 24
    status = (f"Meets the acceptance figures (x̂0 PSNR ≥ {ACCEPT_PSNR:.1f} dB at σ = 25/255 on "
              f"the 24 Kodak crops,\nunder {100 * ACCEPT_CLAMPED:.0f} % of x̂0 clamped at every t)."
              if met else
              f"**Does not yet meet the acceptance figures** (x̂0 PSNR ≥ {ACCEPT_PSNR:.1f} dB at "
              f"σ = 25/255 on the\n24 Kodak crops: {psnr25:.2f} dB; under "
              f"{100 * ACCEPT_CLAMPED:.0f} % of x̂0 clamped at every t: at most "
              f"{100 * clamped:.2f} %).\nTraining goes on (below) and replaces this file.")
    last = history[-1] if history else {}
    vals = last.get("val", [])
    val_rows = "\n".join(f"| {step} | {seconds / 60:.1f} | {raw:.2f} | {ema:.2f} |"
                         for step, seconds, raw, ema in vals[:: max(1, len(vals) // 12)])
    predicts = ("The network predicts v = √ᾱ ε − √(1−ᾱ) x0; the module returns\n"
                "ε̂ = √ᾱ v̂ + √(1−ᾱ) x_t (the samplers' contract)." if meta["prediction"] == "v"
                else "The network predicts ε.")
    params = sum(p.numel() for p in build_natural_prior().parameters())
    text = f"""# {weights.name}

Natural-image diffusion prior bundled with fastem (`fastem_ext.models.natural_prior`,
`load_natural_prior()`) on the linear 1000-step DDPM schedule (β 1e-4 … 0.02).
{predicts} Input in [-1, 1], any H and W that are multiples of 16.

{status}

## Architecture

A 2× pixel-unshuffle (3 → 12 channels at half resolution), the project's guided-diffusion `UNet`,
a 2× pixel-shuffle back; {params:,} parameters, stored as float16 (load them as float32 or
bfloat16). At inference each call shifts
the image by a 1-pixel offset that a hash of t picks (mirror-padded by 16 px), so grid-locked
errors do not build up over the sampling steps (see `NaturalPrior`). Core `UNet` keyword
arguments (patch {NATURAL_PRIOR_PATCH}):

```
{json.dumps(NATURAL_PRIOR_CONFIG)}
```

## Training

Data: `../shared/data/natural/train` only (552 images since 2026-11-28: 432 BSDS500 JPEGs,
CBSD68, McMaster, val20, Set14; the first run saw the 120 PNGs); `natural/val` (Kodak) is never
trained on. Crops in one of the 8 flips / 90° rotations, half at the native scale, half
down-scaled by s uniform in [0.5, 1] (`python/train_prior.py` says how). Loss: MSE of the
network's prediction (v since run 2) at a uniform t (but for the run's low-t share of each
batch, at a log-uniform t); AdamW, warm-up then cosine decay to lr/10
over the run, gradient-norm clip 1.0, EMA 0.999 (the EMA weights ship). Every run starts from
the previous file (the history below lives in the file's header):

{run_rows(history)}

Continue training (either writes `OUT/{weights.name}`; copy it here, then
`python python/evaluate_prior.py --card` rewrites this card):

```
# one GPU run of at most 9 minutes, from a copy of the repository plus the data pack:
python python/pack_training_data.py          # .pack/data, ~45 MiB; carry it as .pack
bash python/train_prior_gpu.sh               # on the GPU machine; writes $OUT/natural_gpu/
# or on the CPU, in the background (one thread, under nice):
nice python python/train_prior.py --config cpu --threads 1 --minutes 240 --out runs/natural_cpu
```

Both presets train on crops of 256², the size the prior works at in `run()`: on smaller crops
it learns what does not carry over (measured on 2026-11-28 from the file of run 4, which was
trained on 128², `python/results/prior-cpu-finetune/`: 500 CPU steps of 4 crops of 256² took x̂0
at σ = 25/255 on these 24 crops from 29.61 to 30.45 dB; 40 minutes on 96² crops took it down to
28.90 dB).

## Validation (x̂0 denoising, {n_val} Kodak {crop}×{crop} centre crops)

x0 = 2·img − 1, x_t = √ᾱ x0 + √(1−ᾱ) ε, x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ clamped to [-1, 1]; PSNR
against img (peak 1, mean over images); "clamped" is the share of x̂0's values beyond ±1.02
before the clamp (2.4 % of these crops' values are exactly 0 or 255: the margin keeps the
rounding of correct estimates at the bounds out of the count). σ·255 is the noise of x_t/√ᾱ
in [0, 1] units. Acceptance: t = {t25} (σ = 25/255): **{psnr25:.2f} dB** (needs ≥
{ACCEPT_PSNR:.1f}). Reproduce: `python python/evaluate_prior.py` (CPU, about a minute).

{curve_table(curve)}
"""
    if val_rows:
        text += f"""
The last run's validation (σ = 25/255, on its first few Kodak crops only, so not comparable
with the full mean above):

| step | minutes | PSNR raw weights | PSNR EMA |
|---|---|---|---|
{val_rows}
"""
    if timings:
        text += """
## Speed (why this architecture)

One forward and one forward + input-VJP (the cost of a ΠGDM step) at 256×256, batch 1, random
weights, median of 5 (`python python/evaluate_prior.py --timing --threads N`). A plain
full-resolution UNet cannot go below 32 channels at full resolution (GroupNorm(32, C)). The
`s2` rows include the phase cycling's 16-pixel mirror padding.
"""
        for timing in timings:
            text += f"\nOn {timing['hardware']}:\n\n{timing_table(timing['rows'])}\n"
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="default: the bundled file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--count", type=int, default=24, help="number of Kodak crops")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing", action="store_true", help="CPU timing of the candidates instead")
    p.add_argument("--card", action="store_true",
                   help="also write the weights' model card (the .md beside them)")
    p.add_argument("--timing-json", type=Path, nargs="*", default=None,
                   help="--timing outputs shown in the card (default: python/results/"
                        "prior_timing/*.json)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing:
        result: dict | list = run_timing()
        print(timing_table(result["rows"]))
    else:
        weights = args.weights or natural_prior_path()
        model = load_natural_prior(args.device, path=weights)
        result = denoising_curve(model, val_crops(args.count, args.crop), args.device)
        print(curve_table(result))
        if args.card:
            files = args.timing_json
            if files is None:
                files = sorted((REPO / "python" / "results" / "prior_timing").glob("*.json"))
            timings = [json.loads(f.read_text()) for f in files]
            weights.with_suffix(".md").write_text(
                card(weights, result, args.count, args.crop, timings))
            print(f"wrote {weights.with_suffix('.md')}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
