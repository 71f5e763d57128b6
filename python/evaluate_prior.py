"""Evaluate the natural-image prior: the x̂0 denoising curve on Kodak, CPU timing, and the export
of a training run (weights + model card).

    python python/evaluate_prior.py                       # curve of the bundled weights, all 24
    python python/evaluate_prior.py --timing --threads 1 --json runs/natural/timing.json
    python python/train_prior.py --out RUN --export       # calls export() below

The curve is the acceptance metric of ``prior_common`` (PSNR of x̂0 on 256×256 centre crops of
``natural/val`` at the timesteps of σ ∈ {5, 10, 15, 25, 50}/255 and at t = 100, 250, 500).
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
    curve_table,
    denoising_curve,
    timestep_of_sigma,
    train_files,
    val_crops,
)

from fastem_ext.api import describe_device  # noqa: E402
from fastem_ext.models.natural_prior import (  # noqa: E402
    NATURAL_PRIOR_CONFIG,
    NATURAL_PRIOR_PATCH,
    NaturalPrior,
    build_natural_prior,
    load_natural_prior,
    natural_prior_path,
    save_natural_prior,
)
from fastem_ext.models.unet import UNet  # noqa: E402

ACCEPT_PSNR = 30.0
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
GPU_COMMAND = """\
# one H100, runs of at most 10 minutes; repeat the first line until the log reaches step 30000
# (each run resumes from runs/natural_gpu, whose files are all <= 16 MB):
python python/train_prior.py --config gpu --out runs/natural_gpu --device cuda --minutes 9
# then, on any machine holding runs/natural_gpu (writes the weights and this card):
python python/train_prior.py --out runs/natural_gpu --export"""


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


def model_card(name: str, manifest: dict, curve: list[dict], n_val: int, crop: int,
               timings: list[dict], log: list[dict]) -> str:
    """Markdown model card of an exported run."""
    h = manifest["hparams"]
    t25 = timestep_of_sigma(ACCEPT_SIGMA_255 / 255)
    psnr25 = next(r["psnr"] for r in curve if r["t"] == t25)
    on_gpu = all("cuda" in seg["hardware"].lower() or "nvidia" in seg["hardware"].lower()
                 for seg in manifest["segments"])
    interim = psnr25 < ACCEPT_PSNR or not on_gpu or n_val < 24
    segments = "\n".join(
        f"  - steps {g['start_step']}–{g['end_step']}: {g['hardware']}, {g['amp']}, "
        f"{g['seconds'] / 60:.1f} min" for g in manifest["segments"])
    vals = [r for r in log if "val_psnr_ema" in r]
    vals = vals[:: max(1, len(vals) // 12)] + ([vals[-1]] if vals else [])
    val_rows = "\n".join(
        f"| {r['step']} | {r['train_s'] / 60:.1f} | {r['val_psnr_model']:.2f} "
        f"| {r['val_psnr_ema']:.2f} |" for r in dict((r["step"], r) for r in vals).values())
    status = (
        f"**INTERIM MODEL.** Trained on {'a GPU' if on_gpu else 'a CPU'} for "
        f"{manifest['train_seconds'] / 60:.0f} min; it does "
        f"{'not ' if psnr25 < ACCEPT_PSNR else ''}reach the acceptance figure "
        f"(≥ {ACCEPT_PSNR:.1f} dB at σ = 25/255). It is the default only until the GPU run below "
        f"replaces it (same architecture, same file name):"
        if interim else
        f"Meets the acceptance figure (≥ {ACCEPT_PSNR:.1f} dB at σ = 25/255). Retrain with:")
    n_train = len(train_files())
    card = f"""# {name}

Natural-image diffusion prior bundled with fastem (`fastem_ext.models.natural_prior`,
`load_natural_prior()`): ε-prediction on the linear 1000-step DDPM schedule (β 1e-4 … 0.02),
input and output in [-1, 1], any H and W that are multiples of 16.

{status}

```
{GPU_COMMAND}
```

## Architecture

A 2× pixel-unshuffle (3 → 12 channels at half resolution), the project's guided-diffusion `UNet`,
a 2× pixel-shuffle back; {manifest['params']:,} parameters, stored as float16 (load them as
float32 or bfloat16). At inference each call shifts the image by a 1-pixel offset that a hash of t
picks (mirror-padded by 16 px), so grid-locked errors do not build up over the sampling steps
(see `NaturalPrior`). Core `UNet` keyword arguments (patch {NATURAL_PRIOR_PATCH}):

```
{json.dumps(NATURAL_PRIOR_CONFIG)}
```

