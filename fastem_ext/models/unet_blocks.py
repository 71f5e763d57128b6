"""Building blocks of the guided-diffusion UNet (Dhariwal & Nichol 2021), re-implemented.

Module and attribute names (``in_layers``, ``emb_layers``, ``qkv``, ``op``, ``conv`` …) follow
guided-diffusion so that its checkpoints load with ``strict=True``; the numerics follow it too
(float32 GroupNorm, legacy head-major attention layout, scale-shift norm). Everything here is
graph-safe: no host synchronisation and no tensor creation on the host inside ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_PERIOD = 10000.0

# ``fused(x, weight, bias, scale, shift, groups, eps) = SiLU(GN(x)·(1+scale) + shift)``, the
# signature of ``ops.group_norm_silu``: the engine installs it (``UNet.fuse_norms``); the models
# never import ops (they sit below them).
FusedNormSiLU = Callable[..., Tensor]


def _frequencies(half: int, device: torch.device | None = None) -> Tensor:
    """``exp(-ln(10000) * i / half)`` for ``i < half``, in float32 exactly as guided-diffusion."""
    i = torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(-math.log(MAX_PERIOD) * i / half)


def timestep_embedding(t: Tensor, dim: int, freqs: Tensor | None = None) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` (zero-padded when ``dim`` is odd).

    t: ``[B]`` timesteps (integer or float), dim: embedding width, freqs: optional ``[dim // 2]``
    float32 table (avoids rebuilding it per call). Returns ``[B, dim]`` float32.
    """
    half = dim // 2
    if freqs is None:
        freqs = _frequencies(half, t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """Holds the frequency table as a non-persistent float32 buffer for ``timestep_embedding``.

    ``model.half()`` / ``.to(bfloat16)`` would round the table and wreck ``t * f`` for t near 1000
    (phase errors of several radians), and ``to_empty()`` (meta-device construction) would leave
    it uninitialised, so ``_apply`` rebuilds it in float32 on the new device after any move/cast.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("freqs", _frequencies(dim // 2), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self.freqs = _frequencies(self.dim // 2, self.freqs.device)
        return self

    def forward(self, t: Tensor) -> Tensor:
        """t: ``[B]`` -> ``[B, dim]`` float32."""
        return timestep_embedding(t, self.dim, self.freqs)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 and cast back: fp16 statistics overflow/underflow."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, ...]`` any float dtype -> same shape and dtype."""
        y = F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        )
        return y.to(x.dtype)


def norm_silu(norm: nn.GroupNorm, x: Tensor, fused: FusedNormSiLU | None = None,
              scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """``SiLU(norm(x)·(1+scale) + shift)`` (scale, shift ``[B, C, 1, 1]`` or ``None``): by the
    modules' own operations, or by ``fused`` where one is installed."""
    if fused is not None:
        return fused(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches start as the identity (guided-diffusion init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest ×2 upsampling, followed by a 3×3 conv when ``use_conv`` (weight name ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, H, W]`` -> ``[B, C', 2H, 2W]``."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """×2 downsampling: strided 3×3 conv when ``use_conv`` (weight name ``op``), else avg-pool."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("avg-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, H, W]`` -> ``[B, C', H/2, W/2]``."""
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down).

    in_layers = [norm, SiLU, conv3x3]; emb_layers = [SiLU, Linear(emb, 2C' or C')];
    out_layers = [norm, SiLU, Dropout, conv3x3 (zero init)]; skip = identity or 1×1 conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.fused: FusedNormSiLU | None = None  # UNet.fuse_norms
        # in_layers[1] and out_layers[1] (SiLU) never run (norm_silu applies the activation); they
        # are kept only so that the checkpoints' indices (in_layers.2, out_layers.3) line up.
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        # Parameter-free resamplers applied to both paths (guided-diffusion's resblock_updown).
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: ``[B, C, H, W]``, emb: ``[B, E]`` -> ``[B, C', H', W']`` (H' = 2H, H/2 or H)."""
        h = norm_silu(self.in_layers[0], x, self.fused)
        if self.updown:
            # Resample after norm+SiLU and before the conv, as guided-diffusion does.
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_silu(self.out_layers[0], h, self.fused, scale, shift)
        else:
            h = norm_silu(self.out_layers[0], h + emb_out, self.fused)
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, heads: int, legacy: bool) -> Tensor:
    """Multi-head self-attention on a fused ``qkv: [B, 3 * heads * ch, T]`` -> ``[B, heads*ch, T]``.

    legacy=True (QKVAttentionLegacy, what the FFHQ/ImageNet checkpoints use): channels are laid out
    head-major, ``[heads, (q, k, v), ch]``. legacy=False: ``[(q, k, v), heads, ch]``. Logits are
    scaled by 1/sqrt(ch), identical to guided-diffusion's ch^-1/4 on both q and k; the fused
    SDPA kernel keeps the softmax in float32 accumulators like its ``.float()`` softmax.
    """
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    # SDPA wants [batch, tokens, ch]; transposes are views, SDPA accepts the strides.
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return a.transpose(1, 2).reshape(b, heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: ``x + proj_out(attn(qkv(norm(x))))``.

    ``num_head_channels != -1`` overrides ``num_heads`` (heads = channels // num_head_channels).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} is not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {self.num_heads}")
        self.legacy = not use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, H, W]`` -> same shape."""
        b, c, height, width = x.shape
        x = x.reshape(b, c, height * width)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy)
        return (x + self.proj_out(h)).reshape(b, c, height, width)


class TimestepSequential(nn.Sequential):
    """``nn.Sequential`` that feeds the timestep embedding to the ResBlocks it contains."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        """x: ``[B, C, H, W]``, emb: ``[B, E]``."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x
