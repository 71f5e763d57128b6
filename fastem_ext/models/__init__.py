"""ε-networks and priors."""

from .gaussian_prior import GaussianPrior
from .unet import UNet, load_guided_diffusion_checkpoint

__all__ = ["GaussianPrior", "UNet", "load_guided_diffusion_checkpoint"]
