"""Train the bundled natural-image diffusion prior (``fastem_ext.models.natural_prior``).

    # one GPU run of at most 9 minutes wall, start-up included (FASTEM_DATA: a pack, see below)
    python python/train_prior.py --config gpu --device cuda --minutes 8.5 --out runs/natural_gpu
    # the CPU path, in the background (one thread, under nice)
    nice python python/train_prior.py --config cpu --threads 1 --minutes 240 --out runs/natural_cpu
    # then ship it: the weights, and their card (evaluated here)
    cp runs/natural_gpu/natural_s2c32.safetensors fastem_ext/weights/
    python python/evaluate_prior.py --card

Every run starts from a weights file (``--init``, default the bundled weights; ``--init none``
starts from scratch) and writes ``OUT/natural_s2c32.safetensors``: the EMA weights in float16, whose
header carries the whole training history (one record per run: hardware, steps, batch, minutes,
validation PSNR), so the next run, on any machine, resumes from the shipped file itself. There is
no optimiser checkpoint: a run re-warms AdamW over ``warmup`` steps. The weights are rewritten
atomically every ``save_every`` steps and at the end, so a killed run leaves its last good file.
``OUT/log.jsonl`` has one JSON object per logged step (loss, lr, validation PSNR).

Data: ``natural/train`` only (PNG and JPEG; ``natural/val`` is the validation set), all of it
resident on the training device as one uint8 canvas; every crop is cut, scaled and turned there
in one batched ``grid_sample``, at a uniform position in a uniform image, in one of the 8 flips /
90° rotations: half of them at the native scale (exact pixels, no interpolation: the prior must
learn how sharp a photo really is), the others a window of ``crop/s`` pixels (s uniform in
[``scale_min``, 1], at most the image's short side) sampled at twice the crop's resolution and
2×2-averaged (antialiased down to 2×).
``FASTEM_DATA`` points at another data folder (with ``natural/train`` and ``natural/val``), for
example the compact pack that travels to a GPU machine (``python python/pack_training_data.py``).

Loss: MSE of the network's v̂ against ``v = √ᾱ ε − √(1−ᾱ) x0`` at a uniform t on the linear
1000-step schedule (see ``natural_prior`` for why v), except a ``low_t_share`` of each batch at a
log-uniform t (``draw_timesteps``). AdamW, linear warm-up, then cosine decay to
lr/10 at ``schedule_steps`` (``auto``: as many steps as the ``--minutes`` budget allows, measured
over the first steps, for a dedicated GPU; ``time``: over the wall budget itself, for a CPU
shared with other work, whose step rate changes); gradient-norm clip; EMA of the weights (decay
ramped as (1+n)/(10+n) over the run's first steps); bf16 autocast on CUDA, float32 on CPU
unless asked. Each step's draws come from generators seeded by ``(seed, global step)``, so a run
that continues another draws new data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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

from fastem_ext.hardware import describe_device  # noqa: E402
from fastem_ext.models.natural_prior import (  # noqa: E402
    NATURAL_PRIOR_WEIGHTS,
    NaturalPrior,
    build_natural_prior,
    natural_prior_metadata,
    natural_prior_path,
    save_natural_prior,
)
from fastem_ext.schedule import Schedule  # noqa: E402

HPARAMS = ("seed", "batch", "crop", "scale_min", "low_t_share", "lr", "warmup", "schedule_steps",
           "ema", "clip")
SETTINGS = ("val_every", "val_count", "val_crop", "save_every", "log_every")
# Crops of the inference size (256², what run() works on): trained on 96² or 128² crops, the
# network denoises 256² images worse (python/results/prior-cpu-finetune: from a file trained on
# 128², 500 steps of 4 crops of 256² took x̂0 at σ = 25/255 from 29.61 to 30.45 dB on the 24
# Kodak crops; 96² crops took it down to 28.90). The GPU preset keeps its pixels per batch.
PRESETS: dict[str, dict] = {
    "smoke": {"seed": 0, "batch": 2, "crop": 32, "scale_min": 0.5, "low_t_share": 0.5,
              "lr": 1e-3, "warmup": 2,
              "schedule_steps": 6, "ema": 0.9, "clip": 1.0, "val_every": 3, "val_count": 1,
              "val_crop": 64, "save_every": 3, "log_every": 1},
    "cpu": {"seed": 0, "batch": 4, "crop": 256, "scale_min": 0.5, "low_t_share": 0.0,
            "lr": 1e-4, "warmup": 100,
            "schedule_steps": "time", "ema": 0.999, "clip": 1.0, "val_every": 250,
            "val_count": 4, "val_crop": 256, "save_every": 500, "log_every": 25},
    "gpu": {"seed": 0, "batch": 32, "crop": 256, "scale_min": 0.5, "low_t_share": 0.0,
            "lr": 4e-4, "warmup": 500,
            "schedule_steps": "auto", "ema": 0.999, "clip": 1.0, "val_every": 1000,
            "val_count": 8, "val_crop": 256, "save_every": 2000, "log_every": 100},
}
# An automatic schedule ends where the budget's rate, measured over these steps (after the first
# few, which pay for allocator and kernel warm-up), says the time runs out, less a margin for
# validation and the final save.
PROBE_SKIP, PROBE_STEPS, BUDGET_MARGIN = 5, 40, 0.95
# Share of crops at the native scale (exact pixels); the others are down-scaled by s.
NATIVE_SHARE = 0.5
# The 8 flips / 90° rotations of the unit square, as matrices acting on (y, x) in [-1, 1].
DIHEDRAL = torch.tensor([
    [[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
    [[1, 0], [0, -1]], [[0, 1], [1, 0]], [[-1, 0], [0, 1]], [[0, -1], [-1, 0]],
], dtype=torch.float32)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The ``device`` generator of all draws of global step ``step`` (data, t, ε)."""
    (state,) = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64).tolist()
    return torch.Generator(device).manual_seed(state)


