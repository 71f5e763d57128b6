"""Fused op 5, the UNet's norm and activation (issue 14): ``y = SiLU(GN(x)·(1+scale) + shift)``.

``GN`` is GroupNorm with ``groups`` groups, statistics in float32 and the float32 affine ``γ, β``
(``models.unet_blocks.GroupNorm32``); ``scale, shift`` ``[N, C]`` are the ResBlock's scale-shift
norm (both or neither). The pure-torch reference computes exactly what the modules compute: the
normalised ``x`` cast back to ``x``'s dtype, then scale, shift and SiLU in that dtype. The fused
kernels compute everything in float32 from ``x`` and round once, to ``x``'s dtype (float32,
bfloat16 or float16; the reference runs any other dtype, the float64 oracles of the tests).

Gradient: the fused backward gives the input-VJP ``∂L/∂x`` only, which is what the engine needs
(the network's weights, hence ``γ, β`` and the scale-shift, need no gradient there). Where a
gradient of ``weight``, ``bias``, ``scale`` or ``shift`` is wanted, ``group_norm_silu`` runs the
reference under torch's autograd instead (correct gradients, nothing fused); the autograd of the
fused path refuses such a gradient with a RuntimeError rather than return a wrong one.

Forward ops return ``(y, mean, rstd)`` (``[N, groups]`` float32: the statistics the backward
reads); the backward op ``group_norm_silu_backward`` recomputes the activation from ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, _checks
from ._backend import tl, triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused kernels take
BLOCK = 1024  # elements of one group per loop iteration of a Triton program


def _stats_dtype(x: Tensor) -> torch.dtype:
    """float32, as GroupNorm32; float64 for the float64 oracle."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward_reference(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                       shift: Tensor | None, groups: int, eps: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    n, c = x.shape[:2]
    dt = _stats_dtype(x)
    # native_group_norm is what F.group_norm runs; it also hands back the statistics.
    h, mean, rstd = torch.native_group_norm(x.to(dt), weight.to(dt), bias.to(dt), n, c,
                                            x[0, 0].numel(), groups, eps)
    h = h.to(x.dtype)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return torch.nn.functional.silu(h), mean, rstd


