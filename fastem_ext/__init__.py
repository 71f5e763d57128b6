"""fastem: blind image deblurring with a diffusion prior (Fast Diffusion EM, WACV 2024)."""

from . import metrics
from .mstep import HQSConfig, estimate_kernel
from .physics import blur, blur_adjoint, dirac_kernel, gaussian_kernel, otf2psf, psf2otf
from .schedule import Schedule

__all__ = [
    "HQSConfig",
    "Schedule",
    "blur",
    "blur_adjoint",
    "dirac_kernel",
    "estimate_kernel",
    "gaussian_kernel",
    "metrics",
    "otf2psf",
    "psf2otf",
]
