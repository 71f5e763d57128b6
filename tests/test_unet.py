"""Tests of the guided-diffusion-compatible UNet (fastem_ext.models.unet).

Full-size models are built on the meta device (no memory, no compute) or without initialisation;
every numerical check runs on tiny configs so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastem_ext.models.unet import (
    FFHQ_256_CONFIG,
    IMAGENET_256_UNCOND_CONFIG,
    UNet,
    load_guided_diffusion_checkpoint,
)
from fastem_ext.models.unet_blocks import (
    AttentionBlock,
    GroupNorm32,
    ResBlock,
    TimestepEmbedding,
    timestep_embedding,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared/reference/ffhq_10m_state_dict_keys.txt"
FFHQ_PARAMS = 93_563_910
# Tiny guided-diffusion config: 2 levels, attention at the lowest resolution (16 = 32 // 2).
TINY_CONFIG = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "16",
    "num_head_channels": 16,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "learn_sigma": True,
}


def _reference_shapes() -> list[tuple[str, tuple[int, ...]]]:
    if not REFERENCE.is_file():  # a missing oracle is a failure, not a pass in disguise
        pytest.fail(f"reference key list not found at {REFERENCE} (../shared/reference)")
    rows = []
    for line in REFERENCE.read_text().splitlines():
        name, shape = line.split(" ", 1)
        dims = shape.strip("[]").split(",")
        rows.append((name, tuple(int(d) for d in dims if d.strip())))
    return rows


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (zero-initialised ones included) by small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


# 1. The FFHQ-256 network matches the official checkpoint's key list exactly.
def test_ffhq_state_dict_names_order_shapes_and_count() -> None:
    with torch.device("meta"):
        model = UNet.from_config(**FFHQ_256_CONFIG)
    mine = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert mine == _reference_shapes()
    assert sum(p.numel() for p in model.parameters()) == FFHQ_PARAMS
    # num_head_channels=64 overrides num_heads=4: 512 channels -> 8 heads everywhere.
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {8}
    # Full-size forward on meta: shapes propagate, and nothing inside forward needs the host.
    x = torch.empty(3, 3, 256, 256, device="meta")
    t = torch.zeros(3, dtype=torch.long, device="meta")
    assert model(x, t).shape == (3, 6, 256, 256)


def test_imagenet_256_uncond_builds() -> None:
    with torch.device("meta"):
        model = UNet.from_config(**IMAGENET_256_UNCOND_CONFIG)
    # guided-diffusion reports ~554M for the class-conditional variant (+1000 x 1024 label_emb).
    assert sum(p.numel() for p in model.parameters()) == 552_814_086
    assert len(model.input_blocks) == 18 and len(model.output_blocks) == 18


# 2. Strict loading, readable mismatch errors, and a save/load round trip.
def test_strict_load_of_reference_shaped_dict() -> None:
    g = torch.Generator().manual_seed(1)
    sd = {name: torch.randn(shape, generator=g) for name, shape in _reference_shapes()}
    with torch.device("meta"):
        model = UNet.from_config(**FFHQ_256_CONFIG)
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.out[2].weight, sd["out.2.weight"])
    assert torch.equal(model.middle_block[1].qkv.weight, sd["middle_block.1.qkv.weight"])


def test_loader_round_trip_and_errors(tmp_path: Path) -> None:
    src = _randomize(UNet.from_config(**TINY_CONFIG))
    path = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), path)
    model = load_guided_diffusion_checkpoint(path, TINY_CONFIG)
    assert not model.training
    for (k, a), (k2, b) in zip(src.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)

    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": src.state_dict(), "step": 10}, wrapped)
    load_guided_diffusion_checkpoint(wrapped, TINY_CONFIG)

    sd = src.state_dict()
    sd["out.2.weight"] = sd["out.2.weight"][:3]
    sd["middle_block.1.qkv.bogus"] = sd.pop("middle_block.1.qkv.weight")
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError) as info:
        load_guided_diffusion_checkpoint(bad, TINY_CONFIG)
    msg = str(info.value)
    assert "1 missing from the checkpoint: middle_block.1.qkv.weight" in msg
    assert "1 unexpected in the checkpoint: middle_block.1.qkv.bogus" in msg
    assert "out.2.weight: checkpoint (3, 32, 3, 3), model (6, 32, 3, 3)" in msg

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_guided_diffusion_checkpoint(tmp_path / "nope.pt", TINY_CONFIG)


def test_from_config_key_validation() -> None:
    with pytest.raises(ValueError, match="num_chanels"):
        UNet.from_config(**{**TINY_CONFIG, "num_chanels": 64})
    # Known guided-diffusion keys that do not change the network are accepted; YAML ints too.
    model = UNet.from_config(
        **{**TINY_CONFIG, "use_checkpoint": True, "attention_resolutions": 16, "learn_sigma": False}
    )
    assert model.out_channels == 3 and isinstance(model.input_blocks[3][1], AttentionBlock)


# 3. Timestep embedding against the formula, even and odd widths.
@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_formula(dim: int) -> None:
    ts = [0, 7, 999]
    emb = timestep_embedding(torch.tensor(ts), dim)
    half = dim // 2
    expected = torch.zeros(len(ts), dim, dtype=torch.float64)
    for row, t in enumerate(ts):
        for i in range(half):
            arg = t * math.exp(-math.log(10000.0) * i / half)
            expected[row, i] = math.cos(arg)
            expected[row, half + i] = math.sin(arg)
    assert emb.shape == (len(ts), dim) and emb.dtype == torch.float32
    # float32 t * f near t = 999 carries ~1e-4 rad of rounding, as in guided-diffusion.
    torch.testing.assert_close(emb.double(), expected, atol=2e-4, rtol=0)
    module = TimestepEmbedding(dim)
    torch.testing.assert_close(module(torch.tensor(ts)), emb, atol=0, rtol=0)
    # A dtype cast of the model must not round the table.
    module.to(torch.bfloat16)
    assert module.freqs.dtype == torch.float32
    torch.testing.assert_close(module(torch.tensor(ts)), emb, atol=0, rtol=0)


# 4. Legacy (head-major) vs new qkv layout.
def _attention_reference(x: torch.Tensor, block: AttentionBlock, legacy: bool) -> torch.Tensor:
    """Per-head loops written from the definition; x: [B, C, H, W]."""
    b, c, h, w = x.shape
    heads, ch = block.num_heads, c // block.num_heads
    xf = x.reshape(b, c, h * w)
    qkv = F.conv1d(
        F.group_norm(xf, 32, block.norm.weight, block.norm.bias), block.qkv.weight, block.qkv.bias
    )
    outs = []
    for n in range(b):
        per_head = []
        for hd in range(heads):
            if legacy:  # channels = [head][q, k, v][ch]
                base = hd * 3 * ch
                q, k, v = (qkv[n, base + j * ch : base + (j + 1) * ch] for j in range(3))
            else:  # channels = [q, k, v][head][ch]
                q, k, v = (qkv[n, j * c + hd * ch : j * c + (hd + 1) * ch] for j in range(3))
            s = 1 / math.sqrt(math.sqrt(ch))
            weight = torch.softmax((q * s).T @ (k * s), dim=-1)  # [T, S]
            per_head.append(v @ weight.T)  # [ch, T]
        outs.append(torch.cat(per_head, 0))
    a = torch.stack(outs)
    out = xf + F.conv1d(a, block.proj_out.weight, block.proj_out.bias)
    return out.reshape(b, c, h, w)


def test_legacy_attention_order() -> None:
    torch.manual_seed(0)
    legacy = _randomize(AttentionBlock(64, num_heads=4, num_head_channels=32), seed=2)
    new = AttentionBlock(64, num_head_channels=32, use_new_attention_order=True)
    new.load_state_dict(legacy.state_dict())
    assert legacy.num_heads == 2
    x = torch.randn(3, 64, 3, 5)
    ref_legacy = _attention_reference(x, legacy, legacy=True)
    ref_new = _attention_reference(x, legacy, legacy=False)
    # Guard: the weights really distinguish the two layouts.
    assert (ref_legacy - ref_new).abs().max() > 1e-2
    torch.testing.assert_close(legacy(x), ref_legacy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new(x), ref_new, atol=1e-5, rtol=1e-5)


# 5. ResBlock: scale-shift norm, additive emb, and resblock_updown resampling.
@pytest.mark.parametrize(
    ("scale_shift", "mode", "cout"),
    [(True, None, 32), (False, None, 64), (True, "down", 32), (True, "up", 32)],
)
def test_resblock_by_hand(scale_shift: bool, mode: str | None, cout: int) -> None:
    block = ResBlock(32, 16, 0.0, cout, scale_shift, up=mode == "up", down=mode == "down")
    _randomize(block, seed=3)
    x, emb = torch.randn(2, 32, 6, 8), torch.randn(2, 16)
    gn_in, conv_in = block.in_layers[0], block.in_layers[2]
    gn_out, conv_out = block.out_layers[0], block.out_layers[3]
    resample = {
        None: lambda z: z,
        "down": lambda z: F.avg_pool2d(z, 2),
        "up": lambda z: F.interpolate(z, scale_factor=2, mode="nearest"),
    }[mode]
    h = F.silu(F.group_norm(x, 32, gn_in.weight, gn_in.bias))
    h = F.conv2d(resample(h), conv_in.weight, conv_in.bias, padding=1)
    e = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)[..., None, None]
    if scale_shift:
        scale, shift = e[:, :cout], e[:, cout:]
        h = F.group_norm(h, 32, gn_out.weight, gn_out.bias) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, gn_out.weight, gn_out.bias)
    h = F.conv2d(F.silu(h), conv_out.weight, conv_out.bias, padding=1)
    skip = resample(x)
    if cout != 32:
        skip = F.conv2d(skip, block.skip_connection.weight, block.skip_connection.bias)
    torch.testing.assert_close(block(x, emb), skip + h, atol=1e-5, rtol=1e-5)


# 6. Tiny full networks: shapes, finiteness, input gradients, size validation.
@pytest.mark.parametrize(("updown", "learn_sigma"), [(True, True), (False, False)])
def test_tiny_unet_forward_and_grad(updown: bool, learn_sigma: bool) -> None:
    cfg = {**TINY_CONFIG, "resblock_updown": updown, "learn_sigma": learn_sigma}
    model = _randomize(UNet.from_config(**cfg), seed=4)
    names = model.state_dict().keys()
    if not updown:  # guided-diffusion's names for the conv resamplers (after res + attention)
        assert "input_blocks.2.0.op.weight" in names and "output_blocks.1.2.conv.weight" in names
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    t = torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == (3, 6 if learn_sigma else 3, 32, 32)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # The timestep matters (guards against a dropped embedding).
    assert not torch.allclose(model(x, t.flip(0)), out)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 31, 32), t[:1])
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        model(torch.randn(2, 3, 32, 32), t)


def test_class_cond_and_fp16_torso() -> None:
    cc = UNet.from_config(**{**TINY_CONFIG, "class_cond": True})
    assert cc.label_emb.weight.shape == (1000, 128)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    assert cc(x, t, torch.tensor([7])).shape == (1, 6, 16, 16)
    with pytest.raises(ValueError, match="class"):
        cc(x, t)
    # use_fp16: torso convs in float16 (norms/linears float32), output close to the fp32 model.
    ref = _randomize(UNet.from_config(**TINY_CONFIG), seed=5)
    half = UNet.from_config(**{**TINY_CONFIG, "use_fp16": True})
    half.load_state_dict(ref.state_dict(), strict=True)
    assert half.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half.input_blocks[1][0].emb_layers[1].weight.dtype == torch.float32
    assert half.out[2].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16)
    out = half(x, torch.tensor([10, 900]))
    assert out.dtype == torch.float32
    expected = ref(x, torch.tensor([10, 900]))
    assert (out - expected).abs().max() < 2e-2 * expected.abs().max()


# 7. GroupNorm32 statistics in float32 for half-precision inputs.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groupnorm32_float32(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    norm = _randomize(GroupNorm32(64), seed=6)
    x = (300 + torch.randn(2, 64, 5, 7)).to(dtype)  # large mean: E[x^2] overflows fp16
    seen = []
    group_norm = F.group_norm

    def spy(inp: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(inp.dtype)
        return group_norm(inp, *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", spy)
    y = norm(x)
    assert seen == [torch.float32]
    assert y.dtype == dtype
    expected = group_norm(x.float(), 32, norm.weight, norm.bias).to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)


# 8. Graph safety.
def test_graph_safe_forward() -> None:
    model = UNet.from_config(**TINY_CONFIG)
    assert not any("freqs" in k for k in model.state_dict())
    assert any(k.endswith("freqs") for k, _ in model.named_buffers())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([42])
    with torch.no_grad():
        eager = model(x, t)
        # fullgraph=True fails on any graph break: .item(), .cpu(), data-dependent control flow.
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t), eager)
