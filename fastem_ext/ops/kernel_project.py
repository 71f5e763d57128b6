"""Fused op 4, ``kernel_project``: the HQS projection of a full-grid ``z`` in one launch.

From ``z`` ``[H, W]`` (the inverse FFT of the Z-update, kernel centre at the origin):

1. crop the ``K×K`` support around the origin (``otf2psf``), clamp ``≥ 0``, normalise to sum 1
   (``fallback`` where the mass vanishes) — ``k1``;
2. soft-threshold at ``threshold`` (the ℓ1 K-update; 0 for ℓ2/none) and normalise again (``k1``
   where the mass vanishes) — ``k2``;
3. if ``recenter``: shift by whole pixels so the centre of mass is at ``(K//2, K//2)``, dropping
   what leaves the support, and renormalise (``recenter_kernel``);

and return the kernel ``[K, K]`` with its zero-padded, origin-centred grid ``[H, W]``
(``physics.kernel_grid``), the input of the next iteration's ``rfft2``.

The re-centring is the reference's whole-pixel shift (rounding half to even, like
``torch.round``); a sub-pixel shift would interpolate, i.e. blur, the kernel.

Kernels: every Triton program / CUDA block recomputes the few reductions over the ``K×K``
support (``K ≤ 64``: read from cache) and writes one tile of the grid, so the whole projection is
one launch with no inter-block synchronisation; the first also writes the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..physics import kernel_grid, otf2psf
from . import _backend, _checks
from ._backend import tl, triton

GRID_TILE = 64  # grid rows and columns per program
MIN_MASS = 1e-12  # below this a projection keeps its fallback
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def project_kernel(z: Tensor, fallback: Tensor) -> Tensor:
    """Clamp ``≥ 0`` and normalise to sum 1; where the mass vanishes, return ``fallback``."""
    z = z.clamp_min(0.0)
    mass = z.sum()
    tiny = torch.finfo(z.dtype).tiny
    return torch.where(mass > MIN_MASS, z / mass.clamp_min(tiny), fallback)


def soft_threshold(z: Tensor, threshold: float) -> Tensor:
    """The ℓ1 proximal map on a non-negative kernel: ``max(z − threshold, 0)``."""
    return (z - threshold).clamp_min(0.0)


def recenter_kernel(kernel: Tensor) -> Tensor:
    """Shift ``[K, K]`` by whole pixels so its centre of mass is at ``(K//2, K//2)``.

    Mass shifted past the border is dropped and the rest renormalised. Device-only (no ``.item()``).
    """
    size = kernel.shape[-1]
    index = torch.arange(size, device=kernel.device)
    mass = kernel.sum().clamp_min(torch.finfo(kernel.dtype).tiny)
    com_row = (kernel.sum(1) * index).sum() / mass
    com_col = (kernel.sum(0) * index).sum() / mass
    rows, row_ok = _shifted_index(index, torch.round(size // 2 - com_row).long())
    cols, col_ok = _shifted_index(index, torch.round(size // 2 - com_col).long())
    shifted = kernel.index_select(0, rows).index_select(1, cols)
    shifted = shifted * (row_ok[:, None] & col_ok[None, :])
    return project_kernel(shifted, kernel)


def _shifted_index(index: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    # out[i] = in[i - shift], zero where i - shift falls outside.
    source = index - shift
    valid = (source >= 0) & (source < index.shape[0])
    return source.clamp(0, index.shape[0] - 1), valid


def _reference(z: Tensor, fallback: Tensor, threshold: float,
               recenter: bool) -> tuple[Tensor, Tensor]:
    k1 = project_kernel(otf2psf(z, fallback.shape[-1]), fallback)
    kernel = project_kernel(soft_threshold(k1, threshold), k1)
    if recenter:
        kernel = recenter_kernel(kernel)
    return kernel, kernel_grid(kernel, tuple(z.shape[-2:]))


def _fake(z: Tensor, fallback: Tensor, threshold: float, recenter: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(fallback), torch.empty_like(z)


_backend.register_fake("kernel_project", _fake)

if triton is not None:
    _MIN_MASS = tl.constexpr(MIN_MASS)
    _TINY = tl.constexpr(FLOAT32_TINY)

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _normalised(values, mass, fallback):
        # values / mass, or the fallback where the mass vanishes (as project_kernel); IEEE
        # division, as torch's (a plain '/' may lower to an approximate one on GPUs).
        return tl.where(mass > _MIN_MASS, tl.math.div_rn(values, tl.maximum(mass, _TINY)),
                        fallback)

    @triton.jit
    def _projected(z_ptr, fb_ptr, a, b, valid, height, width, size, m1, m2, threshold):
        # k2 at support positions (a, b), recomputed from z and the two masses.
        c = size // 2
        zv = tl.load(z_ptr + ((a - c + height) % height) * width + (b - c + width) % width,
                     mask=valid, other=0.0)
        fb = tl.load(fb_ptr + a * size + b, mask=valid, other=0.0)
        k1 = _normalised(tl.maximum(zv, 0.0), m1, fb)
        k2 = _normalised(tl.maximum(k1 - threshold, 0.0), m2, k1)
        return tl.where(valid, k2, 0.0)

    @triton.jit
    def _final(z_ptr, fb_ptr, a, b, valid, height, width, size, m1, m2, m3, threshold,
               shift_r, shift_c, RECENTER: tl.constexpr):
        # The output kernel at support positions (a, b).
        k2 = _projected(z_ptr, fb_ptr, a, b, valid, height, width, size, m1, m2, threshold)
        if RECENTER:
            src_a = a - shift_r
            src_b = b - shift_c
            inside = valid & (src_a >= 0) & (src_a < size) & (src_b >= 0) & (src_b < size)
            moved = _projected(z_ptr, fb_ptr, src_a, src_b, inside, height, width, size, m1, m2,
                               threshold)
            k2 = _normalised(moved, m3, k2)
        return k2

    @triton.jit
    def _kernel_project_kernel(z_ptr, fb_ptr, kernel_ptr, grid_ptr, height, width, size,
                               threshold, RECENTER: tl.constexpr, BK: tl.constexpr,
                               TILE: tl.constexpr):
        # z, grid: [H, W]; fallback, kernel: [K, K]; BK ≥ K a power of two.
        a = tl.arange(0, BK)[:, None]
        b = tl.arange(0, BK)[None, :]
        valid = (a < size) & (b < size)
        c = size // 2
        zv = tl.load(z_ptr + ((a - c + height) % height) * width + (b - c + width) % width,
                     mask=valid, other=0.0)
        m1 = tl.sum(tl.maximum(zv, 0.0))
        fb = tl.load(fb_ptr + a * size + b, mask=valid, other=0.0)
        k1 = _normalised(tl.maximum(zv, 0.0), m1, fb)
        m2 = tl.sum(tl.where(valid, tl.maximum(k1 - threshold, 0.0), 0.0))
        k2 = _projected(z_ptr, fb_ptr, a, b, valid, height, width, size, m1, m2, threshold)
        m3 = m2
        shift_r = 0
        shift_c = 0
        if RECENTER:
            mass = tl.maximum(tl.sum(k2), _TINY)
            shift_r = _round_half_even(c - tl.math.div_rn(tl.sum(k2 * a), mass)).to(tl.int32)
            shift_c = _round_half_even(c - tl.math.div_rn(tl.sum(k2 * b), mass)).to(tl.int32)
            inside = valid & (a - shift_r >= 0) & (a - shift_r < size)
            inside = inside & (b - shift_c >= 0) & (b - shift_c < size)
            m3 = tl.sum(_projected(z_ptr, fb_ptr, a - shift_r, b - shift_c, inside, height, width,
                                   size, m1, m2, threshold))
        pid = tl.program_id(0)
        out = _final(z_ptr, fb_ptr, a, b, valid, height, width, size, m1, m2, m3, threshold,
                     shift_r, shift_c, RECENTER)
        tl.store(kernel_ptr + a * size + b, out, mask=valid & (pid == 0))
        # This program's grid tile: pixel (r, s) holds kernel entry ((r + c) % H, (s + c) % W).
        tiles_c = tl.cdiv(width, TILE)
        r = (pid // tiles_c) * TILE + tl.arange(0, TILE)[:, None]
        s = (pid % tiles_c) * TILE + tl.arange(0, TILE)[None, :]
        ka = (r + c) % height
        kb = (s + c) % width
        support = (r < height) & (s < width) & (ka < size) & (kb < size)
        value = _final(z_ptr, fb_ptr, ka, kb, support, height, width, size, m1, m2, m3,
                       threshold, shift_r, shift_c, RECENTER)
        tl.store(grid_ptr + r.to(tl.int64) * width + s, value, mask=(r < height) & (s < width))

    @torch.library.custom_op("fastem_triton::kernel_project", mutates_args=())
    def _triton_impl(z: Tensor, fallback: Tensor, threshold: float,
                     recenter: bool) -> tuple[Tensor, Tensor]:
        _check(z, fallback, threshold)
        kernel, grid = _fake(z, fallback, threshold, recenter)
        height, width = z.shape
        size = fallback.shape[0]
        programs = triton.cdiv(height, GRID_TILE) * triton.cdiv(width, GRID_TILE)
        with _backend.device_guard(z):
            _kernel_project_kernel[(programs,)](
                z, fallback, kernel, grid, height, width, size, threshold, RECENTER=recenter,
                BK=max(triton.next_power_of_2(size), 2), TILE=GRID_TILE, num_warps=8)
        return kernel, grid

    _triton_impl.register_fake(_fake)
else:
    _triton_impl = None


def _check(z: Tensor, fallback: Tensor, threshold: float) -> None:
    _checks.tensor(z, "z", torch.float32, z.device)
    _checks.tensor(fallback, "fallback", torch.float32, z.device)
    if z.dim() != 2:
        raise ValueError(f"z must be a full-grid [H, W] kernel, got {tuple(z.shape)}")
    size = fallback.shape[-1]
    if fallback.dim() != 2 or fallback.shape[0] != size:
        raise ValueError(f"fallback must be a square [K, K] kernel, got {tuple(fallback.shape)}")
    if not 1 <= size <= min(_checks.MAX_KERNEL_SIZE, *z.shape):
        raise ValueError(f"kernel size {size} must be in [1, min(64, H, W)] for z {tuple(z.shape)}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")


def kernel_project(z: Tensor, fallback: Tensor, threshold: float = 0.0,
                   recenter: bool = False) -> tuple[Tensor, Tensor]:
    """Project ``z`` ``[H, W]`` onto kernels ``[K, K]`` (module docstring).

    fallback: the previous kernel ``[K, K]`` (``K ≤ 64`` for the fused kernels); threshold: the
    ℓ1 soft threshold ``λ/β`` (0: none). Returns ``(kernel [K, K], grid [H, W])``.
    """
    impl = _backend.dispatch("kernel_project", z, _reference, _triton_impl)
    return impl(z, fallback, float(threshold), bool(recenter))
