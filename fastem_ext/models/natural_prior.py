"""The bundled natural-image diffusion prior: a compact guided-diffusion UNet behind a 2× pixel
(un)shuffle on the linear 1000-step DDPM schedule, exposed as ``ε(x_t, t)`` (the samplers'
contract).

Why v-prediction. The network predicts ``v = √ᾱ ε − √(1−ᾱ) x0`` (Salimans & Ho, 2022), a target of
unit variance at every t, and the module returns ``ε̂ = √ᾱ v̂ + √(1−ᾱ) x_t``. The samplers' Tweedie
estimate is then ``x̂0 = √ᾱ x_t − √(1−ᾱ) v̂``: the network's error reaches x̂0 multiplied by
``√(1−ᾱ) ≤ 1``. With ε-prediction it is divided by ``√ᾱ`` (0.02 at t = 900, 0.006 at t = 999), so
at high noise x̂0 was mostly saturated and the early M-steps of blind deblurring saw garbage. A
network that outputs zeros gives ``x̂0 = √ᾱ x_t``, bounded at every t. Files written before this
change carry no ``prediction`` tag and load as ε-prediction.

Why the pixel unshuffle. The project's ``UNet`` normalises with ``GroupNorm(32, C)``, so its first
level carries at least 32 channels at the input resolution; at 256×256 that level alone costs
~11 GFLOP per forward pass: one forward + input-VJP (a ΠGDM step) of the smallest plain
configurations takes 0.34–0.51 s on both cores of the 2-core CPU target when it is idle, 0.6–1.0 s
on one core. Folding 2×2 pixels into 12 channels first (as FFDNet does) runs the whole UNet at
half resolution: ~4× fewer FLOPs for the same widths and twice the receptive field; this
configuration takes 0.22 s (2 threads) / 0.40 s (1 thread) at 256×256 with 6.9 M parameters,
phase cycling (below) included.
``python python/evaluate_prior.py --timing`` measures all the candidates; the model card lists
them. The UNet itself is unchanged; its weights are a plain ``UNet`` state dict.

Public names: ``NATURAL_PRIOR_CONFIG`` (``UNet`` constructor kwargs of the core),
``NATURAL_PRIOR_PATCH``, ``NATURAL_PRIOR_SIZE_MULTIPLE``, ``NATURAL_PRIOR_WEIGHTS`` (file name),
``PREDICTIONS``, ``NaturalPrior``, ``build_natural_prior``, ``natural_prior_path``,
``save_natural_prior``, ``load_natural_prior``, ``natural_prior_metadata``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedule import NUM_TRAIN_TIMESTEPS, linear_betas
from .unet import UNet

__all__ = [
    "NATURAL_PRIOR_CONFIG",
    "NATURAL_PRIOR_PATCH",
    "NATURAL_PRIOR_SIZE_MULTIPLE",
    "NATURAL_PRIOR_WEIGHTS",
    "PREDICTIONS",
    "NaturalPrior",
    "build_natural_prior",
    "load_natural_prior",
    "natural_prior_metadata",
    "natural_prior_path",
    "save_natural_prior",
]

NATURAL_PRIOR_PATCH = 2

# Core UNet at half resolution: 32/64/128/128 channels at 1/2, 1/4, 1/8, 1/16 of the image, two
# ResBlocks per level, attention only in the middle block (1/16 resolution), so it is convolutional
# everywhere else and works at any size multiple. 6.9 M parameters.
NATURAL_PRIOR_CONFIG: dict[str, Any] = {
    "model_channels": 32,
    "num_res_blocks": 2,
    "attention_resolutions": (),
    "in_channels": 3 * NATURAL_PRIOR_PATCH**2,
    "out_channels": 3 * NATURAL_PRIOR_PATCH**2,
    "channel_mult": (1, 2, 4, 4),
    "num_head_channels": 32,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}

_LEVELS = len(NATURAL_PRIOR_CONFIG["channel_mult"])
NATURAL_PRIOR_SIZE_MULTIPLE = NATURAL_PRIOR_PATCH * 2 ** (_LEVELS - 1)
NATURAL_PRIOR_WEIGHTS = "natural_s2c32.safetensors"
_FORMAT = "fastem-natural-prior/1"
# What the core network predicts: "v" (what the project trains) or "eps" (the first, interim files).
PREDICTIONS = ("v", "eps")


class NaturalPrior(nn.Module):
    """``ε̂ = NaturalPrior(x_t, t)``: pixel-unshuffle ×p, the core ``UNet``, pixel-shuffle ×p,
    and the conversion of its prediction (``prediction``: ``"v"`` or ``"eps"``) to ε̂.

    Same call contract as ``UNet``: x ``[B, 3, H, W]`` in the network's [-1, 1] units, t ``[B]``
    int64 original timesteps 0..999; returns ε̂ ``[B, 3, H, W]`` in x's dtype (the conversion runs
    in float32). H and W must be multiples of ``size_multiple`` (= p · 2^(levels−1)).
    ``network_output(x, t)`` is the core's raw prediction (v̂ or ε̂), what training fits.

    Phase cycling (``cycle_phase``, on by default): the network sees the image on a fixed p×p
    pixel grid, so any error that depends on a pixel's position in its p×p cell (a per-sub-pixel
    bias, say) repeats identically at every sampling step. The blur kills the Nyquist frequencies,
    so the guidance never corrects it, and over 100 steps it builds up into stripes and a
    checkerboard (measured: ΠGDM on kodak_04 with the interim weights, 24.9 dB without, 33.1 dB
    with cycling; Fast EM 15.6 → 27.2 dB). So each call shifts the image by a sub-cell offset
    (dy, dx) that a multiplicative hash of t picks (consecutive sampling steps get different
    offsets, whatever the respacing), and shifts ε̂ back: the error changes phase from step to
    step and averages out instead of adding up. The offset comes from ``t[0]`` by device
    arithmetic (no host sync, CUDA-graph safe). Rolling would wrap a row and a column around and
    cost ~0.15 dB of denoising PSNR at the seam, so the image is mirror-padded by one
    ``size_multiple`` instead (+13 % compute at 256×256, +6 % at 512×512). Training turns
    cycling off (random crops already randomise the phase).
    """

    def __init__(self, unet: UNet, patch: int, cycle_phase: bool = True,
                 prediction: str = "v") -> None:
        super().__init__()
        if unet.in_channels != 3 * patch**2 or unet.out_channels != 3 * patch**2:
            raise ValueError(f"a patch-{patch} prior needs a UNet with {3 * patch**2} in/out "
                             f"channels, got {unet.in_channels}/{unet.out_channels}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.unet = unet
        self.patch = patch
        self.cycle_phase = cycle_phase
        self.prediction = prediction
        # √ᾱ_t and √(1−ᾱ_t) of the linear schedule, float32 [T]; not part of the state dict.
        ac = torch.cumprod(1.0 - linear_betas(NUM_TRAIN_TIMESTEPS), 0)
        self.register_buffer("sqrt_ac", ac.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_ac", (1.0 - ac).sqrt().float(), persistent=False)
        self.in_channels = 3
        self.out_channels = 3
        self.size_multiple = patch * unet.size_multiple

    def _phase(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-cell offsets ``(dy, dx)`` (int64 ``[1]`` each, in ``[0, p)``) for timestep t:
        the top bits of Knuth's multiplicative hash of ``t[0]``, ``⌊frac(t·φ)·p²⌋``."""
        p = self.patch
        h = (t.reshape(-1)[:1].long() * 2654435761) % 2**32 * p**2 // 2**32
        return h // p, h % p

    def _shifted_index(self, size: int, shift: Tensor) -> Tensor:
        """Indices ``[size + m]`` (m = ``size_multiple``) that put pixel 0 at ``shift`` and
        mirror the image at both ends (no wrap-around seam)."""
        r = torch.arange(size + self.size_multiple, device=shift.device) - shift
        r = r.abs()  # mirror at the top / left
        r = torch.where(r > size - 1, 2 * (size - 1) - r, r)  # and at the bottom / right
        return r.clamp(0, size - 1)  # images smaller than m: repeat the edge

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x: ``[B, 3, H, W]``, t: ``[B]`` (or scalar) int64 -> ε̂ ``[B, 3, H, W]``."""
        out = self.network_output(x, t)
        if self.prediction == "eps":
            return out.to(x.dtype)
        index = t.reshape(-1).long().expand(x.shape[0])
        sqrt_ac = self.sqrt_ac[index][:, None, None, None]
        sqrt_one_minus_ac = self.sqrt_one_minus_ac[index][:, None, None, None]
        return (sqrt_ac * out.float() + sqrt_one_minus_ac * x.float()).to(x.dtype)

    def network_output(self, x: Tensor, t: Tensor) -> Tensor:
        """The core's prediction (v̂ or ε̂, per ``prediction``) ``[B, 3, H, W]``, phase-cycled
        when ``cycle_phase`` is on."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W], got shape {tuple(x.shape)}")
        m = self.size_multiple
        height, width = x.shape[-2:]
        if height % m or width % m:
            raise ValueError(f"H and W must be multiples of {m} for the natural prior, got "
                             f"{height}x{width}; pad the image first")
        p = self.patch
        if not self.cycle_phase:
            return F.pixel_shuffle(self.unet(F.pixel_unshuffle(x, p), t), p)
        # Mirror-pad by m (fixed shapes for CUDA graphs) with the image shifted by (dy, dx).
        dy, dx = self._phase(t)
        rows, cols = self._shifted_index(height, dy), self._shifted_index(width, dx)
        padded = x.index_select(-2, rows).index_select(-1, cols)
        out = F.pixel_shuffle(self.unet(F.pixel_unshuffle(padded, p), t), p)
        keep_rows = torch.arange(height, device=x.device) + dy
        keep_cols = torch.arange(width, device=x.device) + dx
        return out.index_select(-2, keep_rows).index_select(-1, keep_cols)


