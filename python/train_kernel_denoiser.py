"""Train a plug-and-play kernel denoiser on generated camera-shake kernels (CPU, minutes).

    python python/train_kernel_denoiser.py --size 33 --seed 0 --minutes 25 --out fastem_ext/weights/

Data: clean kernels from ``fastem_ext.motion.motion_kernels`` on TRAIN seeds only (batch ``t`` of
run seed ``s`` uses seeds ``1_000_000 + s·10^8 + t·batch …``, see :func:`kernel_seed_start`).
Half of each batch is corrupted generically, at a noise level σ_d log-uniform in [2e-4, 0.15]:
white noise, or with probability 1/4 spatially correlated noise of the same standard deviation;
then, with probability 1/2, clamp ≥ 0 and renormalise to sum 1 as the HQS projection does.
The other half is what the M-step really hands the denoiser (:func:`hqs_inputs`): one simulated
Z-update (Eq. 24) of the kernel seen through the power spectrum of a ``natural/train`` crop, with
observation noise σ log-uniform in [0.5, 30]/255, coupling σ²β (β log-uniform in [1e3, 1e6]) and
the previous kernel the M-step's Gaussian start, the true kernel or a softened one; then the HQS
projection. Such a ``z`` is the kernel shrunk where the image has little energy plus coloured
noise; its conditioning is the ``σ_z`` of ``fastem_ext.mstep.wiener_noise_std``, as in the M-step.
Validation uses EVAL-seed kernels only (the HQS rows see them through the train crops' spectra).

Loss: mean squared error divided by σ_d² per sample (the error in units of the noise, so every
noise level counts), Adam, linear warm-up then cosine decay, gradient-norm clip 1.

Determinism: with ``--steps N`` the run is deterministic per ``--seed`` (CPU, fixed thread count).
Without ``--steps``, a short timing probe on a throw-away model picks N to fit ``--minutes``; N is
logged, so ``--steps N`` reproduces the run. Training stops early (and says so in the log and the
card) if it reaches ``--max-minutes`` − 3 min, keeping the whole run, final validation included,
under ``--max-minutes`` (default 30) on a busy machine.

Writes ``kernel_denoiser_{size}.safetensors``, a JSON log and a model card (``.md``) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prior_common import train_files

from fastem_ext.hardware import describe_device
from fastem_ext.io import center_crop, read_image
from fastem_ext.models.kernel_denoiser import (
    KernelDenoiser,
    bundled_size,
    save_kernel_denoiser,
)
from fastem_ext.motion import EVAL_SEEDS, TRAIN_SEEDS, check_seed_range, motion_kernels
from fastem_ext.mstep import wiener_noise_std
from fastem_ext.ops.wiener_z import z_spectrum
from fastem_ext.physics import gaussian_kernel, kernel_grid, otf2psf

SIGMA_RANGE = (2e-4, 0.15)
VAL_SIGMAS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RUN_STRIDE = 100_000_000  # kernel seeds reserved per run seed
MAX_RUN_SEED = (TRAIN_SEEDS.stop - TRAIN_SEEDS.start) // RUN_STRIDE - 1
P_COLOURED = 0.25
P_PROJECTED = 0.5
P_HQS = 0.5  # share of each batch made by simulated Z-updates
HQS_NOISE_RANGE = (0.5 / 255, 30 / 255)
HQS_BETA_RANGE = (1e3, 1e6)
HQS_GRID = 256  # the crops' side: the M-step's grid at the evaluation's 256×256 crops
HQS_VAL_NOISE = (5, 10, 20)  # /255, validation rows (β = 1e5, Gaussian start)


def kernel_seed_start(run_seed: int, step: int, batch: int) -> int:
    """First kernel seed of training batch ``step``; the whole batch lies in ``TRAIN_SEEDS``."""
    if not 0 <= run_seed <= MAX_RUN_SEED:
        raise ValueError(f"run seed must be in [0, {MAX_RUN_SEED}], got {run_seed}")
    if step < 0 or (step + 1) * batch > RUN_STRIDE:
        raise ValueError(f"step {step} × batch {batch} leaves the run's seed block")
    start = TRAIN_SEEDS.start + run_seed * RUN_STRIDE + step * batch
    check_seed_range(start, batch, "train")
    return start


def architecture(size: int) -> dict:
    """The reference DnCNN (5 × 32) for the 33 model; a small U-Net for the 64 model (receptive
    field ≥ 64 px)."""
    if bundled_size(size) == 33:
        return {"arch": "dncnn", "width": 32, "depth": 5, "sigma_data": 0.03}
    return {"arch": "unet", "width": 16, "levels": 3, "sigma_data": 0.02}


def project(k: torch.Tensor) -> torch.Tensor:
    """Clamp ≥ 0 and renormalise each ``[B, 1, K, K]`` kernel to sum 1 (the HQS projection)."""
    k = k.clamp_min(0)
    return k / k.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def coloured_noise(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance noise ``[B, 1, K, K]`` smoothed by a Gaussian of width ~U[0.5, 1.5] px."""
    b = shape[0]
    white = torch.randn(shape, generator=gen)
    width = 0.5 + torch.rand(b, generator=gen)
    x = torch.arange(-3, 4, dtype=white.dtype)
    g = torch.exp(-(x**2)[None] / (2 * width[:, None] ** 2))  # [B, 7]
    g = g / g.square().sum(dim=1, keepdim=True).sqrt()  # unit variance after the 2-D product
    w = (g[:, :, None] * g[:, None, :])[:, None]  # [B, 1, 7, 7]
    out = torch.nn.functional.conv2d(white.transpose(0, 1), w, padding=3, groups=b)
    return out.transpose(0, 1)


