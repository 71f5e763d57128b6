"""Camera-shake blur kernels from random hand-shake trajectories.

Model (one kernel; every step below runs for a whole batch at once with tensor ops):

1. **Trajectory.** A 2-D random walk with inertia, in arbitrary units, sampled at ``steps`` time
   points (default 64)::

       v_0 = speed_0 · (cos θ_0, sin θ_0),      θ_0 ~ U[0, 2π), speed_0 ~ U[0, 3]
       v_t = m · v_{t-1} + a_t + j_t - s · p_{t-1}
       p_t = p_{t-1} + v_t,                      p_0 = 0

   ``a_t ~ N(0, I)`` is the tremor (random acceleration); ``m ~ U[momentum]`` is the inertia: close
   to 1 gives smooth arcs and near-linear blurs, lower values give curly, Brownian-like paths.
   ``j_t`` are rare jerks: with probability ``jerk_prob`` per step an impulse of size
   ``jerk_scale · (1 + Exp(1))`` in a uniform direction. ``s ~ U[spring]`` is a weak pull back to
   the start point (the hand corrects its drift), which makes long exposures loop back.
2. **Sub-pixel sampling.** The path is linearly interpolated at ``steps · substeps`` instants evenly
   spaced in time, so the kernel is brighter where the hand moved slowly (more exposure time).
   With the default ``substeps`` the largest gap between samples is 0.3 px in the median kernel and
   0.7–0.8 px in the 90th percentile (measured at sizes 33 and 64); only the fastest jerk segments
   of ~1 % of kernels exceed 1.2 px, where softening partly fills the gaps.
3. **Size.** The path is re-centred on its time-average (its centre of mass) and scaled so that its
   extent (the larger side of its bounding box) is ``L = f · L_max`` with ``f`` log-uniform in
   ``extent`` (default 0.15…1, short to long blurs) and ``L_max = 2 · R``,
   ``R = (size - 1) // 2 - margin``, ``margin = 3 + size // 48`` pixels. If the path, centred on its
   mean, would still leave the ``[-R, R]²`` box, it is shrunk until it fits; so the extent scales
   with ``size`` and every kernel keeps at least ``margin`` empty pixels to its border.
4. **Rasterisation.** Each sample is splatted bilinearly (tent anti-aliasing) with weight
   ``1 / samples`` into a ``size × size`` grid whose centre is index ``(size//2, size//2)``.
5. **Softening.** A separable Gaussian of standard deviation ``~ U[soften]`` px (default 0…0.6,
   5 taps) mimics optics and sensor blur; 0 leaves the splats unchanged.
6. **Normalisation** to sum 1 (float32).

Centring: bilinear splatting preserves the first moment exactly and the symmetric Gaussian does
too (the margin keeps all mass inside), so the kernel's centre of mass equals the path's mean, which
step 3 puts on ``(size//2, size//2)``: sub-pixel centring, not an integer shift, accurate to float32
rounding (~1e-5 px).

Seeds: kernel ``i`` of ``motion_kernels(count, size, seed=s)`` is the kernel of seed ``s + i``,
drawn from its own ``torch.Generator`` seeded with ``s + i``; it does not depend on ``count`` and
equals ``motion_kernel(size, seed=s + i)``. Seeds are split into disjoint ranges:
``EVAL_SEEDS`` (kernels for reported results), ``TUNE_SEEDS`` (hyper-parameter tuning) and
``TRAIN_SEEDS`` (training the kernel denoiser); :func:`seed_split` names the range of a seed. Seeds
must lie in ``[0, 2**32)`` because torch's CPU generator keeps 32 bits of the seed.

Supported sizes: 9 to 128 (a ``size < 9`` kernel has no room for a margin and a trajectory).
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch

__all__ = [
    "EVAL_SEEDS",
    "MAX_SIZE",
    "MIN_SIZE",
    "SEED_LIMIT",
    "TRAIN_SEEDS",
    "TUNE_SEEDS",
    "check_seed_range",
    "motion_kernel",
    "motion_kernels",
    "seed_split",
]

MIN_SIZE = 9
MAX_SIZE = 128
SEED_LIMIT = 2**32

# Disjoint seed ranges. Evaluation (figures, tables, tests of quality) uses only EVAL_SEEDS;
# training of the kernel denoiser uses only TRAIN_SEEDS.
EVAL_SEEDS = range(100_000)
TUNE_SEEDS = range(100_000, 1_000_000)
TRAIN_SEEDS = range(1_000_000, SEED_LIMIT)

Split = Literal["eval", "tune", "train"]
_SPLITS: dict[str, range] = {"eval": EVAL_SEEDS, "tune": TUNE_SEEDS, "train": TRAIN_SEEDS}

_TAPS = 2  # softening filter half-width: 5 taps cover ±3.3 σ at σ = 0.6 px


def seed_split(seed: int) -> Split:
    """Name the split a kernel seed belongs to: ``"eval"``, ``"tune"`` or ``"train"``."""
    seed = _check_int(seed, "seed")
    for name, seeds in _SPLITS.items():
        if seed in seeds:
            return name  # type: ignore[return-value]
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")


def check_seed_range(start: int, count: int, split: Split) -> None:
    """Raise ValueError unless the seeds ``start .. start + count - 1`` all lie in ``split``."""
    seeds = _SPLITS[split]
    if count > 0 and (start not in seeds or start + count - 1 not in seeds):
        raise ValueError(
            f"seeds [{start}, {start + count}) are not all in the {split} range "
            f"[{seeds.start}, {seeds.stop})"
        )


def motion_kernel(size: int, *, seed: int, **options: object) -> torch.Tensor:
    """One camera-shake kernel: ``[size, size]`` float32, non-negative, sum 1.

    Same as ``motion_kernels(1, size, seed=seed, **options)[0]``; see that function.
    """
    return motion_kernels(1, size, seed=seed, **options)[0]  # type: ignore[arg-type]


def motion_kernels(
    count: int,
    size: int,
    *,
    seed: int,
    extent: tuple[float, float] = (0.15, 1.0),
    momentum: tuple[float, float] = (0.65, 0.96),
    spring: tuple[float, float] = (0.0, 0.04),
    jerk_prob: float = 0.03,
    jerk_scale: float = 4.0,
    soften: tuple[float, float] = (0.0, 0.6),
    steps: int = 64,
    substeps: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A batch of camera-shake kernels: ``[count, size, size]`` float32, each non-negative, sum 1.

    Kernel ``i`` is the kernel of seed ``seed + i`` (independent of ``count``). The model and its
    parameters are described in the module docstring; ranges are ``(low, high)`` of a per-kernel
    uniform draw (``extent`` is drawn log-uniformly, as a fraction of the largest extent that fits).

    Args:
        count: number of kernels, ``>= 0``.
        size: kernel side, ``MIN_SIZE .. MAX_SIZE`` (odd or even); centre at ``(size//2, size//2)``.
        seed: seed of the first kernel; ``seed + count`` must not exceed ``2**32``.
        substeps: samples per walk step for rasterisation; default ``max(4, ceil(size / 6))`` keeps
            the samples well under a pixel apart.
        device: where the result goes (generation runs on the CPU, where the generators live).
    """
    count = _check_int(count, "count")
    size = _check_int(size, "size")
    seed = _check_int(seed, "seed")
    steps = _check_int(steps, "steps")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if seed < 0 or seed + count > SEED_LIMIT:
        raise ValueError(f"seed must satisfy 0 <= seed and seed + count <= 2**32, got {seed}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    for name, rng in (("extent", extent), ("momentum", momentum), ("spring", spring),
                      ("soften", soften)):
        if len(rng) != 2 or not 0.0 <= rng[0] <= rng[1] or not math.isfinite(rng[1]):
            raise ValueError(f"{name} must be a (low, high) pair with 0 <= low <= high")
    if extent[0] <= 0.0 or extent[1] > 1.0:
        raise ValueError(f"extent must lie in (0, 1], got {extent}")
    if momentum[1] >= 1.0:
        raise ValueError(f"momentum must be < 1, got {momentum}")
    if not 0.0 <= jerk_prob <= 1.0:
        raise ValueError(f"jerk_prob must be in [0, 1], got {jerk_prob}")
    if jerk_scale < 0.0:
        raise ValueError(f"jerk_scale must be >= 0, got {jerk_scale}")
    if soften[1] > 1.0:
        raise ValueError(f"soften must be <= 1 px (5-tap filter), got {soften}")
    sub = max(4, math.ceil(size / 6)) if substeps is None else _check_int(substeps, "substeps")
    if sub < 1:
        raise ValueError(f"substeps must be >= 1, got {sub}")

    if count == 0:
        return torch.zeros(0, size, size, device=device)
    u = _uniforms(count, seed, 6 + 5 * steps)
    path = _walk(u, steps, momentum, spring, jerk_prob, jerk_scale)  # [B, steps + 1, 2]
    dense = _resample(path, sub)  # [B, steps * sub, 2]
    frac = torch.exp(_lerp(math.log(extent[0]), math.log(extent[1]), u[:, 2]))
    points = _place(dense, size, frac)
    kernels = _splat(points, size)
    sigma = _lerp(soften[0], soften[1], u[:, 3])
    kernels = _soften(kernels, sigma)
    kernels = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    return kernels.to(device) if device is not None else kernels


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # ValueError (not TypeError) so that every bad argument raises one exception type.
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")  # noqa: TRY004
    return int(value)