def build_natural_prior(
    config: Mapping[str, Any] | None = None, patch: int = NATURAL_PRIOR_PATCH,
    cycle_phase: bool = True, prediction: str = "v",
) -> NaturalPrior:
    """A freshly initialised prior (guided-diffusion init: the output conv is zero, so the
    network's prediction is 0: ε̂ = √(1−ᾱ) x_t for v-prediction, ε̂ = 0 for ε-prediction)."""
    unet = UNet(**dict(NATURAL_PRIOR_CONFIG if config is None else config))
    return NaturalPrior(unet, patch, cycle_phase, prediction)


def natural_prior_path() -> Path:
    """Where the bundled weights live: ``fastem_ext/weights/NATURAL_PRIOR_WEIGHTS``."""
    return Path(__file__).resolve().parent.parent / "weights" / NATURAL_PRIOR_WEIGHTS


def _config_json(config: Mapping[str, Any]) -> str:
    """Canonical JSON of a UNet config (tuples become lists), for the file's metadata."""
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                      sort_keys=True)


def save_natural_prior(
    model: NaturalPrior,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write the core UNet's state dict as safetensors in ``dtype`` (fp16 halves the file; the
    weights are O(1), far from fp16's range limits). ``metadata`` (str -> str) joins the file's
    header next to the format tag, the patch size, the UNet config and the prediction."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype).contiguous()
             for k, v in model.unet.state_dict().items()}
    header = {**dict(metadata or {}), "format": _FORMAT, "patch": str(model.patch),
              "unet_config": _config_json(NATURAL_PRIOR_CONFIG), "prediction": model.prediction}
    save_file(state, os.fspath(path), metadata=header)


