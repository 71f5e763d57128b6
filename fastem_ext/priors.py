"""The prior registry: which ε-network a name or a path means, and where its weights live.

``natural`` — the project's bundled natural-image prior (``fastem_ext/weights``).
``gaussian`` — a stationary Gaussian image model with an exact ε-predictor (no weights). It knows
only the image's power spectrum, so it cannot tell a kernel from its phase-shifted twins: use it
for tests and smoke runs, not to estimate real kernels.
``ffhq`` / ``imagenet`` — the guided-diffusion FFHQ-256 and ImageNet-256 unconditional checkpoints
that users bring, looked up in ``$FASTEM_WEIGHTS`` or ``~/.cache/fastem``. Nothing is downloaded.
A path to a guided-diffusion ``.pt`` is recognised by its keys; a ``.safetensors`` path is a natural
prior's weights (``python/train_prior.py`` writes them). An ``nn.Module`` or callable
``eps(x_t, t)`` is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

CHECKPOINTS = {
    "ffhq": ("ffhq_10m.pt", "the guided-diffusion FFHQ-256 model used by DPS and BlindDPS"),
    "imagenet": ("256x256_diffusion_uncond.pt",
                 "OpenAI's guided-diffusion ImageNet-256 unconditional model"),
}
NAMES = ("natural", "gaussian", *CHECKPOINTS)


@dataclass
class Prior:
    """An ε-network with what the engine needs to know about it.

    model: ``eps(x_t [n, 3, H, W], t [n]) -> [n, 3 or 6, H, W]``; size_multiple: H and W must be
    multiples of it; name: for reports.
    """

    name: str
    model: Callable[[Tensor, Tensor], Tensor]
    size_multiple: int


def weights_dir() -> Path:
    """Where user-supplied checkpoints live: ``$FASTEM_WEIGHTS`` or ``~/.cache/fastem``."""
    return Path(os.environ.get("FASTEM_WEIGHTS", Path.home() / ".cache" / "fastem"))


def load_prior(spec: str | os.PathLike | nn.Module | Callable | Prior,
               device: torch.device) -> Prior:
    """Resolve ``spec`` (a name from ``NAMES``, a checkpoint path, a module or a callable)."""
    if isinstance(spec, Prior):
        return spec
    if isinstance(spec, nn.Module):
        _freeze(spec, device)
        return Prior(type(spec).__name__, spec, getattr(spec, "size_multiple", 1))
    if callable(spec):
        return Prior(getattr(spec, "__name__", "callable"), spec, 1)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"prior must be a name, a path or an eps(x_t, t) module; got "
                         f"{type(spec).__name__}")
    if spec == "gaussian":
        from .models.gaussian_prior import GaussianPrior

        return Prior("gaussian", GaussianPrior().to(device), 1)
    if spec == "natural":
        from .models.natural_prior import load_natural_prior

        model = load_natural_prior(device=device)
        return Prior("natural", _freeze(model, device), model.size_multiple)
    if spec in CHECKPOINTS:
        filename, what = CHECKPOINTS[spec]
        path = weights_dir() / filename
        if not path.is_file():
            raise ValueError(
                f"prior {spec!r} needs {filename} ({what}). Put the file at {path} (or set "
                "FASTEM_WEIGHTS to the folder that holds it); fastem never downloads weights."
            )
        return _from_checkpoint(path, spec, device)
    if isinstance(spec, (str, os.PathLike)) and Path(spec).suffix == ".safetensors":
        from .models.natural_prior import load_natural_prior

        try:
            model = load_natural_prior(device=device, path=spec)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"prior {os.fspath(spec)!r}: {err}") from None
        return Prior(Path(spec).stem, _freeze(model, device), model.size_multiple)
    if isinstance(spec, (str, os.PathLike)) and Path(spec).suffix in (".pt", ".pth"):
        if not Path(spec).is_file():
            raise ValueError(f"prior checkpoint not found: {spec}")
        return _from_checkpoint(Path(spec), Path(spec).stem, device)
    raise ValueError(
        f"prior must be one of {', '.join(map(repr, NAMES))}, a path to a guided-diffusion .pt "
        f"checkpoint or to natural-prior weights (.safetensors), or an eps(x_t, t) module; "
        f"got {spec!r}"
    )


def _from_checkpoint(path: Path, name: str, device: torch.device) -> Prior:
    from .models.unet import load_guided_diffusion_checkpoint

    try:
        model = load_guided_diffusion_checkpoint(path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    return Prior(name, _freeze(model, device), model.size_multiple)


def _freeze(model: nn.Module, device: torch.device) -> nn.Module:
    # Guidance needs the gradient with respect to the input only.
    return model.to(device).eval().requires_grad_(False)
