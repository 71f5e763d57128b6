"""The guided-diffusion UNet (``UNetModel`` of openai/guided-diffusion), re-implemented.

Same module tree, parameter names, order and numerics as the original, so the FFHQ-256 checkpoint
``ffhq_10m.pt`` used by DPS / BlindDPS / Fast Diffusion EM and the ImageNet-256 unconditional model
load with ``strict=True``. ``forward`` is graph-safe (no host syncs, no host tensors), so the
engine can capture it in a CUDA graph or ``torch.compile`` it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .unet_blocks import (
    AttentionBlock,
    Downsample,
    FusedNormSiLU,
    GroupNorm32,
    ResBlock,
    TimestepEmbedding,
    TimestepSequential,
    Upsample,
    norm_silu,
    zero_module,
)

__all__ = [
    "FFHQ_256_CONFIG",
    "IMAGENET_256_UNCOND_CONFIG",
    "UNet",
    "load_guided_diffusion_checkpoint",
]

NUM_CLASSES = 1000

# DPS / BlindDPS ``configs/model_config.yaml`` for ffhq_10m.pt (num_res_blocks=1: the key list has
# one ResBlock per level; heads = 512 // 64 = 8 because num_head_channels overrides num_heads).
FFHQ_256_CONFIG: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 128,
    "num_res_blocks": 1,
    "channel_mult": "",
    "attention_resolutions": "16",
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "learn_sigma": True,
    "dropout": 0.0,
    "class_cond": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}

# guided-diffusion README flags for 256x256_diffusion_uncond.pt (it also says --use_fp16 True; we
# keep float32 here and leave mixed precision to the caller / engine).
IMAGENET_256_UNCOND_CONFIG: dict[str, Any] = {
    **FFHQ_256_CONFIG,
    "num_channels": 256,
    "num_res_blocks": 2,
    "attention_resolutions": "32,16,8",
}

# guided-diffusion's model_and_diffusion_defaults() for the model keys we honour.
_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "channel_mult": "",
    "attention_resolutions": "16,8",
    "num_heads": 4,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "learn_sigma": False,
    "dropout": 0.0,
    "class_cond": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}

# Known guided-diffusion / DPS config keys that do not change the network: accepted and ignored.
# (use_checkpoint only trades memory for recomputation; the rest configure the diffusion.)
_IGNORED_KEYS = frozenset(
    {
        "use_checkpoint",
        "model_path",
        "diffusion_steps",
        "noise_schedule",
        "timestep_respacing",
        "use_kl",
        "predict_xstart",
        "rescale_timesteps",
        "rescale_learned_sigmas",
    }
)

_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _parse_channel_mult(value: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """``""`` -> guided-diffusion's default for ``image_size``; ``"1,2,4"`` or a tuple as given."""
    if isinstance(value, str):
        if not value.strip():
            if image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {image_size}")
            return _DEFAULT_CHANNEL_MULT[image_size]
        return tuple(float(v) for v in value.split(","))
    return tuple(float(v) for v in value)


