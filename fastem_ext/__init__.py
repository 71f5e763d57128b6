"""fastem: blind image deblurring with a diffusion prior (Fast Diffusion EM, WACV 2024).

Importing the package compiles nothing and loads no weights.
"""

from . import metrics
from .api import METHODS, Result, run
from .motion import motion_kernel, motion_kernels
from .mstep import HQSConfig, estimate_kernel
from .noise import estimate_noise
from .physics import blur, blur_adjoint, dirac_kernel, gaussian_kernel, otf2psf, psf2otf
from .schedule import Schedule

__all__ = [
    "METHODS",
    "HQSConfig",
    "Result",
    "Schedule",
    "blur",
    "blur_adjoint",
    "dirac_kernel",
    "estimate_kernel",
    "estimate_noise",
    "gaussian_kernel",
    "metrics",
    "motion_kernel",
    "motion_kernels",
    "otf2psf",
    "psf2otf",
    "run",
]