def corrupt(
    clean: torch.Tensor, gen: torch.Generator, sigma: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training input for ``clean: [B, 1, K, K]``; returns ``(noisy [B, 1, K, K], sigma [B])``."""
    b = clean.shape[0]
    if sigma is None:
        sigma = _log_uniform(b, *SIGMA_RANGE, gen)
    noise = torch.randn(clean.shape, generator=gen)
    coloured = torch.rand(b, generator=gen) < P_COLOURED
    noise = torch.where(coloured[:, None, None, None], coloured_noise(clean.shape, gen), noise)
    noisy = clean + sigma[:, None, None, None] * noise
    projected = torch.rand(b, generator=gen) < P_PROJECTED
    return torch.where(projected[:, None, None, None], project(noisy), noisy), sigma


@functools.cache
def energy_bank() -> torch.Tensor:
    """``Σ_c |F x_c|²`` ``[B, 256, 129]`` of the centre crops of every ``natural/train`` image at
    least 256 px on each side (the spectra the simulated Z-updates see the kernels through)."""
    spectra = []
    for f in train_files():
        image = read_image(f)[0]
        if min(image.shape[-2:]) >= HQS_GRID:
            crop = center_crop(image, HQS_GRID)
            spectra.append(torch.fft.rfft2(crop).abs().square().sum(0))
    return torch.stack(spectra)


def _log_uniform(b: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(b, generator=gen))


def hqs_inputs(clean: torch.Tensor, bank: torch.Tensor, gen: torch.Generator,
               noise: torch.Tensor | None = None, beta: torch.Tensor | None = None,
               start: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One simulated Z-update per kernel ``clean [B, 1, K, K]``; returns ``(z, σ_z [B])``.

    ``Z = (E·K + Ñ + c·K_prev) / (E + c)`` with ``E`` a train crop's energy spectrum, ``c = σ²β``
    and ``Ñ = Σ_c conj(X_c)·F n_c`` drawn directly as complex noise of variance ``σ²·N·E`` (the
    Hermitian half-plane only, as ``irfft2`` reads it); then the crop to ``K×K`` and the HQS
    projection. ``noise``, ``beta``, ``start`` (``"gaussian"``/``"true"``/``"soft"``) fix what is
    otherwise drawn per sample.
    """
    b, size = clean.shape[0], clean.shape[-1]
    grid = (HQS_GRID, HQS_GRID)
    energy = bank[torch.randint(0, bank.shape[0], (b,), generator=gen)]
    sigma = _log_uniform(b, *HQS_NOISE_RANGE, gen) if noise is None else noise.expand(b)
    beta = _log_uniform(b, *HQS_BETA_RANGE, gen) if beta is None else beta.expand(b)
    coupling = (sigma.square() * beta)[:, None, None]
    kernels = clean[:, 0]
    starts = {"gaussian": gaussian_kernel(size, size / 16).expand(b, size, size), "true": kernels,
              "soft": torch.nn.functional.conv2d(clean, gaussian_kernel(5, 1.0)[None, None],
                                                 padding=2)[:, 0]}
    pick = torch.randint(0, 3, (b,), generator=gen)
    if start is not None:
        pick = torch.full((b,), list(starts).index(start))
    previous = torch.where((pick == 0)[:, None, None], starts["gaussian"],
                           torch.where((pick == 1)[:, None, None], starts["true"], starts["soft"]))
    draw = torch.complex(torch.randn(energy.shape, generator=gen),
                         torch.randn(energy.shape, generator=gen))
    data_noise = draw * (sigma[:, None, None].square() * grid[0] * grid[1] * energy / 2).sqrt()
    cross = energy * torch.fft.rfft2(kernel_grid(kernels, grid)) + data_noise
    spectrum = z_spectrum(cross, energy + coupling, torch.fft.rfft2(kernel_grid(previous, grid)),
                          coupling)
    z = project(otf2psf(torch.fft.irfft2(spectrum, s=grid), size)[:, None])
    return z, wiener_noise_std(energy, energy + coupling, sigma, grid)


def validation_set(size: int, count: int) -> torch.Tensor:
    """``[count, 1, K, K]`` clean kernels from the first EVAL seeds."""
    check_seed_range(EVAL_SEEDS.start, count, "eval")
    return motion_kernels(count, size, seed=EVAL_SEEDS.start)[:, None]


def psnr(est: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-kernel PSNR ``[B]`` in dB, peak = the clean kernel's maximum."""
    mse = (est - clean).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(clean.amax(dim=(1, 2, 3)).square() / mse.clamp_min(1e-30))


@torch.no_grad()
def evaluate(model: KernelDenoiser, clean: torch.Tensor, sigmas: tuple[float, ...]) -> list[dict]:
    """Denoising figures per σ_d, for white-noise inputs and for projected (clamp+renorm) inputs;
    then per observation noise σ for simulated Z-updates (β = 1e5, from the Gaussian start,
    denoised at their σ_z; the row's σ_d is the mean σ_z).

    Rows: mean MSE and PSNR of the input, of the clamp+renorm baseline, of the denoiser and of the
    denoiser followed by clamp+renorm (what the M-step keeps).
    """
    model.eval()
    rows = []
    gen = torch.Generator().manual_seed(12345)
    cases = []
    for sigma in sigmas:
        noise = torch.randn(clean.shape, generator=gen)
        white = clean + sigma * noise
        cases += [(sigma, "white", white, sigma), (sigma, "projected", project(white), sigma)]
    for noise in HQS_VAL_NOISE:
        z, sigma_z = hqs_inputs(clean, energy_bank(), gen, noise=torch.tensor(noise / 255),
                                beta=torch.tensor(1e5), start="gaussian")
        cases.append((float(sigma_z.mean()), f"HQS σ={noise}/255", z, sigma_z))
    for label, regime, noisy, sigma in cases:
        levels = torch.as_tensor(sigma, dtype=noisy.dtype).expand(noisy.shape[0])
        out = torch.cat([model(c, s, check=False)
                         for c, s in zip(noisy.split(256), levels.split(256), strict=True)])
        row: dict = {"sigma_d": label, "input": regime}
        for name, est in (("noisy", noisy), ("clamp_renorm", project(noisy)),
                          ("denoiser", out), ("denoiser_projected", project(out))):
            row[f"mse_{name}"] = (est - clean).square().mean().item()
            row[f"psnr_{name}"] = psnr(est, clean).mean().item()
        rows.append(row)
    model.train()
    return rows


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 1e-2 * lr + 0.99 * lr * 0.5 * (1 + math.cos(math.pi * t))


def train(args: argparse.Namespace, steps: int, log: list[dict] | None, deadline: float) -> tuple:
    """Train for ``steps`` steps (or until ``deadline``); returns ``(model, steps_done)``."""
    torch.manual_seed(args.seed)
    model = KernelDenoiser(**architecture(args.size))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    val = validation_set(args.size, 128) if log is not None else None
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        if time.perf_counter() > deadline:
            print(f"hard stop at step {step}: wall budget spent", flush=True)
            return model, step
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        start = kernel_seed_start(args.seed, step, args.batch)
        clean = motion_kernels(args.batch, args.size, seed=start)[:, None]
        split = round(P_HQS * args.batch)
        z, sigma_z = hqs_inputs(clean[:split], energy_bank(), gen)
        generic, sigma_g = corrupt(clean[split:], gen)
        noisy, sigma = torch.cat((z, generic)), torch.cat((sigma_z, sigma_g))
        out = model(noisy, sigma, check=False)
        # Each sample's error relative to its input's error: identity scores 1 whatever the noise
        # level or regime, so neither tiny-σ_d nor projected samples swamp the batch. Half the
        # weight goes to the projected output, which is what the M-step keeps.
        ref = (noisy - clean).square().mean(dim=(1, 2, 3)).clamp_min(1e-20)
        err = (out - clean).square().mean(dim=(1, 2, 3)) / ref
        err = 0.5 * err + 0.5 * (project(out) - clean).square().mean(dim=(1, 2, 3)) / ref
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if log is not None and ((step + 1) % args.log_every == 0 or step + 1 == steps):
            rows = evaluate(model, val, (1e-3, 1e-2, 1e-1))
            entry = {
                "step": step + 1,
                "wall_s": round(time.perf_counter() - t0, 1),
                "lr": opt.param_groups[0]["lr"],
                "train_loss": running / args.log_every,
                "val_psnr": {f"{r['input']}@{r['sigma_d']:g}": round(r["psnr_denoiser"], 2)
                             for r in rows},
            }
            running = 0.0
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return model, steps


def probe_steps(args: argparse.Namespace, budget_s: float) -> int:
    """Number of steps that fit ``budget_s``, timed on a throw-away copy of the run."""
    probe = copy.copy(args)
    n = 12
    train(probe, 3, None, math.inf)  # untimed warm-up: allocator, oneDNN primitive caches
    t0 = time.perf_counter()
    train(probe, 3, None, math.inf)
    t1 = time.perf_counter()
    train(probe, 3 + n, None, math.inf)
    # The difference of two runs cancels the per-run set-up (model, optimiser, first batch).
    per_step = ((time.perf_counter() - t1) - (t1 - t0)) / n
    # Margin for validation every log_every steps and for the other users of a shared CPU.
    per_step = max(per_step, 1e-3) * 1.3
    return max(50, int(budget_s / per_step))


CARD = """\
# kernel_denoiser_{size}.safetensors

Plug-and-play blur-kernel denoiser for {size}×{size} kernels (`fastem_ext.models.kernel_denoiser`,
`load_kernel_denoiser`), EDM-style preconditioned; the output is not clamped.

- Architecture: `{arch}`, {params} parameters, float32.
- Data: `fastem_ext.motion.motion_kernels({batch}, {size}, seed=s)` with s from TRAIN_SEEDS only
  (run seed {seed}: kernel seeds {first_seed} … {last_seed}); {kernels_seen} kernels, each seen
  once.
- Inputs, half of each batch: σ_d log-uniform in [{sig_lo:g}, {sig_hi:g}]; white Gaussian, or
  (p = {p_col}) Gaussian-smoothed noise of the same std; then (p = {p_proj}) clamp ≥ 0 and
  renormalise to sum 1 (the HQS projection).
- Inputs, the other half: simulated HQS Z-updates (Eq. 24) through the power spectra of the
  {bank} `natural/train` centre crops of 256×256 (observation noise σ log-uniform in
  [0.5, 30]/255, β log-uniform in [1e3, 1e6], previous kernel the Gaussian start, the true or a
  softened kernel), projected, conditioned on their σ_z (`fastem_ext.mstep.wiener_noise_std`).
- Loss: per sample, ½ (MSE(D) + MSE(clamp+renorm of D)) / MSE(input), i.e. relative to the input's
  error; Adam, lr {lr:g}, {warmup} warm-up steps, cosine decay to 1 %; {steps} steps of batch
  {batch}; grad-norm clip 1.
- Hardware: {hardware}. Wall time {wall_min:.1f} min (training {train_min:.1f} min).
- Reproduce: `python python/train_kernel_denoiser.py --size {size} --seed {seed} --steps {planned}
  --batch {batch} --out fastem_ext/weights/`{early}

## Validation ({val_count} kernels from EVAL seeds {val_first} … {val_last})

Mean MSE per pixel and mean PSNR (dB, peak = the clean kernel's maximum). `white`: clean +
σ_d·N(0, 1). `projected`: the same, then clamp ≥ 0 and renormalise. `HQS σ=…`: one simulated
Z-update at that observation noise (β = 1e5, Gaussian start), denoised at its σ_z (the σ_d
column: their mean) — what the M-step hands the denoiser.
Baseline: clamp ≥ 0 + renormalise of the input. `D`: the denoiser. `D+proj`: the denoiser, then
clamp ≥ 0 + renormalise (what the M-step keeps).

| σ_d | input | MSE input | MSE baseline | MSE D | MSE D+proj | PSNR input | PSNR baseline \
| PSNR D | PSNR D+proj |
|---|---|---|---|---|---|---|---|---|---|
{table}

Training log (loss, validation PSNR every {log_every} steps): `kernel_denoiser_{size}.json`.
"""


def model_card(args: argparse.Namespace, info: dict, rows: list[dict]) -> str:
    """Markdown model card from the run's settings and the final validation table."""
    table = "\n".join(
        f"| {r['sigma_d']:.3g} | {r['input']} | {r['mse_noisy']:.3g} | {r['mse_clamp_renorm']:.3g} "
        f"| {r['mse_denoiser']:.3g} | {r['mse_denoiser_projected']:.3g} | {r['psnr_noisy']:.1f} "
        f"| {r['psnr_clamp_renorm']:.1f} | {r['psnr_denoiser']:.1f} "
        f"| {r['psnr_denoiser_projected']:.1f} |"
        for r in rows
    )
    early = ""
    if info["steps"] < info.get("planned_steps", info["steps"]):
        early = (f"\n- **Stopped early** at step {info['steps']} of {info['planned_steps']} "
                 "(wall limit): the weights are not exactly reproducible.")
    return CARD.format(
        size=args.size, arch=json.dumps(architecture(args.size)), params=info["params"],
        batch=args.batch, seed=args.seed, first_seed=info["first_seed"],
        last_seed=info["last_seed"], kernels_seen=info["kernels_seen"], sig_lo=SIGMA_RANGE[0],
        sig_hi=SIGMA_RANGE[1], p_col=P_COLOURED, p_proj=P_PROJECTED, lr=args.lr,
        bank=energy_bank().shape[0],
        warmup=args.warmup, steps=info["steps"], hardware=info["hardware"],
        wall_min=info["wall_s"] / 60, train_min=info["train_s"] / 60,
        val_count=info["val_count"], val_first=EVAL_SEEDS.start,
        val_last=EVAL_SEEDS.start + info["val_count"] - 1, table=table, log_every=args.log_every,
        planned=info.get("planned_steps", info["steps"]), early=early,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="training budget (wall)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="hard wall limit of the run")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (reproducible)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (≤ 48 px) or 32")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-count", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("fastem_ext/weights"))
    p.add_argument("--card-from", type=Path, default=None,
                   help="only re-render the model card from this run's JSON log")
    args = p.parse_args(argv)
    if args.card_from is not None:
        saved = json.loads(args.card_from.read_text())
        info = saved["info"]
        run = argparse.Namespace(**{**vars(args), **{k: info[k] for k in
                                    ("size", "seed", "batch", "lr", "warmup")}})
        run.log_every = info.get("log_every", 100)
        args.card_from.with_suffix(".md").write_text(model_card(run, info, saved["validation"]))
        return
    if args.size is None:
        p.error("--size is required")
    if args.batch is None:
        args.batch = 64 if args.size <= 48 else 32
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    budget = args.minutes * 60
    steps = args.steps if args.steps is not None else probe_steps(args, budget)
    print(f"size {args.size} seed {args.seed}: {steps} steps of batch {args.batch}", flush=True)
    log: list[dict] = []
    t_train = time.perf_counter()
    model, done = train(args, steps, log, t_start + (args.max_minutes - 3) * 60)
    train_s = time.perf_counter() - t_train
    rows = evaluate(model, validation_set(args.size, args.val_count), VAL_SIGMAS)
    info = {
        "size": args.size, "seed": args.seed, "steps": done, "planned_steps": steps,
        "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "log_every": args.log_every,
        "params": sum(t.numel() for t in model.parameters()),
        "first_seed": kernel_seed_start(args.seed, 0, args.batch),
        "last_seed": kernel_seed_start(args.seed, max(done - 1, 0), args.batch) + args.batch - 1,
        "kernels_seen": done * args.batch, "val_count": args.val_count,
        "hardware": describe_device("cpu"), "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1), "architecture": architecture(args.size),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_denoiser_{args.size}"
    save_kernel_denoiser(model, stem.with_suffix(".safetensors"),
                         {"steps": str(done), "seed": str(args.seed)})
    stem.with_suffix(".json").write_text(
        json.dumps({"info": info, "log": log, "validation": rows}, indent=1)
    )
    stem.with_suffix(".md").write_text(model_card(args, info, rows))
    print(json.dumps(info), flush=True)
    for r in rows:
        print(f"σ_d {r['sigma_d']:<7g} {r['input']:<9} PSNR in {r['psnr_noisy']:.1f} "
              f"base {r['psnr_clamp_renorm']:.1f} D {r['psnr_denoiser']:.1f} "
              f"D+proj {r['psnr_denoiser_projected']:.1f}", flush=True)


if __name__ == "__main__":
    main()