def _lerp(low: float, high: float, u: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * u


def _uniforms(count: int, seed: int, width: int) -> torch.Tensor:
    """``[count, width]`` uniforms in [0, 1); row ``i`` comes from a generator seeded ``seed + i``.

    The loop only draws numbers (a few µs per kernel); everything after it is batched. One
    generator per kernel is what makes kernel ``seed + i`` independent of the batch it is in.
    """
    out = torch.empty(count, width)
    gen = torch.Generator()
    for i in range(count):
        gen.manual_seed(seed + i)
        torch.rand(width, generator=gen, out=out[i])
    return out


def _walk(
    u: torch.Tensor,
    steps: int,
    momentum: tuple[float, float],
    spring: tuple[float, float],
    jerk_prob: float,
    jerk_scale: float,
) -> torch.Tensor:
    """Hand-shake walk from per-kernel uniforms ``u: [B, 6 + 5 steps]`` → ``[B, steps + 1, 2]``."""
    b = u.shape[0]
    m = _lerp(*momentum, u[:, 0])[:, None]
    s = _lerp(*spring, u[:, 1])[:, None]
    theta0 = 2 * math.pi * u[:, 4]
    v = (3.0 * u[:, 5])[:, None] * torch.stack((torch.cos(theta0), torch.sin(theta0)), dim=1)
    # Box-Muller on two blocks of uniforms gives the 2-D tremor accelerations.
    u1 = u[:, 6 : 6 + steps].clamp_min(1e-12)
    u2 = u[:, 6 + steps : 6 + 2 * steps]
    radius = torch.sqrt(-2.0 * torch.log(u1))
    tremor = radius[..., None] * torch.stack(
        (torch.cos(2 * math.pi * u2), torch.sin(2 * math.pi * u2)), dim=-1
    )
    happens = u[:, 6 + 2 * steps : 6 + 3 * steps] < jerk_prob
    size = jerk_scale * (1.0 - torch.log1p(-u[:, 6 + 3 * steps : 6 + 4 * steps]))
    angle = 2 * math.pi * u[:, 6 + 4 * steps : 6 + 5 * steps]
    jerk = (happens * size)[..., None] * torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    force = tremor + jerk  # [B, steps, 2]
    pos = torch.zeros(b, steps + 1, 2)
    p = pos[:, 0]
    # Sequential in time (64 small batched ops); the spring term makes the recurrence nonlinear
    # in p_t, v_t jointly, so a cumsum would not do.
    for t in range(steps):
        v = m * v + force[:, t] - s * p
        p = p + v
        pos[:, t + 1] = p
    return pos


def _resample(path: torch.Tensor, sub: int) -> torch.Tensor:
    """Linear interpolation at ``sub`` instants per step, at segment mid-times (uniform in time).

    path: ``[B, T + 1, 2]`` → ``[B, T * sub, 2]``.
    """
    w = (torch.arange(sub, dtype=path.dtype) + 0.5) / sub  # [sub]
    a, b = path[:, :-1, None, :], path[:, 1:, None, :]  # [B, T, 1, 2]
    dense = a + (b - a) * w[None, None, :, None]
    return dense.reshape(path.shape[0], -1, 2)


def _place(dense: torch.Tensor, size: int, frac: torch.Tensor) -> torch.Tensor:
    """Centre each path on its mean and scale it to extent ``frac · L_max`` inside the margin.

    dense: ``[B, M, 2]``, frac: ``[B]`` → pixel coordinates ``[B, M, 2]`` (row, col).
    """
    radius = (size - 1) // 2 - (3 + size // 48)
    q = dense - dense.mean(dim=1, keepdim=True)
    span = (q.amax(dim=1) - q.amin(dim=1)).amax(dim=1)  # [B]
    reach = q.abs().amax(dim=(1, 2))  # [B]
    scale = torch.minimum(
        frac * (2 * radius) / span.clamp_min(1e-9), radius / reach.clamp_min(1e-9)
    )
    return (size // 2) + q * scale[:, None, None]


def _splat(points: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear splatting of ``[B, M, 2]`` points, weight ``1/M`` each → ``[B, size, size]``."""
    b, m, _ = points.shape
    base = points.floor()
    f = points - base
    i0 = base.long()
    fy, fx = f[..., 0], f[..., 1]
    weights = torch.stack(((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx), dim=-1)
    dy = torch.tensor([0, 0, 1, 1])
    dx = torch.tensor([0, 1, 0, 1])
    # The margin keeps every index in range; the clamp only guards float edge cases (weight ~0).
    rows = (i0[..., 0:1] + dy).clamp(0, size - 1)
    cols = (i0[..., 1:2] + dx).clamp(0, size - 1)
    flat = torch.arange(b)[:, None, None] * (size * size) + rows * size + cols  # [B, M, 4]
    out = torch.zeros(b * size * size)
    out.scatter_add_(0, flat.reshape(-1), (weights / m).reshape(-1))
    return out.view(b, size, size)


def _soften(kernels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable per-kernel Gaussian, ``sigma: [B]`` px. Shifted adds rather than a grouped conv:
    elementwise ops give bit-identical results whatever the batch size."""
    x = torch.arange(-_TAPS, _TAPS + 1, dtype=kernels.dtype)
    g = torch.exp(-(x**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # [B, 5]
    g = g / g.sum(dim=1, keepdim=True)
    n = kernels.shape[-1]
    for dim in (1, 2):
        pad = (_TAPS, _TAPS) if dim == 2 else (0, 0, _TAPS, _TAPS)
        padded = torch.nn.functional.pad(kernels, pad)
        acc = torch.zeros_like(kernels)
        for j in range(2 * _TAPS + 1):
            acc = acc + g[:, j, None, None] * padded.narrow(dim, j, n)
        kernels = acc
    return kernels
