"""group_norm_silu (the UNet's GroupNorm + scale-shift + SiLU) and its input-VJP against the
reference; the UNet with the fused norms against the plain one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from ops_helpers import NO_EXT, assert_float64_rule, generator, randn, registered_op
from torch import Tensor

from fastem_ext import ops
from fastem_ext.models.unet import UNet
from fastem_ext.models.unet_blocks import GroupNorm32, ResBlock
from fastem_ext.ops.group_norm_silu import (
    _backward_reference,
    _forward_reference,
    _GroupNormSiLU,
)

GROUPS = 32
# (C, H, W): one channel per group, 3 and 2 per group (groups of 189 elements: under one Triton
# block; of 1296: over one), odd and non-square grids.
SHAPES = [(32, 8, 8), (96, 9, 7), (64, 24, 27), (160, 5, 11)]
REDUCED = [torch.bfloat16, torch.float16]


def _reference(x, weight, bias, scale, shift):
    """GroupNorm32 then the ResBlock's scale-shift and SiLU, written out (float64 stays float64:
    the oracle)."""
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = F.group_norm(x.to(stats), GROUPS, weight.to(stats), bias.to(stats), 1e-5).to(x.dtype)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def _vjp_reference(x, weight, bias, scale, shift, v):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(_reference(x, weight, bias, scale, shift), x, v)[0]


def _inputs(n, shape, affine, device, dtype=torch.float32):
    """x with a per-group offset (the statistics matter), γ, β near 1 and 0, scale and shift."""
    g = generator(n, *shape, affine, str(dtype))
    c = shape[0]
    x = randn((n, *shape), g, device) + randn((n, GROUPS, 1, 1, 1), g, device).repeat_interleave(
        c // GROUPS, 1).reshape(n, c, 1, 1)
    weight = 1 + 0.3 * randn((c,), g, device)
    bias = 0.3 * randn((c,), g, device)
    scale = shift = None
    if affine:
        scale, shift = 0.5 * randn((n, c), g, device), 0.5 * randn((n, c), g, device)
        scale, shift = scale.to(dtype), shift.to(dtype)
    return x.to(dtype), weight, bias, scale, shift, randn((n, *shape), g, device).to(dtype)


def _skip_interpreted_reduced(device, dtype):
    if dtype != torch.float32 and os.environ["FASTEM_BACKEND"] == "triton" and device.type == "cpu":
        pytest.skip("Triton's interpreter does not compute bfloat16/float16 correctly (STYLE.md)")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("affine", [True, False], ids=["scale-shift", "plain"])
def test_forward_and_input_vjp(op_backend, shape, n, affine):
    x, weight, bias, scale, shift, v = _inputs(n, shape, affine, op_backend)
    xg = x.clone().requires_grad_(True)
    out = ops.group_norm_silu(xg, weight, bias, scale, shift)
    assert_float64_rule(out, _reference, (x, weight, bias, scale, shift))
    (grad,) = torch.autograd.grad(out, xg, v)
    assert_float64_rule(grad, _vjp_reference, (x, weight, bias, scale, shift, v))


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_reduced_precision(fused_backend, shape, dtype):
    """bfloat16/float16 x: the kernels round once, the modules after every op; both against
    float64 (the rule's float32 reference is then the modules run in that dtype)."""
    _skip_interpreted_reduced(fused_backend, dtype)
    x, weight, bias, scale, shift, v = _inputs(2, shape, True, fused_backend, dtype)
    xg = x.clone().requires_grad_(True)
    out = ops.group_norm_silu(xg, weight, bias, scale, shift)
    assert_float64_rule(out, _reference, (x, weight, bias, scale, shift))
    (grad,) = torch.autograd.grad(out, xg, v)
    assert grad.dtype == dtype
    assert_float64_rule(grad, _vjp_reference, (x, weight, bias, scale, shift, v))


def _ulp(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` at each value of ``t`` (float32 ``[...]``), subnormals included."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(t.float().abs())[1]  # |t| in [2^(e-1), 2^e)
    spacing = torch.ldexp(torch.full(t.shape, info.eps, device=t.device), exponent - 1)
    return torch.clamp(spacing, min=info.tiny * info.eps)


def _rounded_reference(x, weight, bias, scale, shift, v):
    """The op's output and input-VJP by the module's reference in float32 on the same (already
    rounded) inputs, rounded once to x's dtype."""
    xf, sf, tf, vf = (t.float() for t in (x, scale, shift, v))
    y, mean, rstd = _forward_reference(xf, weight, bias, sf, tf, GROUPS, 1e-5)
    grad = _backward_reference(vf, xf, mean, rstd, weight, bias, sf, tf, GROUPS)
    return y.to(x.dtype), grad.to(x.dtype)


# Groups large enough for the CUDA kernel to split each over several blocks (two channels of
# 201×183 = 73,566 values: 4 chunks of 18,392 on a card of 16 or more SMs, the last one
# shorter): the chunks' partial statistics and gradient sums must combine to the whole group's.
LARGE_GROUPS = [pytest.param(("cpp", "cpu"), torch.float32, id="cpp-cpu-fp32"),
                pytest.param(("cpp", "cpu"), torch.bfloat16, id="cpp-cpu-bf16"),
                pytest.param(("cpp", "cuda"), torch.float32, id="cpp-cuda-fp32",
                             marks=pytest.mark.cuda),
                pytest.param(("cpp", "cuda"), torch.bfloat16, id="cpp-cuda-bf16",
                             marks=pytest.mark.cuda)]


@pytest.mark.parametrize("fused_backend, dtype", LARGE_GROUPS, indirect=["fused_backend"])
def test_large_groups(fused_backend, dtype):
    """float32 against float64; bfloat16 within one ulp of the float32 reference rounded once
    (plus a floor for the VJP's cancellations).
    x ramps down the rows, so the chunks' means differ: a wrong combination of the chunks'
    statistics or sums shows."""
    x, weight, bias, scale, shift, v = _inputs(1, (64, 201, 183), True, fused_backend)
    ramp = torch.linspace(-2.0, 4.0, 201, device=x.device)[:, None]
    x = (x + ramp).to(dtype)
    xg = x.clone().requires_grad_(True)
    out = ops.group_norm_silu(xg, weight, bias, scale.to(dtype), shift.to(dtype))
    (grad,) = torch.autograd.grad(out, xg, v.to(dtype))
    if dtype == torch.float32:
        args = (x.double(), weight.double(), bias.double(), scale.double(), shift.double())
        want, want_grad = _reference(*args), _vjp_reference(*args, v.double())
        for got, ref in ((out, want), (grad, want_grad)):
            assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        return
    rounded = _rounded_reference(x, weight, bias, scale.to(dtype), shift.to(dtype), v.to(dtype))
    for got, ref in zip((out, grad), rounded, strict=True):
        # Rounded once, except where the VJP's float32 terms cancel to values whose bf16 ulp is
        # under float32's rounding of g ≈ 1 (an absolute floor; a wrong combination is far off).
        err = (got.float() - ref.float()).abs()
        bound = _ulp(ref, dtype) + 2e-6 * ref.float().abs().max()
        assert (err <= bound).all(), (err / bound).max()


# (backend, dtype) pairs computed correctly on a CPU: Triton's interpreter runs float16 (not
# bfloat16: STYLE.md); the C++ kernels run both.
ROUNDED_ONCE = [pytest.param(("cpp", "cpu"), torch.bfloat16, id="cpp-cpu-bf16"),
                pytest.param(("cpp", "cpu"), torch.float16, id="cpp-cpu-fp16"),
                pytest.param(("triton", "cpu"), torch.float16, id="triton-cpu-fp16"),
                pytest.param(("cpp", "cuda"), torch.bfloat16, id="cpp-cuda-bf16",
                             marks=pytest.mark.cuda),
                pytest.param(("triton", "cuda"), torch.bfloat16, id="triton-cuda-bf16",
                             marks=pytest.mark.cuda)]


@pytest.mark.parametrize("fused_backend, dtype", ROUNDED_ONCE, indirect=["fused_backend"])
def test_reduced_precision_rounds_once(fused_backend, dtype):
    """In bfloat16/float16 the kernels compute everything (1 + scale included) in float32 and
    round once: the output and the input-VJP are within one ulp of the dtype of the float32
    reference rounded to it, elementwise."""
    x, weight, bias, scale, shift, v = _inputs(2, (96, 9, 7), True, fused_backend, dtype)
    xg = x.clone().requires_grad_(True)
    out = ops.group_norm_silu(xg, weight, bias, scale, shift)
    (grad,) = torch.autograd.grad(out, xg, v)
    rounded = _rounded_reference(x, weight, bias, scale, shift, v)
    for got, want in zip((out, grad), rounded, strict=True):
        assert got.dtype == dtype
        err = (got.float() - want.float()).abs()
        assert (err <= _ulp(want, dtype)).all(), (err / _ulp(want, dtype)).max()


def test_reference_is_the_modules(monkeypatch):
    """The reference backend computes exactly what GroupNorm32 and the ResBlock compute."""
    monkeypatch.setenv("FASTEM_BACKEND", "reference")
    for dtype in (torch.float32, torch.bfloat16):
        x, weight, bias, scale, shift, _ = _inputs(2, (64, 6, 5), True, torch.device("cpu"),
                                                   dtype)
        norm = GroupNorm32(64)
        with torch.no_grad():
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
        modules = F.silu(norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        assert torch.equal(ops.group_norm_silu(x, weight, bias, scale, shift), modules)
        assert torch.equal(ops.group_norm_silu(x, weight, bias), F.silu(norm(x)))


@pytest.mark.parametrize("affine", [True, False], ids=["scale-shift", "plain"])
def test_gradcheck_float64(affine):
    """float64 runs the reference: the fused path's backward formula (x only, the autograd
    Function), and torch's autograd of the reference for every input."""
    x, weight, bias, scale, shift, _ = (
        t if t is None else t.double() for t in _inputs(2, (64, 3, 5), affine, torch.device("cpu")))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.group_norm_silu(z, weight, bias, scale, shift),
                                    (x,))
    params = [t.requires_grad_(True) for t in (weight, bias, scale, shift) if t is not None]
    assert torch.autograd.gradcheck(
        lambda z, *p: ops.group_norm_silu(z, *p, *([None, None] if not affine else [])),
        (x, *params))


def test_parameter_gradients_run_the_reference(fused_backend):
    """A gradient of γ, β, scale or shift is the reference's; the fused autograd refuses one."""
    x, weight, bias, scale, shift, v = _inputs(2, (64, 5, 6), True, fused_backend)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, scale, shift)]
    grads = torch.autograd.grad(ops.group_norm_silu(*leaves), leaves, v)
    expected = torch.autograd.grad(_reference(*leaves), leaves, v)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = _GroupNormSiLU.apply(leaves[0], leaves[1], bias, scale, shift, GROUPS, 1e-5,
                               os.environ["FASTEM_BACKEND"])
    with pytest.raises(RuntimeError, match="differentiates x only"):
        torch.autograd.grad(out, leaves[:2], v)


def test_rejects_bad_inputs(fused_backend):
    x, weight, bias, scale, shift, _ = _inputs(2, (64, 5, 6), True, fused_backend)
    with pytest.raises(ValueError, match="multiple of groups"):
        ops.group_norm_silu(x[:, :48], weight[:48], bias[:48], groups=GROUPS)
    with pytest.raises(ValueError, match="together"):
        ops.group_norm_silu(x, weight, bias, scale, None)
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm_silu(x, weight[:32], bias)
    with pytest.raises(ValueError, match="scale"):
        ops.group_norm_silu(x, weight, bias, scale[:1], shift)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ops.group_norm_silu(x[0], weight, bias)
    with pytest.raises((ValueError, RuntimeError), match="scale must be"):
        ops.group_norm_silu(x, weight, bias, scale.double(), shift)
    for wrong in (scale.reshape(-1), scale.T.contiguous(), scale[..., None]):  # N·C elements
        with pytest.raises(ValueError, match="scale must be"):
            ops.group_norm_silu(x, weight, bias, wrong, shift)


def test_nan_stays_in_its_group(fused_backend):
    """A NaN in x makes its (sample, group) NaN and leaves the other groups finite (the C++
    exp clamps a NaN rather than convert it to int)."""
    x, weight, bias, scale, shift, v = _inputs(2, (64, 5, 6), True, fused_backend)
    x[1, 2, 3, 4] = float("nan")  # group 1 of sample 1 (2 channels per group)
    xg = x.clone().requires_grad_(True)
    out = ops.group_norm_silu(xg, weight, bias, scale, shift)
    (grad,) = torch.autograd.grad(out, xg, v)
    for t in (out, grad):
        nan = t.isnan().reshape(2, GROUPS, -1)
        assert nan[1, 1].all() and nan.sum() == nan[1, 1].numel()


def test_double_backward_is_refused(op_backend):
    """The fused backward is not differentiable again: a second derivative raises instead of
    coming out wrong."""
    x, weight, bias, _, _, v = _inputs(2, (64, 5, 6), False, op_backend)
    xg, vg = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ops.group_norm_silu(xg, weight, bias), xg, vg,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_opcheck(fused_backend):
    backend = os.environ["FASTEM_BACKEND"]
    forward = registered_op("group_norm_silu", backend)
    backward = registered_op("group_norm_silu_backward", backend)
    for affine in (True, False):
        x, weight, bias, scale, shift, v = _inputs(2, (64, 5, 3), affine, fused_backend)
        torch.library.opcheck(forward, (x, weight, bias, scale, shift, GROUPS, 1e-5))
        _, mean, rstd = forward(x, weight, bias, scale, shift, GROUPS, 1e-5)
        torch.library.opcheck(backward, (v, x, mean, rstd, weight, bias, scale, shift, GROUPS))


TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "16", "num_head_channels": 16, "learn_sigma": True}


@pytest.mark.skipif(NO_EXT, reason="FASTEM_NO_EXT is set: no C++ extension")
@pytest.mark.parametrize("scale_shift, updown", [(True, True), (False, False)])
def test_unet_with_fused_norms_matches_the_plain_unet(monkeypatch, scale_shift, updown):
    """fp32 on the C++ CPU op: the output and the input-VJP of a random UNet agree with the
    plain modules' to rounding, and switching back restores the plain path exactly."""
    monkeypatch.setenv("FASTEM_BACKEND", "cpp")
    model = UNet.from_config(**TINY, use_scale_shift_norm=scale_shift, resblock_updown=updown)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, generator=g, requires_grad=True)
    t, v = torch.tensor([10, 700]), torch.randn(2, 6, 32, 32, generator=g)

    def forward_and_vjp():
        out = model(x, t)
        return out, torch.autograd.grad(out, x, v)[0]

    plain = forward_and_vjp()
    model.fuse_norms(ops.group_norm_silu)
    calls = []
    monkeypatch.setattr(torch.ops.fastem, "group_norm_silu_backward",
                        _counting(torch.ops.fastem.group_norm_silu_backward, calls))
    fused = forward_and_vjp()
    blocks = sum(isinstance(m, ResBlock) for m in model.modules())
    assert len(calls) == 2 * blocks + 1  # two norms per ResBlock and the output head's
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(got, want)  # the fused kernels did run
    model.fuse_norms(None)
    assert all(torch.equal(a, b) for a, b in zip(forward_and_vjp(), plain, strict=True))


def _counting(op, calls):
    def counted(*args):
        calls.append(1)
        return op(*args)

    return counted

