"""Train the bundled natural-image diffusion prior (``fastem_ext.models.natural_prior``).

    python python/train_prior.py --config cpu --out runs/natural_cpu --minutes 55 --threads 1
    python python/train_prior.py --config gpu --out runs/natural_gpu --device cuda --minutes 9
    python python/train_prior.py --out runs/natural_gpu --export     # weights + model card

Data: random crops of ``../shared/data/natural/train`` only (``natural/val`` is the validation set),
each from a random image, down-scaled by a factor uniform in [``scale_min``, 1] (antialiased
bilinear resize of a ``crop/s`` window), then one of the 8 flips/90° rotations. Loss: MSE of ε̂
against ε at a uniform t on the linear 1000-step schedule. AdamW, linear warm-up, then constant or
cosine decay; gradient-norm clip; EMA of the weights (decay ramped as (1+n)/(10+n) early on);
bf16 autocast on CUDA (``--amp``), float32 on CPU unless asked.

Determinism: every random draw of step n (data, t, ε) comes from generators seeded by
``(seed, n)`` alone, so the data order is fixed per seed and the checkpoint needs no RNG state: a
run resumed at step n continues exactly as the uninterrupted run (bit-exact on CPU with the same
thread count and ``--ckpt-precision exact``).

Checkpoints: ``OUT/ckpt_<step>/`` holds ``manifest.json`` (step, hyper-parameters, optimiser
groups, wall time, hardware) and the tensors (model, EMA, Adam moments) packed into safetensors
shards of at most 15 MiB each, so every file can leave a GPU machine (≤ 16 MB per file).
``OUT/latest`` names the newest complete checkpoint (written last, by atomic rename); older ones are
deleted. ``exact``: all float32 (~111 MB for 6.9 M parameters). ``compact``: model and EMA in
float16, Adam moments in bfloat16 (the second moment needs bf16's range), ~56 MB: small enough to
carry back into a fresh machine (64 MiB), at the price of one rounding of the weights per resume.
The log, ``OUT/log.jsonl``, has one JSON object per line (loss, lr, validation PSNR).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prior_common import (  # noqa: E402
    ACCEPT_SIGMA_255,
    load_uint8,
    timestep_of_sigma,
    train_files,
    val_crops,
    x0_psnr,
)

from fastem_ext.api import describe_device  # noqa: E402
from fastem_ext.models.natural_prior import NaturalPrior, build_natural_prior  # noqa: E402
from fastem_ext.schedule import Schedule  # noqa: E402

# Hyper-parameters fixed when a run starts (stored in the manifest, checked on resume).
HPARAMS = ("seed", "batch", "crop", "scale_min", "lr", "warmup", "lr_decay", "schedule_steps",
           "ema", "clip")
# Settings that may change between the runs of one training.
SETTINGS = ("val_every", "val_count", "val_crop", "ckpt_every", "log_every", "ckpt_precision",
            "card_val_count", "card_val_crop")
PRESETS: dict[str, dict] = {
    "smoke": {"seed": 0, "batch": 2, "crop": 32, "scale_min": 0.5, "lr": 1e-3, "warmup": 2,
              "lr_decay": "cosine", "schedule_steps": 6, "ema": 0.9, "clip": 1.0, "val_every": 3,
              "val_count": 1, "val_crop": 64, "ckpt_every": 3, "log_every": 1,
              "ckpt_precision": "exact", "card_val_count": 1, "card_val_crop": 64},
    "cpu": {"seed": 0, "batch": 8, "crop": 96, "scale_min": 0.5, "lr": 5e-4, "warmup": 200,
            "lr_decay": "cosine", "schedule_steps": 3200, "ema": 0.999, "clip": 1.0,
            "val_every": 250, "val_count": 4, "val_crop": 256, "ckpt_every": 500,
            "log_every": 25, "ckpt_precision": "exact", "card_val_count": 24,
            "card_val_crop": 256},
    "gpu": {"seed": 0, "batch": 64, "crop": 128, "scale_min": 0.5, "lr": 3e-4, "warmup": 1000,
            "lr_decay": "cosine", "schedule_steps": 30000, "ema": 0.9995, "clip": 1.0,
            "val_every": 1000, "val_count": 8, "val_crop": 256, "ckpt_every": 2500,
            "log_every": 100, "ckpt_precision": "compact", "card_val_count": 24,
            "card_val_crop": 256},
}
SHARD_BYTES = 15 * 2**20
CKPT_DTYPES = {"exact": {"model": torch.float32, "ema": torch.float32, "adam": torch.float32},
               "compact": {"model": torch.float16, "ema": torch.float16, "adam": torch.bfloat16}}


def step_generators(seed: int, step: int, device: torch.device) -> tuple[torch.Generator, ...]:
    """(CPU generator for the data draws, ``device`` generator for t and ε) of step ``step``."""
    a, b = np.random.SeedSequence([seed, step]).generate_state(2, np.uint64).tolist()
    return torch.Generator().manual_seed(a), torch.Generator(device).manual_seed(b)


class CropSampler:
    """Random augmented crops of uint8 images kept on the training device."""

    def __init__(self, files: list[Path], crop: int, scale_min: float, device: torch.device):
        self.images = [load_uint8(p).to(device) for p in files]
        self.crop, self.scale_min = crop, scale_min
        small = min(min(im.shape[-2:]) for im in self.images)
        if small < math.ceil(crop / scale_min):
            raise ValueError(f"crop {crop} at scale {scale_min} needs images of at least "
                             f"{math.ceil(crop / scale_min)} px, the smallest has {small}")

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``[n, 3, crop, crop]`` float32 in [-1, 1] on the device."""
        index = torch.randint(len(self.images), (n,), generator=gen).tolist()
        scale = (self.scale_min + (1 - self.scale_min) * torch.rand(n, generator=gen)).tolist()
        corner = torch.rand(n, 2, generator=gen).tolist()
        turns = torch.randint(8, (n,), generator=gen).tolist()
        out = []
        for i, s, (u, v), k in zip(index, scale, corner, turns, strict=True):
            image = self.images[i]
            size = min(round(self.crop / s), *image.shape[-2:])
            top = int(u * (image.shape[-2] - size + 1))
            left = int(v * (image.shape[-1] - size + 1))
            patch = image[None, :, top : top + size, left : left + size].float()
            if size != self.crop:
                # Antialiased down-scaling: photos at a smaller scale, with less noise and blur.
                patch = F.interpolate(patch, size=(self.crop, self.crop), mode="bilinear",
                                      antialias=True, align_corners=False)
            patch = torch.rot90(patch, k % 4, dims=(-2, -1))
            out.append(patch.flip(-1) if k >= 4 else patch)
        # Clamp: the resize's weights sum to 1 only up to rounding.
        return (torch.cat(out) / 127.5 - 1).clamp(-1, 1)


