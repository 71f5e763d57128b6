"""DDPM schedule, guided-diffusion respacing and the per-step tables the samplers read.

The base process is DDPM with ``T = 1000`` linear betas ``1e-4 … 0.02`` (float64). Respacing keeps
a subset of the original timesteps ``t_0 < t_1 < … < t_{S-1}`` and defines the respaced betas
``β_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i-1}}`` (``ᾱ_{t_{-1}} = 1``), exactly as guided-diffusion's
``space_timesteps``; the network keeps receiving the original integer ``t_i``.

Every per-step scalar lives in a device table (``StepTables``), indexed by the respaced step ``i``:
the sampling loop never builds CPU tensors or synchronises with the host.

**Units.** The diffusion runs in the network's units, ``x' = 2x − 1`` for an image ``x`` in
[0, 1]: lengths scale by ``NETWORK_SCALE = 2``, variances by 4. The conversion lives here and
nowhere else: ``to_image`` maps the network's estimate back to [0, 1], and ``Schedule.tables``
gives the two per-step scalars that meet the observation (the ΠGDM variance and the DPS step) in
image units. The observation, the M-step and the guidance work in image units only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02
R2_RULES = ("reference", "pigdm")
NETWORK_SCALE = 2.0  # x' = 2x − 1: one image unit is two network units


def to_image(x: Tensor) -> Tensor:
    """Network units → image units: ``(x' + 1) / 2`` (shapes of ``x``)."""
    return (x + 1.0) / NETWORK_SCALE


def tweedie_x0(x_t: Tensor, eps: Tensor, sqrt_ac: Tensor, sqrt_one_minus_ac: Tensor) -> Tensor:
    """The unclamped Tweedie estimate ``(x_t − √(1−ᾱ) ε)/√ᾱ`` (network units, shapes of ``x_t``)."""
    return (x_t - sqrt_one_minus_ac * eps) / sqrt_ac


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The linear DDPM betas ``[T]`` in float64, scaled as guided-diffusion does for T ≠ 1000."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spacing: str | int | list[int]) -> list[int]:
    """The kept original timesteps, ascending.

    ``spacing``: ``"100"`` (100 steps, evenly strided with rounding), ``"10,15,20"`` (the range
    split in equal sections with that many steps each), ``"ddim50"`` (a constant integer stride
    giving exactly 50 steps), an int, or an explicit list of timesteps.
    """
    if isinstance(spacing, list):
        steps = sorted(set(int(s) for s in spacing))
        if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
            raise ValueError(f"steps must lie in [0, {num_timesteps - 1}], got {spacing}")
        return steps
    if isinstance(spacing, bool) or not isinstance(spacing, (int, str)):
        raise ValueError(f"steps must be an int, a string or a list of ints, got {spacing!r}")
    text = str(spacing).strip()
    if text.startswith("ddim"):
        try:
            wanted = int(text[4:])
        except ValueError:
            raise ValueError(f"steps {spacing!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_timesteps + 1):  # the last: one step, t = 0, as "1"
            if len(range(0, num_timesteps, stride)) == wanted:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"steps {spacing!r}: no integer stride gives exactly {wanted} steps")
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"steps {spacing!r}: expected an integer, 'a,b,c' or 'ddimN'") from None
    if any(c < 1 for c in counts):
        raise ValueError(f"steps {spacing!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for index, count in enumerate(counts):
        size = size_per + (1 if index < extra else 0)
        if size < count:
            raise ValueError(f"steps {spacing!r}: cannot take {count} steps from {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def at(table: Tensor, i: int | Tensor) -> Tensor:
    """``table[i]`` as a 0-d tensor, without a host sync when ``i`` is a 0-d device tensor.

    Plain indexing with a 0-d integer tensor calls ``.item()`` (a device-to-host copy, which
    breaks CUDA-graph capture); ``take`` gathers on the device.
    """
    return table.take(i) if isinstance(i, Tensor) else table[i]


@dataclass(frozen=True)
class StepTables:
    """Per-step tables ``[S]`` on one device, indexed by the respaced step ``i`` (0 = cleanest).

    ``t``: original timesteps fed to the network (int64). ``sqrt_ac``, ``sqrt_one_minus_ac``:
    ``√ᾱ``, ``√(1−ᾱ)``. ``coef_x0``, ``coef_xt``: the DDPM posterior mean
    ``μ̃ = coef_x0·x̂0 + coef_xt·x_t``. ``noise_std``: ``√β̃`` (0 at ``i = 0``). ``x0_var``: ΠGDM's
    variance of ``x0 | x_t`` in image units, ``r²/4`` (``Schedule.pigdm_r2`` is in network units).
    ``pigdm_weight``: ``√ᾱ·r²·(1+v)^{-1/2}`` with ``v = β̃``. ``dps_weight``: DPS's step
    ``ζ = √ᾱ`` on the residual norm in network units, i.e. ``2√ᾱ`` on the norm in image units that
    the guidance measures.
    """

    t: Tensor
    sqrt_ac: Tensor
    sqrt_one_minus_ac: Tensor
    coef_x0: Tensor
    coef_xt: Tensor
    noise_std: Tensor
    x0_var: Tensor
    pigdm_weight: Tensor
    dps_weight: Tensor

    def __len__(self) -> int:
        return self.t.shape[0]


class Schedule:
    """A respaced DDPM schedule owning its float64 tables.

    Attributes (float64 ``[S]`` unless noted): ``timesteps`` (int64), ``betas``,
    ``alphas_cumprod``, ``alphas_cumprod_prev``, ``posterior_variance`` (β̃),
    ``posterior_mean_coef_x0``, ``posterior_mean_coef_xt``, and ``base_alphas_cumprod`` ``[T]``.
    """

    def __init__(self, steps: str | int | list[int] = "100", *, r2: str = "reference",
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        if r2 not in R2_RULES:
            raise ValueError(f"r2 must be one of {R2_RULES}, got {r2!r}")
        self.r2_rule = r2
        base_betas = linear_betas(num_train_timesteps)
        base_ac = torch.cumprod(1.0 - base_betas, dim=0)
        kept = space_timesteps(num_train_timesteps, steps)
        self.base_alphas_cumprod = base_ac
        self.timesteps = torch.tensor(kept, dtype=torch.int64)
        ac = base_ac[self.timesteps]
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1.0 - ac / ac_prev
        self.alphas_cumprod, self.alphas_cumprod_prev, self.betas = ac, ac_prev, betas
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_mean_coef_x0 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef_xt = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    @property
    def pigdm_r2(self) -> Tensor:
        """ΠGDM's ``r_t²``: ``v/(1+v)`` with ``v = β̃`` (reference) or ``1 − ᾱ`` (ΠGDM paper)."""
        if self.r2_rule == "pigdm":
            return 1.0 - self.alphas_cumprod
        v = self.posterior_variance
        return v / (1.0 + v)

    @property
    def pigdm_weight(self) -> Tensor:
        """Step on the guidance: ``√ᾱ · r² · (1 + v)^{-1/2}``, ``v = β̃``."""
        v = self.posterior_variance
        return self.alphas_cumprod.sqrt() * self.pigdm_r2 / (1.0 + v).sqrt()

    def tables(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> StepTables:
        """All per-step tables, cast once and moved to ``device`` (``StepTables`` for the units)."""
        ac = self.alphas_cumprod
        values = {
            "t": self.timesteps,
            "sqrt_ac": ac.sqrt(),
            "sqrt_one_minus_ac": (1.0 - ac).sqrt(),
            "coef_x0": self.posterior_mean_coef_x0,
            "coef_xt": self.posterior_mean_coef_xt,
            "noise_std": self.posterior_variance.sqrt(),
            "x0_var": self.pigdm_r2 / NETWORK_SCALE**2,
            "pigdm_weight": self.pigdm_weight,
            "dps_weight": NETWORK_SCALE * ac.sqrt(),
        }
        return StepTables(**{
            name: v.to(device) if v.dtype == torch.int64 else v.to(device=device, dtype=dtype)
            for name, v in values.items()
        })