class CropSampler:
    """Random augmented crops of uint8 images kept on the training device, drawn in one batch.

    The images are turned to landscape (the 8 flips/rotations make orientation irrelevant) and
    stored edge-replicated on one ``[N, 3, H, W]`` uint8 canvas, so a bilinear tap just outside
    an image reads its own border, never another image or zeros.
    """

    def __init__(self, files: list[Path], crop: int, scale_min: float, device: torch.device):
        if not 0 < scale_min <= 1:
            raise ValueError(f"scale_min must lie in (0, 1], got {scale_min}")
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(load_uint8, files))  # Pillow decodes without the GIL
        images = [im.transpose(-2, -1) if im.shape[-2] > im.shape[-1] else im for im in images]
        height = max(im.shape[-2] for im in images)
        width = max(im.shape[-1] for im in images)
        self.canvas = torch.empty(len(images), 3, height, width, dtype=torch.uint8, device=device)
        for i, im in enumerate(images):
            pad = (0, width - im.shape[-1], 0, height - im.shape[-2])
            self.canvas[i] = F.pad(im[None].float(), pad, mode="replicate")[0].to(torch.uint8)
        self.sizes = torch.tensor([im.shape[-2:] for im in images], dtype=torch.float32,
                                  device=device)
        self.crop, self.scale_min, self.device = crop, scale_min, device
        # Side of the square box gathered per crop: the largest window, plus the bilinear taps.
        self.box = min(math.ceil(crop / scale_min) + 4, height, width)
        # Sample centres [2c, 2c, (y, x)] in (-1, 1): twice the crop's resolution (scaled crops,
        # 2×2-averaged after), and every pair snapped onto its output pixel's centre (native
        # crops: the average of two equal taps is the pixel itself, no interpolation blur).
        j = torch.arange(2 * crop, device=device, dtype=torch.float32)
        self.units = [torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
                      for g in ((j + 0.5) / crop - 1, (2 * (j // 2) + 1) / crop - 1)]
        self.dihedral = DIHEDRAL.to(device)

    def __len__(self) -> int:
        return self.canvas.shape[0]

    def batch(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``[n, 3, crop, crop]`` float32 in [-1, 1] on the device (``gen`` on the device)."""
        dev, c = self.device, self.crop
        index = torch.randint(len(self), (n,), generator=gen, device=dev)
        u = torch.rand(n, 4, generator=gen, device=dev)
        turn = torch.randint(8, (n,), generator=gen, device=dev)
        hw = self.sizes[index]  # [n, (h, w)]
        scale = self.scale_min + (1 - self.scale_min) * u[:, 0]
        short = hw.min(1).values
        # Half of the crops (and any whose window the image caps at c) at the native scale.
        native = (u[:, 3] < NATIVE_SHARE) | (short <= c)
        side = torch.where(native, torch.minimum(short, torch.tensor(float(c), device=dev)),
                           torch.minimum(c / scale, short))  # window side, in source pixels
        corner = u[:, 1:3] * (hw - side[:, None])  # window's top-left (y, x), continuous
        corner = torch.where(native[:, None], corner.floor(), corner)  # native: on the pixels
        # Gather a box around each window: the only pixels its bilinear taps can read.
        limit = torch.tensor(self.canvas.shape[-2:], device=dev) - self.box
        origin = (corner.floor() - 1).clamp(min=0)
        origin = torch.minimum(origin, limit.float()).long()  # [n, (y, x)]
        offsets = torch.arange(self.box, device=dev)
        rows = origin[:, :1] + offsets  # [n, box]
        cols = origin[:, 1:] + offsets
        box = self.canvas[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        box = box.permute(0, 3, 1, 2).float()  # [n, 3, box, box]
        # Sample centres: the unit square turned, mapped onto the window, normalised to the box.
        unit = torch.where(native[:, None, None, None], self.units[1], self.units[0])
        unit = torch.einsum("nij,nhwj->nhwi", self.dihedral[turn], unit)
        pos = corner[:, None, None, :] + (unit + 1) / 2 * side[:, None, None, None]
        grid = (pos - origin[:, None, None, :]) / self.box * 2 - 1  # align_corners=False
        patch = F.grid_sample(box, grid.flip(-1), mode="bilinear", padding_mode="border",
                              align_corners=False)
        patch = F.avg_pool2d(patch, 2)
        # Clamp: bilinear weights sum to 1 only up to rounding.
        return (patch / 127.5 - 1).clamp(-1, 1)


def lr_at(step: int, h: dict, time_frac: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps of the run, then cosine down to lr/10 at
    ``schedule_steps`` (steps of this run), constant after; with ``schedule_steps="time"`` the
    cosine runs over ``time_frac``, the share of the wall budget spent."""
    if step < h["warmup"]:
        return h["lr"] * (step + 1) / h["warmup"]
    if h["schedule_steps"] == "time":
        frac = time_frac
    else:
        frac = (step - h["warmup"]) / max(1, h["schedule_steps"] - h["warmup"])
    return h["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


class Trainer:
    """Model, EMA, optimiser and data of one run; ``step()`` does one optimisation step."""

    def __init__(self, h: dict, device: torch.device, amp: str,
                 init: dict[str, torch.Tensor] | None) -> None:
        self.h, self.device, self.amp = h, device, amp
        torch.manual_seed(h["seed"])  # the initial weights, when there is no init file
        # No phase cycling while training: random crops already randomise the 2×2 grid phase.
        self.model = build_natural_prior(cycle_phase=False).to(device).train()
        if init is not None:
            self.model.unet.load_state_dict({k: v.float() for k, v in init.items()}, strict=True)
        self.ema = build_natural_prior().to(device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        # Fused AdamW on CUDA (one kernel for all parameters).
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=h["lr"], weight_decay=0.0,
                                     fused=device.type == "cuda" or None)
        self.sampler = CropSampler(train_files(), h["crop"], h["scale_min"], device)
        ac = Schedule("1").base_alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_ac, self.sqrt_one_minus_ac = ac.sqrt(), (1 - ac).sqrt()

    def step(self, step: int, global_step: int, lr: float) -> torch.Tensor:
        """Optimisation step ``step`` of this run (0-based) at learning rate ``lr``; returns the
        loss (device scalar)."""
        h, model = self.h, self.model
        gen = step_generator(h["seed"], global_step, self.device)
        x0 = self.sampler.batch(h["batch"], gen)
        t = draw_timesteps(h["batch"], h["low_t_share"], gen, self.device)
        eps = torch.randn(x0.shape, generator=gen, device=self.device)
        a = self.sqrt_ac[t][:, None, None, None]
        b = self.sqrt_one_minus_ac[t][:, None, None, None]
        xt = a * x0 + b * eps
        target = a * eps - b * x0 if model.prediction == "v" else eps
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp == "bf16"):
            pred = model.network_output(xt, t)
        loss = F.mse_loss(pred.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), h["clip"])
        self.opt.step()
        decay = min(h["ema"], (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(model.parameters()), 1 - decay)
        return loss.detach()


def draw_timesteps(n: int, low_t_share: float, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """``n`` training timesteps: uniform on [0, 1000), except the first ``round(low_t_share·n)``,
    log-uniform (t = ⌊1000^u⌋ − 1 for u uniform in [0, 1): 2/3 of them below t = 100, i.e.
    σ < 44/255, a tenth at t = 0), which spend more of the network's capacity on the low noise
    where x̂0 is sharp enough to drive the kernel. With a share of 0 the draws are those of a
    plain uniform run."""
    t = torch.randint(1000, (n,), generator=gen, device=device)
    low = round(low_t_share * n)
    if low:
        u = torch.rand(low, generator=gen, device=device)
        t[:low] = (u * math.log(1000)).exp().floor().long() - 1
    return t


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


def resolve(args: argparse.Namespace) -> tuple[dict, dict]:
    """(hyper-parameters, settings): the preset overridden by the command line."""
    preset = PRESETS[args.config]
    given = {k: getattr(args, k) for k in HPARAMS + SETTINGS if getattr(args, k) is not None}
    merged = {k: given.get(k, preset[k]) for k in HPARAMS + SETTINGS}
    if merged["schedule_steps"] not in ("auto", "time"):
        try:
            merged["schedule_steps"] = int(merged["schedule_steps"])
        except ValueError:
            merged["schedule_steps"] = 0
        if merged["schedule_steps"] < 1:
            raise SystemExit("--schedule-steps must be a positive integer, 'auto' or 'time'")
    elif math.isinf(args.minutes):
        raise SystemExit(f"--schedule-steps {merged['schedule_steps']} needs a --minutes budget")
    if not 0 <= merged["low_t_share"] <= 1:
        raise SystemExit(f"--low-t-share must be in [0, 1], got {merged['low_t_share']}")
    return {k: merged[k] for k in HPARAMS}, {k: merged[k] for k in SETTINGS}


def load_init(spec: str) -> tuple[dict[str, torch.Tensor] | None, list[dict], str]:
    """(UNet state dict or None, the history it carries, a description) of ``--init``."""
    from safetensors.torch import load_file

    if spec == "none":
        return None, [], "scratch"
    path = natural_prior_path() if spec == "bundled" else Path(spec)
    meta = natural_prior_metadata(path)
    if "history" in meta:
        history = json.loads(meta["history"])
    else:  # the first, interim file: one CPU run whose record lives in its card
        history = [{"prediction": meta["prediction"], "steps": int(meta.get("step", 0)),
                    "seconds": float(meta.get("train_seconds", 0)),
                    "note": "interim CPU run (ε-prediction, 120 PNGs, batch 8, 96² crops)"}]
    note = f"{path.name} ({meta['prediction']}-prediction, {sum_steps(history)} steps)"
    return load_file(os.fspath(path)), history, note


def sum_steps(history: list[dict]) -> int:
    return sum(int(run.get("steps", 0)) for run in history)


def save_weights(out: Path, ema: NaturalPrior, history: list[dict]) -> Path:
    """Write ``out/NATURAL_PRIOR_WEIGHTS`` (EMA, float16, with the history) atomically."""
    path = out / NATURAL_PRIOR_WEIGHTS
    tmp = path.with_name(path.name + ".tmp")
    save_natural_prior(ema, tmp, {"history": json.dumps(history),
                                  "step": str(sum_steps(history))})
    os.chmod(tmp, 0o644)  # an ordinary file, whatever mode the writer created it with
    os.replace(tmp, path)
    return path


def train(args: argparse.Namespace) -> None:
    """Train until the schedule's end (or ``--steps``) or the ``--minutes`` wall budget, which
    counts from the start of this function (data loading included)."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    torch.backends.cudnn.benchmark = True  # fixed training shapes: let cuDNN pick its kernels
    h, s = resolve(args)
    init, history, init_note = load_init(args.init)
    run = Trainer(h, device, amp, init)
    start_step = sum_steps(history)
    budget = 60 * args.minutes
    canvas_mib = run.sampler.canvas.numel() / 2**20
    print(f"{len(run.sampler)} training images on {device} ({canvas_mib:.0f} MiB canvas), init: "
          f"{init_note}, ready in {time.perf_counter() - t_start:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    crops = val_crops(s["val_count"], s["val_crop"])
    record = {"hardware": describe_device(device), "amp": amp, "prediction": "v",
              "init": init_note, "images": len(run.sampler), "start_step": start_step,
              "steps": 0, "seconds": 0.0, "command": " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), **h, "val": []}

    def save() -> None:
        record["seconds"] = round(time.perf_counter() - t_start, 1)
        save_weights(args.out, run.ema, [*history, record])

    step, probe_t0, auto = 0, 0.0, h["schedule_steps"] == "auto"
    stop = args.steps if args.steps is not None else math.inf
    loss_sum, count = torch.zeros((), device=device), 0

    def time_frac() -> float:
        return (time.perf_counter() - t_start) / budget

    with (args.out / "log.jsonl").open("a") as log:
        while step < stop and time.perf_counter() - t_start < budget:
            fixed = h["schedule_steps"] not in ("auto", "time")
            if fixed and step >= h["schedule_steps"] and args.steps is None:
                break
            lr = lr_at(step, h, time_frac())
            loss_sum += run.step(step, start_step + step, lr)
            step, count = step + 1, count + 1
            if auto:
                if step == PROBE_SKIP:
                    loss_sum.item()  # synchronise: the probe times whole steps
                    probe_t0 = time.perf_counter()
                elif step == PROBE_SKIP + PROBE_STEPS:
                    loss_sum.item()
                    rate = PROBE_STEPS / (time.perf_counter() - probe_t0)
                    left = budget - (time.perf_counter() - t_start)
                    h["schedule_steps"] = max(step + 1, int(step + BUDGET_MARGIN * rate * left))
                    record["schedule_steps"] = h["schedule_steps"]
                    record["probe_steps_per_s"] = round(rate, 2)
                    auto = False
                    print(f"{rate:.2f} steps/s: schedule of {h['schedule_steps']} steps",
                          flush=True)
            entry: dict = {}
            if step % s["log_every"] == 0:
                entry |= {"loss": loss_sum.item() / count, "lr": lr}
                loss_sum.zero_()
                count = 0
            if step % s["val_every"] == 0:
                entry |= validate(run.model, run.ema, crops, device)
            if entry:
                elapsed = round(time.perf_counter() - t_start, 1)
                line = json.dumps({"step": start_step + step, "run_step": step,
                                   "wall_s": elapsed, **entry})
                log.write(line + "\n")
                log.flush()
                print(line, flush=True)
                if "val_psnr_ema" in entry:
                    record["val"].append([start_step + step, elapsed, entry["val_psnr_model"],
                                          entry["val_psnr_ema"]])
            record["steps"] = step
            if step % s["save_every"] == 0:
                save()
    end = validate(run.model, run.ema, crops, device)
    if not record["val"] or record["val"][-1][0] != start_step + step:
        record["val"].append([start_step + step, round(time.perf_counter() - t_start, 1),
                              end["val_psnr_model"], end["val_psnr_ema"]])
    record["val_psnr_ema_end"] = end["val_psnr_ema"]
    record["steps"] = step
    save()
    print(json.dumps({"end": start_step + step, **end}), flush=True)
    print(f"{step} steps in {record['seconds']:.0f} s: {args.out / NATURAL_PRIOR_WEIGHTS}",
          flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (weights, log)")
    p.add_argument("--config", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--init", default="bundled",
                   help="weights to start from: 'bundled' (default), a file, or 'none'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    p.add_argument("--minutes", type=float, default=math.inf,
                   help="wall budget of this run, data loading included")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    for name in HPARAMS + SETTINGS:
        kind = float if name in ("scale_min", "low_t_share", "lr", "ema", "clip") else (
            str if name == "schedule_steps" else int)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