def lr_at(step: int, h: dict) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine down to lr/10."""
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    if h["lr_decay"] == "none":
        return h["lr"]
    frac = min(1.0, (step - h["warmup"]) / max(1, h["schedule_steps"] - h["warmup"]))
    return h["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def save_checkpoint(out: Path, step: int, model: NaturalPrior, ema: NaturalPrior,
                    opt: torch.optim.Optimizer, manifest: dict, precision: str) -> Path:
    """Write ``out/ckpt_<step>`` (shards + manifest), point ``out/latest`` at it, delete older
    checkpoints."""
    from safetensors.torch import save_file

    dtypes = CKPT_DTYPES[precision]
    tensors = {f"model/{k}": v.to(dtypes["model"]) for k, v in model.unet.state_dict().items()}
    tensors |= {f"ema/{k}": v.to(dtypes["ema"]) for k, v in ema.unet.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            dtype = torch.float32 if key == "step" else dtypes["adam"]
            tensors[f"adam/{idx}/{key}"] = value.to(dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, value in tensors.items():
        size = value.numel() * value.element_size()
        if size > SHARD_BYTES:
            raise ValueError(f"{name} ({size} bytes) does not fit one {SHARD_BYTES}-byte shard")
        if used + size > SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][name] = value.detach().cpu().contiguous()
        used += size
    folder = out / f"ckpt_{step:08d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = []
    for i, shard in enumerate(shards):
        names.append(f"shard_{i:02d}.safetensors")
        save_file(shard, folder / names[-1])
    manifest = {**manifest, "step": step, "precision": precision, "shards": names,
                "param_groups": opt_state["param_groups"]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp = out / "latest.tmp"
    tmp.write_text(folder.name)
    os.replace(tmp, out / "latest")
    for old in out.glob("ckpt_*"):
        if old != folder:
            shutil.rmtree(old)
    return folder


def load_checkpoint(out: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(manifest, tensors)`` of ``out``'s latest checkpoint, or None when there is none."""
    from safetensors.torch import load_file

    if not (out / "latest").is_file():
        return None
    folder = out / (out / "latest").read_text().strip()
    manifest = json.loads((folder / "manifest.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in manifest["shards"]:
        tensors |= load_file(folder / name)
    return manifest, tensors


def restore(model: NaturalPrior, ema: NaturalPrior, opt: torch.optim.Optimizer,
            manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Load model, EMA and optimiser state (cast back to float32) from a checkpoint."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}

    model.unet.load_state_dict(part("model/"), strict=True)
    ema.unet.load_state_dict(part("ema/"), strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in part("adam/").items():
        idx, name = key.split("/")
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in manifest["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def validate(model: NaturalPrior, ema: NaturalPrior, crops: torch.Tensor,
             device: torch.device) -> dict:
    """Validation PSNR at σ = 25/255 of the EMA and of the raw weights, with the noisy input's."""
    t = timestep_of_sigma(ACCEPT_SIGMA_255 / 255)
    model.eval()
    psnr_ema, noisy = x0_psnr(ema, crops, t, device)
    psnr_model, _ = x0_psnr(model, crops, t, device)
    model.train()
    return {"val_t": t, "val_psnr_ema": round(psnr_ema, 3), "val_psnr_model": round(psnr_model, 3),
            "val_psnr_noisy": round(noisy, 3)}


def resolve(args: argparse.Namespace, manifest: dict | None) -> tuple[dict, dict]:
    """(hyper-parameters, settings): the preset overridden by the command line; when resuming,
    the hyper-parameters are the run's own and a conflicting command-line value is an error."""
    preset = PRESETS[args.config or (manifest["config"] if manifest else "cpu")]
    given = {k: getattr(args, k) for k in HPARAMS + SETTINGS if getattr(args, k) is not None}
    settings = {k: given.get(k, preset[k]) for k in SETTINGS}
    if manifest is None:
        return {k: given.get(k, preset[k]) for k in HPARAMS}, settings
    hp = manifest["hparams"]
    clash = {k: (v, hp[k]) for k, v in given.items() if k in hp and v != hp[k]}
    if clash:
        raise SystemExit(f"{args.out} was started with other hyper-parameters (given, run): "
                         f"{clash}; use a new --out")
    return hp, settings


class Trainer:
    """Model, EMA, optimiser and data of one run; ``step()`` does one optimisation step."""

    def __init__(self, h: dict, device: torch.device, amp: str) -> None:
        self.h, self.device, self.amp = h, device, amp
        torch.manual_seed(h["seed"])  # the initial weights
        # No phase cycling while training: random crops already randomise the 2×2 grid phase.
        self.model = build_natural_prior(cycle_phase=False).to(device).train()
        self.ema = build_natural_prior().to(device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        # Fused AdamW on CUDA (one kernel for all parameters); the state dict is the same.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=h["lr"], weight_decay=0.0,
                                     fused=device.type == "cuda" or None)
        self.sampler = CropSampler(train_files(), h["crop"], h["scale_min"], device)
        self.ac = Schedule("1").base_alphas_cumprod.to(device=device, dtype=torch.float32)

    def step(self, step: int) -> torch.Tensor:
        """Optimisation step number ``step`` (0-based); returns the loss (device scalar)."""
        h, model = self.h, self.model
        gen_data, gen_noise = step_generators(h["seed"], step, self.device)
        x0 = self.sampler.batch(h["batch"], gen_data)
        t = torch.randint(1000, (h["batch"],), generator=gen_noise, device=self.device)
        eps = torch.randn(x0.shape, generator=gen_noise, device=self.device)
        a = self.ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, h)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp == "bf16"):
            pred = model(xt, t)
        loss = F.mse_loss(pred.float(), eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["clip"])
        self.opt.step()
        decay = min(h["ema"], (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1 - decay)
        return loss.detach()


def train(args: argparse.Namespace) -> None:
    """Train until ``--steps`` (default: the schedule length) or ``--minutes``, checkpointing every
    ``ckpt_every`` steps and at the end."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    loaded = load_checkpoint(args.out)
    h, s = resolve(args, loaded[0] if loaded else None)
    stop = args.steps if args.steps is not None else h["schedule_steps"]
    run = Trainer(h, device, amp)
    if loaded:
        restore(run.model, run.ema, run.opt, *loaded)
        print(f"resumed {args.out} at step {loaded[0]['step']}", flush=True)
    manifest = loaded[0] if loaded else {
        "config": args.config or "cpu", "hparams": h, "train_seconds": 0.0, "segments": [],
        "params": sum(p.numel() for p in run.model.parameters())}
    step = manifest.get("step", 0)
    if step >= stop:
        print(f"{args.out} is at step {step} >= {stop}: nothing to train", flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"
    if log_path.is_file():  # drop lines a crash wrote after the checkpoint we resume from
        lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in lines))
    crops = val_crops(s["val_count"], s["val_crop"])
    t_loop, first, saved = time.perf_counter(), step, -1

    def checkpoint() -> None:
        nonlocal saved
        saved = step
        seconds = round(time.perf_counter() - t_loop, 1)
        segment = {"hardware": describe_device(device), "amp": amp, "start_step": first,
                   "end_step": step, "seconds": seconds}
        save_checkpoint(args.out, step, run.model, run.ema, run.opt, {
            **manifest, "train_seconds": round(manifest["train_seconds"] + seconds, 1),
            "segments": [*manifest["segments"], segment]}, s["ckpt_precision"])

    loss_sum, count = torch.zeros((), device=device), 0
    with log_path.open("a") as log:
        while step < stop and time.perf_counter() - t_start < 60 * args.minutes:
            loss_sum += run.step(step)
            step, count = step + 1, count + 1
            entry: dict = {}
            if step % s["log_every"] == 0 or step == stop:
                entry |= {"loss": loss_sum.item() / count, "lr": lr_at(step - 1, h)}
                loss_sum.zero_()
                count = 0
            if step % s["val_every"] == 0 or step == stop:
                entry |= validate(run.model, run.ema, crops, device)
            if entry:
                elapsed = manifest["train_seconds"] + time.perf_counter() - t_loop
                line = json.dumps({"step": step, "train_s": round(elapsed, 1), **entry})
                log.write(line + "\n")
                log.flush()
                print(line, flush=True)
            if step % s["ckpt_every"] == 0 and step < stop:
                checkpoint()
    if saved != step:
        checkpoint()
    print(f"checkpoint at step {step} in {args.out}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log)")
    p.add_argument("--config", choices=sorted(PRESETS), default=None,
                   help="preset (default: the run's own when resuming, else cpu)")
    p.add_argument("--export", action="store_true",
                   help="export the latest checkpoint's EMA weights + model card; no training")
    p.add_argument("--export-to", type=Path, default=None,
                   help="weights file for --export (default: the bundled file)")
    p.add_argument("--timing-json", type=Path, action="append",
                   help="for --export: outputs of evaluate_prior.py --timing to show in the card")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    p.add_argument("--minutes", type=float, default=math.inf, help="wall budget of this run")
    p.add_argument("--steps", type=int, default=None,
                   help="stop at this global step (default: schedule_steps)")
    for name in HPARAMS + SETTINGS:
        kind = str if name in ("lr_decay", "ckpt_precision") else (
            float if name in ("scale_min", "lr", "ema", "clip") else int)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export:
        from evaluate_prior import export

        export(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