def natural_prior_metadata(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The header of a weights file (the bundled one by default), checked against this
    architecture: ``FileNotFoundError`` naming the expected file when it is missing,
    ``ValueError`` when it was written for another architecture or prediction."""
    from safetensors import safe_open

    file = Path(path) if path is not None else natural_prior_path()
    if not file.is_file():
        raise FileNotFoundError(
            f"natural-prior weights not found: expected {file} (the bundled file is "
            f"fastem_ext/weights/{NATURAL_PRIOR_WEIGHTS}; python/train_prior.py writes it)"
        )
    try:
        with safe_open(os.fspath(file), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from None
    expected = {"format": _FORMAT, "patch": str(NATURAL_PRIOR_PATCH),
                "unet_config": _config_json(NATURAL_PRIOR_CONFIG)}
    wrong = [k for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        found = {k: meta.get(k) for k in wrong}
        raise ValueError(f"{file} was not written for this natural-prior architecture "
                         f"(metadata that differs, as found in the file: {found})")
    meta.setdefault("prediction", "eps")  # the first files predate the tag
    if meta["prediction"] not in PREDICTIONS:
        raise ValueError(f"{file}: unknown prediction {meta['prediction']!r} "
                         f"(expected one of {PREDICTIONS})")
    return meta


def load_natural_prior(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike[str] | None = None,
) -> NaturalPrior:
    """The bundled prior (or the file at ``path``), in eval mode with frozen parameters.

    Raises as ``natural_prior_metadata``. ``dtype`` casts the UNet's weights only: GroupNorm and
    the timestep table inside the UNet, and the √ᾱ tables of the v → ε conversion, stay float32
    (in bf16, √(1−ᾱ) rounds by up to 0.4 %, which x̂0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ would amplify).
    """
    from safetensors.torch import load_file

    meta = natural_prior_metadata(path)
    file = Path(path) if path is not None else natural_prior_path()
    model = build_natural_prior(prediction=meta["prediction"])
    model.unet.load_state_dict(load_file(os.fspath(file)), strict=True)
    model.to(device=device).eval()
    model.unet.to(dtype=dtype)
    model.requires_grad_(False)
    return model
