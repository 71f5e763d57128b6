"""ε-networks and priors."""

from .gaussian_prior import GaussianPrior

__all__ = ["GaussianPrior"]
