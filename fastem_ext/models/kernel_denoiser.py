"""Plug-and-play blur-kernel denoisers, conditioned on the noise level σ_d (the M-step's Eq. 25).

Two architectures, both fully convolutional, both taking the 2-channel input ``[kernel, σ_d map]``:

- ``dncnn`` (the bundled 33×33 model): DnCNN-like, ``depth`` 3×3 conv layers of ``width`` channels
  with ReLU, no batch norm (it would make eval differ from training on tiny batches). Receptive
  field ``2·depth + 1`` px (11 px for the reference 5 × 32).
- ``unet`` (the bundled 64×64 model): a small U-Net with ``levels`` 2× down-samplings (widths 16,
  32, 48, 64; 275 k parameters). With 3 levels its receptive field is 92 px (measured from the
  gradient support), more than a whole 64×64 kernel, and it trains faster than the 5 × 32 DnCNN
  does at 64×64 (0.29 vs 0.45 s per step of 32 on one CPU thread). Inputs are zero-padded to a
  multiple of ``2**levels``.

Conventions shared by both (EDM-style preconditioning, which lets one network work over three
decades of σ_d; ``σ_data`` is a per-model constant near a trajectory pixel's value, 0.02–0.03)::

    D(k, σ_d) = c_skip · k + c_out · f([c_in · k, log(σ_d / 0.01) / 2.5])
    c_skip = σ_data² / (σ_d² + σ_data²),  c_out = σ_d σ_data / √(σ_d² + σ_data²),
    c_in = 1 / √(σ_d² + σ_data²)

- At small σ_d, ``D ≈ k + σ_d f``: the network predicts the correction in units of σ_d, and
  ``D(k, 0) = k`` exactly. At large σ_d, ``D ≈ σ_data f``: it predicts the kernel itself, which a
  residual form could only do by cancelling its input with a σ-dependent product.
- The output is not clamped or normalised: the M-step does that after the denoiser.

Weights ship as ``fastem_ext/weights/kernel_denoiser_{33,64}.safetensors`` (float32) with their
architecture in the safetensors metadata; :func:`load_kernel_denoiser` picks one by kernel size.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "BUNDLED_SIZES",
    "KernelDenoiser",
    "bundled_size",
    "bundled_weights_path",
    "load_kernel_denoiser",
    "save_kernel_denoiser",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BUNDLED_SIZES = (33, 64)
# Sizes up to this use the 33×33 model, larger ones the 64×64 model.
_SIZE_SPLIT = 48


def bundled_size(kernel_size: int) -> int:
    """Which bundled model (33 or 64) serves kernels of side ``kernel_size``: the nearer training
    size (33 up to 48 px, 64 above)."""
    return BUNDLED_SIZES[0] if kernel_size <= _SIZE_SPLIT else BUNDLED_SIZES[1]
_SIGMA_REF = 0.01
_SIGMA_FLOOR = 1e-6  # log encoding only; D(k, 0) = k holds through c_out = 0


class _DnCNN(nn.Module):
    """``[B, 2, H, W] → [B, 1, H, W]``: ``depth`` 3×3 convs, ReLU between them."""

    def __init__(self, width: int = 32, depth: int = 5) -> None:
        super().__init__()
        chans = [2] + [width] * (depth - 1) + [1]
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in itertools.pairwise(chans)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
        )


class _UNet(nn.Module):
    """``[B, 2, H, W] → [B, 1, H, W]``, H and W multiples of ``2**levels``.

    Widths ``width · (1, 2, 3, 4, …)``; strided 2×2 convs down, transposed 2×2 convs up, skip
    concatenation at every level.
    """

    def __init__(self, width: int = 16, levels: int = 3) -> None:
        super().__init__()
        w = [width * (i + 1) for i in range(levels + 1)]
        self.levels = levels
        self.inc = _Block(2, w[0])
        self.down = nn.ModuleList(nn.Conv2d(w[i], w[i + 1], 2, stride=2) for i in range(levels))
        self.enc = nn.ModuleList(_Block(w[i + 1], w[i + 1]) for i in range(levels))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(levels)
        )
        self.dec = nn.ModuleList(_Block(2 * w[i], w[i]) for i in range(levels))
        self.out = nn.Conv2d(w[0], 1, 1)
        # He init: the deepest path has 21 layers, and PyTorch's default init shrinks the signal
        # ~6× in variance per ReLU layer, so the bottleneck would start mute and learn slowly
        # (measured: relative loss 0.48 vs 0.71 after 300 steps on 32×32 kernels).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for i in range(self.levels):
            skips.append(self.enc[i](F.relu(self.down[i](skips[-1]))))
        h = skips.pop()
        for i in reversed(range(self.levels)):
            h = self.dec[i](torch.cat((F.relu(self.up[i](h)), skips.pop()), dim=1))
        return self.out(h)


class KernelDenoiser(nn.Module):
    """Noise-level-conditioned kernel denoiser ``D(k, σ_d)`` (preconditioning: module docstring).

    Call as ``denoiser(kernel, sigma_d)``: ``kernel`` is ``[K, K]`` or ``[B, 1, K, K]``, ``sigma_d``
    a float, a 0-d tensor or a ``[B]`` tensor (on the kernel's device); returns the shape of
    ``kernel``. :meth:`forward_map` takes the raw 2-channel ``[B, 2, K, K]`` input instead.
    """

    def __init__(self, arch: str = "dncnn", *, sigma_data: float = 0.03, **arch_kw: int) -> None:
        super().__init__()
        nets = {"dncnn": _DnCNN, "unet": _UNet}
        if arch not in nets:
            raise ValueError(f"arch must be one of {sorted(nets)}, got {arch!r}")
        self.config = {"arch": arch, "sigma_data": float(sigma_data), **arch_kw}
        self.net = nets[arch](**arch_kw)
        self.sigma_data = float(sigma_data)
        self._multiple = 2 ** arch_kw.get("levels", 3) if arch == "unet" else 1

    def forward(
        self, kernel: torch.Tensor, sigma_d: float | torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """Denoise ``kernel`` (``[K, K]`` or ``[B, 1, K, K]``) at noise level ``sigma_d`` ≥ 0.

        ``check=True`` validates the inputs (finite, non-zero sum per kernel, ``sigma_d >= 0``) and
        raises ValueError; on a tensor input that costs one host sync. The M-step's inner loop
        passes ``check=False``, which does no host sync at all.
        """
        if kernel.dim() == 2:
            return self.forward(kernel[None, None], sigma_d, check=check)[0, 0]
        if kernel.dim() != 4 or kernel.shape[1] != 1:
            raise ValueError(f"kernel must be [K, K] or [B, 1, K, K], got {tuple(kernel.shape)}")
        b = kernel.shape[0]
        if isinstance(sigma_d, torch.Tensor):
            sigma = sigma_d.to(device=kernel.device, dtype=kernel.dtype)  # no-op when on device
        else:  # a fill, not a host-to-device copy: no sync, and capturable in a CUDA graph
            sigma = torch.full((), float(sigma_d), dtype=kernel.dtype, device=kernel.device)
        if sigma.dim() > 1 or (sigma.dim() == 1 and sigma.shape[0] not in (1, b)):
            shape = tuple(sigma.shape)
            raise ValueError(f"sigma_d must be a float, 0-d or [B] tensor, got shape {shape}")
        if check:
            _check_inputs(kernel, sigma_d, sigma)
        sigma_map = sigma.reshape(-1, 1, 1, 1).expand(b, 1, *kernel.shape[2:])
        return self.forward_map(torch.cat((kernel, sigma_map), dim=1))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, 2, K, K]`` = ``[kernel, σ_d map]`` → denoised kernel ``[B, 1, K, K]``."""
        param = next(self.parameters())
        k = x[:, :1].to(param.dtype)
        sigma = x[:, 1:2].to(param.dtype)
        var = sigma.square() + self.sigma_data**2
        c_skip = self.sigma_data**2 / var
        c_out = sigma * self.sigma_data * torch.rsqrt(var)
        noise_level = torch.log(sigma.clamp_min(_SIGMA_FLOOR) / _SIGMA_REF) / 2.5
        feats = torch.cat((k * torch.rsqrt(var), noise_level.expand_as(k)), dim=1)
        h, w = feats.shape[-2:]
        m = self._multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # zeros are what a kernel looks like outside its support; σ_d stays σ_d
            pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            feats = torch.cat(
                (F.pad(feats[:, :1], pad), F.pad(feats[:, 1:], pad, mode="replicate")), dim=1
            )
        f = self.net(feats)[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return (c_skip * k + c_out * f).to(x.dtype)


def _check_inputs(kernel: torch.Tensor, sigma_d: float | torch.Tensor, sigma: torch.Tensor) -> None:
    """Raise ValueError on bad inputs. One host sync for all checks together."""
    if not isinstance(sigma_d, torch.Tensor) and not (
        math.isfinite(float(sigma_d)) and float(sigma_d) >= 0
    ):
        raise ValueError(f"sigma_d must be finite and >= 0, got {sigma_d}")
    sums = kernel.sum(dim=(1, 2, 3))
    flags = torch.stack((
        ~torch.isfinite(kernel).all(),
        (sums.abs() <= torch.finfo(kernel.dtype).tiny).any(),
        (~torch.isfinite(sigma) | (sigma < 0)).any(),
    )).tolist()
    if flags[0]:
        raise ValueError("kernel must be finite (found NaN or inf)")
    if flags[1]:
        raise ValueError("kernel must not sum to 0")
    if flags[2]:
        raise ValueError("sigma_d must be finite and >= 0")


def bundled_weights_path(size: int) -> Path:
    """Path of the bundled weights for kernel side ``size`` (see :func:`load_kernel_denoiser`)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"size must be an int, got {type(size).__name__}")  # noqa: TRY004
    if not 3 <= size <= 128:
        raise ValueError(f"size must be in [3, 128] for the bundled kernel denoisers, got {size}")
    return WEIGHTS_DIR / f"kernel_denoiser_{bundled_size(size)}.safetensors"


def load_kernel_denoiser(
    size: int, device: torch.device | str | None = None, *, path: str | Path | None = None
) -> KernelDenoiser:
    """The bundled denoiser for kernels of side ``size``, in eval mode, gradients off.

    Sizes 3..48 get the 33×33 model, sizes 49..128 the 64×64 model (both are fully convolutional;
    each was trained on generator kernels whose extent scales with its own size, so the nearer
    training size is the better prior). Other sizes raise ValueError. ``path`` overrides the file.
    """
    file = Path(path) if path is not None else bundled_weights_path(size)
    if not file.is_file():
        raise FileNotFoundError(f"kernel denoiser weights not found: {file}")
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{file} has no 'config' metadata; not a kernel denoiser file")
    model = KernelDenoiser(**json.loads(meta["config"]))
    state = {k: v.float() for k, v in load_file(str(file)).items()}
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def save_kernel_denoiser(
    model: KernelDenoiser, path: str | Path, extra: dict[str, str] | None = None
) -> None:
    """Write ``model`` as float32 safetensors, its architecture in the metadata."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config), "format": "fastem.kernel_denoiser.v1"}
    save_file(state, str(path), metadata={**meta, **(extra or {})})