def _backward_reference(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                        bias: Tensor, scale: Tensor | None, shift: Tensor | None,
                        groups: int) -> Tensor:
    """∂L/∂x in float32 (float64 for float64 inputs), what the fused kernels compute."""
    n, c = x.shape[:2]
    dt = _stats_dtype(x)
    xhat = ((x.to(dt).reshape(n, groups, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    gain = weight.to(dt)[None, :, None, None].expand(n, c, 1, 1)
    a = xhat * gain + bias.to(dt)[None, :, None, None]
    if scale is not None:
        mult = 1 + scale.to(dt)[:, :, None, None]
        a, gain = a * mult + shift.to(dt)[:, :, None, None], gain * mult
    sig = torch.sigmoid(a)
    # SiLU'(a) = σ(a)(1 + a(1 − σ(a))); then the group norm's VJP on x̂ = (x − μ)·rstd.
    g = (grad.to(dt) * sig * (1 + a * (1 - sig)) * gain).reshape(n, groups, -1)
    xh = xhat.reshape(n, groups, -1)
    gx = rstd[..., None] * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    return gx.reshape(x.shape).to(x.dtype)


def _forward_fake(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                  shift: Tensor | None, groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_fake(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                   bias: Tensor, scale: Tensor | None, shift: Tensor | None,
                   groups: int) -> Tensor:
    return torch.empty_like(x)


_backend.register_fake("group_norm_silu", _forward_fake)
_backend.register_fake("group_norm_silu_backward", _backward_fake)


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                  shift: Tensor | None, groups: int) -> None:
    """The shapes every implementation needs (ValueError)."""
    if x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"x must be [N, C, H, W] with N >= 1, got {list(x.shape)}")
    n, c = x.shape[:2]
    if groups < 1 or c % groups:
        raise ValueError(f"the channels ({c}) must be a multiple of groups ({groups})")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must be [{c}], got {list(t.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together")
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t is not None and tuple(t.shape) != (n, c):
            raise ValueError(f"{name} must be [{n}, {c}], got {list(t.shape)}")


def _check(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None,
           groups: int) -> None:
    """The rules of csrc/checks.h ``check_group_norm_inputs``: shapes, dtypes, devices, layout."""
    _check_shapes(x, weight, bias, scale, shift, groups)
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES}, got {x.dtype}")
    _checks.tensor(x, "x", x.dtype, x.device)
    for t, name in ((weight, "weight"), (bias, "bias")):
        _checks.tensor(t, name, torch.float32, x.device)
    for t, name in ((scale, "scale"), (shift, "shift")):
        if t is not None:
            _checks.tensor(t, name, x.dtype, x.device)


def _per_channel(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``[N, C, 1, 1]`` (the ResBlock's broadcast form) as ``[N, C]``; any other shape as it
    is (``_check_shapes`` then rejects all but ``[N, C]``)."""
    if t is None or x.dim() != 4 or tuple(t.shape) != (*x.shape[:2], 1, 1):
        return t
    return t.reshape(x.shape[:2])


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr,
                        channels, plane, groups, eps, AFFINE: tl.constexpr, BLOCK: tl.constexpr):
        # x, y: [N, C, H·W] (group g of sample n: the contiguous [C/G, H·W] block at
        # (n·G + g)·(C/G)·H·W); w, b: [C] float32; scale, shift: [N, C]; mean, rstd: [N, G].
        # Grid: (N·G,). Three passes: the mean, the centred variance, the output.
        pid = tl.program_id(0).to(tl.int64)
        n = pid // groups
        per_group = channels // groups
        size = per_group * plane
        first = (pid % groups) * per_group
        base = pid * size
        lanes = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            j = start + lanes
            acc += tl.load(x_ptr + base + j, mask=j < size, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / size
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            j = start + lanes
            x = tl.load(x_ptr + base + j, mask=j < size, other=0.0).to(tl.float32)
            d = tl.where(j < size, x - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / size + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        for start in range(0, size, BLOCK):
            j = start + lanes
            mask = j < size
            c = first + j // plane
            x = tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
            gain, offset = _affine(w_ptr, b_ptr, scale_ptr, shift_ptr, c, n * channels, mask,
                                   AFFINE)
            a = (x - mean) * rstd * gain + offset
            tl.store(y_ptr + base + j, (a * tl.sigmoid(a)).to(y_ptr.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _backward_kernel(grad_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr,
                         shift_ptr, out_ptr, channels, plane, groups, AFFINE: tl.constexpr,
                         BLOCK: tl.constexpr):
        # grad, x, out: [N, C, H·W]; the rest as _forward_kernel. Grid: (N·G,). Pass 1 sums
        # g = ∂L/∂x̂ and g·x̂ over the group, pass 2 recomputes g and writes
        # rstd·(g − mean(g) − x̂·mean(g·x̂)).
        pid = tl.program_id(0).to(tl.int64)
        n = pid // groups
        per_group = channels // groups
        size = per_group * plane
        first = (pid % groups) * per_group
        base = pid * size
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        lanes = tl.arange(0, BLOCK)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_gx = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            j = start + lanes
            g, xhat = _input_grad(grad_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, j,
                                  j < size, first + j // plane, n * channels, mean, rstd, AFFINE)
            sum_g += g
            sum_gx += g * xhat
        mean_g = tl.sum(sum_g, axis=0) / size
        mean_gx = tl.sum(sum_gx, axis=0) / size
        for start in range(0, size, BLOCK):
            j = start + lanes
            mask = j < size
            g, xhat = _input_grad(grad_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, j,
                                  mask, first + j // plane, n * channels, mean, rstd, AFFINE)
            out = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(out_ptr + base + j, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _affine(w_ptr, b_ptr, scale_ptr, shift_ptr, c, row, mask, AFFINE: tl.constexpr):
        """``(gain, offset)`` of channels ``c`` of sample row ``row`` (= n·C): ``a = x̂·gain +
        offset`` with ``gain = γ(1+s)``, ``offset = β(1+s) + t`` (csrc/group_norm_affine.h)."""
        gain = tl.load(w_ptr + c, mask=mask, other=0.0)
        offset = tl.load(b_ptr + c, mask=mask, other=0.0)
        if AFFINE:
            # float32 before the add: 1 + scale in x's dtype would round once more.
            mult = 1.0 + tl.load(scale_ptr + row + c, mask=mask, other=0.0).to(tl.float32)
            gain *= mult
            offset = offset * mult + tl.load(shift_ptr + row + c, mask=mask,
                                             other=0.0).to(tl.float32)
        return gain, offset

    @triton.jit
    def _input_grad(grad_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, j, mask, c, row,
                    mean, rstd, AFFINE: tl.constexpr):
        """(∂L/∂x̂, x̂) of one block of a group; 0 on masked lanes."""
        x = tl.load(x_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + base + j, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        gain, offset = _affine(w_ptr, b_ptr, scale_ptr, shift_ptr, c, row, mask, AFFINE)
        a = xhat * gain + offset
        sig = tl.sigmoid(a)
        g = dy * sig * (1.0 + a * (1.0 - sig)) * gain
        return tl.where(mask, g, 0.0), xhat

    @torch.library.custom_op("fastem_triton::group_norm_silu", mutates_args=())
    def _forward_triton(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                        shift: Tensor | None, groups: int, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
        _check(x, weight, bias, scale, shift, groups)
        y, mean, rstd = _forward_fake(x, weight, bias, scale, shift, groups, eps)
        with _backend.device_guard(x):
            _forward_kernel[(x.shape[0] * groups,)](
                x, weight, bias, x if scale is None else scale, x if shift is None else shift,
                y, mean, rstd, x.shape[1], x[0, 0].numel(), groups, eps,
                AFFINE=scale is not None, BLOCK=BLOCK)
        return y, mean, rstd

    @torch.library.custom_op("fastem_triton::group_norm_silu_backward", mutates_args=())
    def _backward_triton(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                         bias: Tensor, scale: Tensor | None, shift: Tensor | None,
                         groups: int) -> Tensor:
        _check(x, weight, bias, scale, shift, groups)
        _checks.plane(grad, "grad", x.dtype, tuple(x.shape), x.device)
        for t, name in ((mean, "mean"), (rstd, "rstd")):
            _checks.plane(t, name, torch.float32, (x.shape[0], groups), x.device)
        out = torch.empty_like(x)
        with _backend.device_guard(x):
            _backward_kernel[(x.shape[0] * groups,)](
                grad, x, mean, rstd, weight, bias, x if scale is None else scale,
                x if shift is None else shift, out, x.shape[1], x[0, 0].numel(), groups,
                AFFINE=scale is not None, BLOCK=BLOCK)
        return out

    _forward_triton.register_fake(_forward_fake)
    _backward_triton.register_fake(_backward_fake)
else:
    _forward_triton = _backward_triton = None


def _implementations(backend: str) -> tuple:
    """(forward, backward) of ``backend``."""
    if backend == "cpp":
        return torch.ops.fastem.group_norm_silu, torch.ops.fastem.group_norm_silu_backward
    if backend == "triton":
        return _forward_triton, _backward_triton
    return _forward_reference, _backward_reference


class _GroupNormSiLU(torch.autograd.Function):
    """The forward op of one backend, differentiated by the same backend's backward op."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None,
                shift: Tensor | None, groups: int, eps: float, backend: str) -> Tensor:
        y, mean, rstd = _implementations(backend)[0](x, weight, bias, scale, shift, groups, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
        ctx.groups, ctx.backend = groups, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if any(ctx.needs_input_grad[1:5]):
            raise RuntimeError("the fused group_norm_silu differentiates x only; "
                               "call group_norm_silu, which runs the reference for such grads")
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        gx = _implementations(ctx.backend)[1](grad.contiguous(), x, mean, rstd, weight, bias,
                                              scale, shift, ctx.groups)
        return gx, None, None, None, None, None, None, None


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None = None,
                    shift: Tensor | None = None, groups: int = 32, eps: float = 1e-5) -> Tensor:
    """``SiLU(GN(x)·(1+scale) + shift)`` ``[N, C, H, W]`` in ``x``'s dtype (module docstring).

    x: ``[N, C, H, W]``; weight, bias: ``[C]`` (γ, β; used in float32); scale, shift: ``[N, C]``
    or ``[N, C, 1, 1]`` in ``x``'s dtype, both or neither; groups must divide C. Differentiable
    in ``x`` by the fused backward; in the other inputs by the reference (module docstring).
    """
    scale, shift = _per_channel(scale, x), _per_channel(shift, x)
    _check_shapes(x, weight, bias, scale, shift, groups)
    params = (weight, bias, scale, shift)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return _forward_reference(x, weight, bias, scale, shift, groups, eps)[0]
    backend = _backend.select("group_norm_silu", x.device) if x.dtype in DTYPES else "reference"
    x, weight, bias, scale, shift = _backend.dense(x, weight.float(), bias.float(), scale, shift)
    return _GroupNormSiLU.apply(x, weight, bias, scale, shift, groups, float(eps), backend)
