"""fastem: blind image deblurring with a diffusion prior (Fast Diffusion EM, WACV 2024).

Importing the package compiles nothing and loads no weights.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same names, for type checkers and tests/test_layers.py's import walk
    from . import metrics
    from .aot import export, load_package
    from .api import Result, run, run_together
    from .batch import BatchResult, run_batch
    from .motion import motion_kernel, motion_kernels
    from .mstep import HQSConfig, estimate_kernel
    from .noise import estimate_noise
    from .physics import blur, blur_adjoint, dirac_kernel, gaussian_kernel, otf2psf, psf2otf
    from .restarts import Diverged
    from .schedule import Schedule
    from .settings import METHODS

# The public names, imported on first use (PEP 562): ``import fastem_ext`` and the ``fastem``
# command's start-up import nothing heavy until a name is used, so Ctrl-C there can be caught.
_EXPORTS = {
    "METHODS": ".settings", "Result": ".api", "run": ".api", "run_together": ".api",
    "BatchResult": ".batch", "run_batch": ".batch",
    "export": ".aot", "load_package": ".aot",
    "motion_kernel": ".motion", "motion_kernels": ".motion",
    "HQSConfig": ".mstep", "estimate_kernel": ".mstep",
    "estimate_noise": ".noise",
    "blur": ".physics", "blur_adjoint": ".physics", "dirac_kernel": ".physics",
    "gaussian_kernel": ".physics", "otf2psf": ".physics", "psf2otf": ".physics",
    "Diverged": ".restarts",
    "Schedule": ".schedule",
}


def __getattr__(name: str):
    if name == "metrics":
        return import_module(".metrics", __name__)
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "METHODS",
    "BatchResult",
    "Diverged",
    "HQSConfig",
    "Result",
    "Schedule",
    "blur",
    "blur_adjoint",
    "dirac_kernel",
    "estimate_kernel",
    "estimate_noise",
    "export",
    "gaussian_kernel",
    "load_package",
    "metrics",
    "motion_kernel",
    "motion_kernels",
    "otf2psf",
    "psf2otf",
    "run",
    "run_batch",
    "run_together",
]