def _parse_attention(value: str | int | Sequence[int], image_size: int) -> tuple[int, ...]:
    """Resolutions ``"32,16,8"`` (or an int / ints, as YAML parses them) -> downsample factors."""
    if isinstance(value, str):
        resolutions = [int(v) for v in value.split(",") if v.strip()]
    elif isinstance(value, int):
        resolutions = [value]
    else:
        resolutions = [int(v) for v in value]
    return tuple(image_size // r for r in resolutions)


class UNet(nn.Module):
    """guided-diffusion ``UNetModel`` (2-D): ``eps[, variance] = UNet(x_t, t)``.

    The constructor mirrors ``UNetModel.__init__``: ``attention_resolutions`` holds *downsample
    factors* (``image_size // resolution``); ``UNet.from_config`` takes the keys of
    guided-diffusion's ``model_config.yaml`` instead. ``image_size`` is only recorded.

    Precision: ``use_fp16=True`` does what guided-diffusion's ``convert_to_fp16`` does, at
    construction: the convolutions of the torso (input, middle and output blocks) become float16,
    norms, linears, ``time_embed`` and ``out`` stay float32, and activations enter the torso in
    float16 and leave in the input's dtype. Loading a float32 state dict afterwards rounds it the
    same way. For bfloat16, keep ``use_fp16=False`` and run the model under ``torch.autocast``.
    """

    def __init__(
        self,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        *,
        image_size: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        emb_dim = 4 * model_channels
        attn_ds = set(attention_resolutions)

        def res(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, up, down)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)
        # Not a state-dict entry: a float32 frequency table kept on the model's device.
        self.t_embed = TimestepEmbedding(model_channels)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        # out[1] (SiLU) never runs (norm_silu applies it): kept only so that out.2 lines up with
        # the checkpoints.
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        self.fused: FusedNormSiLU | None = None  # fuse_norms
        if use_fp16:
            self.convert_torso(torch.float16)

    @classmethod
    def from_config(cls, **cfg: Any) -> UNet:
        """Build from guided-diffusion ``model_config.yaml`` keys (missing keys take its defaults).

        ``channel_mult``: ``""`` (default for image_size), ``"1,1,2,2,4,4"`` or a tuple;
        ``attention_resolutions``: resolutions such as ``"32,16,8"``. Known non-architectural
        guided-diffusion keys (``use_checkpoint``, ``model_path``, diffusion keys) are ignored;
        any other key raises ``ValueError``.
        """
        unknown = sorted(k for k in cfg if k not in _DEFAULTS and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown guided-diffusion config key(s): {', '.join(unknown)}")
        c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
        size = int(c["image_size"])
        return cls(
            model_channels=int(c["num_channels"]),
            num_res_blocks=int(c["num_res_blocks"]),
            attention_resolutions=_parse_attention(c["attention_resolutions"], size),
            image_size=size,
            in_channels=3,
            out_channels=6 if c["learn_sigma"] else 3,
            dropout=float(c["dropout"]),
            channel_mult=_parse_channel_mult(c["channel_mult"], size),
            num_classes=NUM_CLASSES if c["class_cond"] else None,
            use_fp16=bool(c["use_fp16"]),
            num_heads=int(c["num_heads"]),
            num_head_channels=int(c["num_head_channels"]),
            num_heads_upsample=int(c["num_heads_upsample"]),
            use_scale_shift_norm=bool(c["use_scale_shift_norm"]),
            resblock_updown=bool(c["resblock_updown"]),
            use_new_attention_order=bool(c["use_new_attention_order"]),
        )

    def convert_torso(self, dtype: torch.dtype) -> None:
        """Cast the conv weights of input/middle/output blocks (guided-diffusion's fp16 scheme)."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in blocks.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.to(dtype)

    def fuse_norms(self, fused: FusedNormSiLU | None) -> None:
        """Run every norm + (scale-shift) + SiLU of the ResBlocks and the output head by
        ``fused`` (``ops.group_norm_silu``: the fast engine's), or by the modules (``None``)."""
        self.fused = fused
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.fused = fused

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: ``[B, C_in, H, W]`` float, t: ``[B]`` (or scalar) integer timesteps in 0..999 on x's
        device, y: ``[B]`` class labels iff class-conditional. Returns ``[B, C_out, H, W]`` in x's
        dtype (C_out = 6 = [eps, variance values] with learn_sigma, else 3).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        m = self.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(
                f"H and W must be multiples of {m} (2 ** (len(channel_mult) - 1)) for this UNet, "
                f"got {x.shape[-2]}x{x.shape[-1]}; pad the image first"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got shape {tuple(t.shape)}")
        if (y is None) != (self.num_classes is None):
            raise ValueError("y (class labels) must be given iff the model is class-conditional")

        emb_in = self.t_embed(t).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb_in)
        if y is not None:
            emb = emb + self.label_emb(y)
        # Activations follow the torso's weights (float16 after convert_torso), as guided-diffusion.
        h = x.to(self.input_blocks[0][0].weight.dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        h = norm_silu(self.out[0], h.to(self.out[-1].weight.dtype), self.fused)
        return self.out[2](h).to(x.dtype)


def _mismatch_report(model: nn.Module, sd: Mapping[str, Any], limit: int = 5) -> str | None:
    """Plain-words description of how ``sd`` differs from ``model.state_dict()``, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_shape = [
        f"{k}: checkpoint {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
        f"model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and not (isinstance(v, Tensor) and v.shape == expected[k].shape)
    ]
    if not (missing or unexpected or bad_shape):
        return None
    parts = []
    for title, items in (
        ("missing from the checkpoint", missing),
        ("unexpected in the checkpoint", unexpected),
        ("shape mismatches", bad_shape),
    ):
        if items:
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


KNOWN_CONFIGS: dict[str, Mapping[str, Any]] = {
    "ffhq": FFHQ_256_CONFIG,
    "imagenet": IMAGENET_256_UNCOND_CONFIG,
}


def load_guided_diffusion_checkpoint(
    path: str | os.PathLike[str], config: Mapping[str, Any] | None = None
) -> UNet:
    """Build ``UNet.from_config(**config)`` and load a guided-diffusion ``.pt`` into it strictly.

    ``config=None`` recognises the file among ``KNOWN_CONFIGS`` by its keys and shapes. The file
    is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling). It may hold a plain
    state dict or a dict with a ``"state_dict"`` / ``"model"`` state dict. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` describing missing / unexpected
    keys and shape mismatches. Returns the model on CPU in eval mode.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    candidates = [config] if config is not None else list(KNOWN_CONFIGS.values())
    problems = []
    for candidate in candidates:
        with torch.device("meta"):
            problem = _mismatch_report(UNet.from_config(**candidate), state)
        if problem is None:
            model = UNet.from_config(**candidate)
            model.load_state_dict(state, strict=True)
            return model.eval()
        problems.append(problem)
    if config is not None:
        raise ValueError(f"{path} does not match the UNet config: {problems[0]}")
    raise ValueError(
        f"{path} is not a known guided-diffusion checkpoint ({', '.join(KNOWN_CONFIGS)}); "
        f"against the FFHQ-256 layout: {problems[0]}"
    )


def _read_state_dict(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"guided-diffusion checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types; report them uniformly
        raise ValueError(
            f"could not read {path} as a weights-only torch checkpoint "
            f"({type(err).__name__}: {str(err) or 'empty or truncated file'})"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        # A bad file is a bad value (like a mismatched key), not a wrong argument type.
        raise ValueError(  # noqa: TRY004
            f"{path} does not contain a state dict (got {type(obj).__name__})"
        )
    return obj