## Training

- Data: `../shared/data/natural/train` only ({n_train} images: CBSD68, McMaster, val20, Set14);
  `natural/val` (Kodak) is never trained on. Random {h['crop']}×{h['crop']} crops of a random
  image, down-scaled by a factor uniform in [{h['scale_min']}, 1] (antialiased bilinear), then
  one of the 8 flips / 90° rotations.
- Loss: MSE(ε̂, ε), t uniform in 0…999. AdamW (β 0.9/0.999, no weight decay), lr {h['lr']:g},
  {h['warmup']} warm-up steps, then {h['lr_decay']} decay to lr/10 at step
  {h['schedule_steps']} (constant after); gradient-norm clip {h['clip']}; EMA decay {h['ema']}
  (the EMA weights ship).
- {manifest['step']} steps of batch {h['batch']} ({manifest['step'] * h['batch']:,} crops),
  seed {h['seed']}; training wall time {manifest['train_seconds'] / 60:.1f} min (validation
  and checkpoints included), in these runs:
{segments}

## Validation (x̂0 denoising, {n_val} Kodak {crop}×{crop} centre crops)

x0 = 2·img − 1, x_t = √ᾱ x0 + √(1−ᾱ) ε, x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ clamped to [-1, 1]; PSNR
against img (peak 1, mean over images). σ·255 is the noise of x_t/√ᾱ in [0, 1] units; the noisy
input's PSNR is what an untrained network (ε̂ = 0) scores. Acceptance: t = {t25}
(σ = 25/255): **{psnr25:.2f} dB** (needs ≥ {ACCEPT_PSNR:.1f}). Reproduce:
`python python/evaluate_prior.py`.

{curve_table(curve)}

During training (σ = 25/255, on the first {manifest['val_count']} Kodak crop(s) only, so not
comparable with the full mean above; log: `{manifest['log']}`):

| step | minutes | PSNR raw weights | PSNR EMA |
|---|---|---|---|
{val_rows}
"""
    if timings:
        card += """
## Speed (why this architecture)

One forward and one forward + input-VJP (the cost of a ΠGDM step) at 256×256, batch 1, random
weights, median of 5 (`python python/evaluate_prior.py --timing --threads N`). A plain
full-resolution UNet cannot go below 32 channels at full resolution (GroupNorm(32, C)). The
`s2` rows include the phase cycling's 16-pixel mirror padding.
"""
        for timing in timings:
            card += f"\nOn {timing['hardware']}:\n\n{timing_table(timing['rows'])}\n"
    return card


def export(args: argparse.Namespace) -> None:
    """EMA weights of ``args.out``'s latest checkpoint -> float16 safetensors + model card."""
    from train_prior import PRESETS, load_checkpoint

    loaded = load_checkpoint(args.out)
    if loaded is None:
        raise SystemExit(f"no checkpoint in {args.out}")
    manifest, tensors = loaded
    preset = PRESETS[manifest["config"]]
    n_val = args.card_val_count or preset["card_val_count"]
    crop = args.card_val_crop or preset["card_val_crop"]
    model = build_natural_prior()
    model.unet.load_state_dict({k[4:]: v.float() for k, v in tensors.items()
                                if k.startswith("ema/")}, strict=True)
    path = args.export_to or natural_prior_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_natural_prior(model, path, {"step": str(manifest["step"]),
                                     "train_seconds": str(manifest["train_seconds"])})
    shipped = load_natural_prior(args.device, path=path)  # evaluate what ships (fp16-rounded)
    curve = denoising_curve(shipped, val_crops(n_val, crop), args.device)
    timings = [json.loads(path.read_text()) for path in args.timing_json or []]
    log_path = args.out / "log.jsonl"
    log = [json.loads(ln) for ln in log_path.read_text().splitlines()] if log_path.exists() else []
    manifest |= {"val_count": preset["val_count"], "log": str(log_path)}
    path.with_suffix(".md").write_text(
        model_card(path.name, manifest, curve, n_val, crop, timings, log))
    (args.out / "curve.json").write_text(json.dumps(curve, indent=1))
    print(curve_table(curve), flush=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and its card", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="default: the bundled file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--count", type=int, default=24, help="number of Kodak crops")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing", action="store_true", help="CPU timing of the candidates instead")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timing:
        result: dict | list = run_timing()
        print(timing_table(result["rows"]))
    else:
        model = load_natural_prior(args.device, path=args.weights)
        result = denoising_curve(model, val_crops(args.count, args.crop), args.device)
        print(curve_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
