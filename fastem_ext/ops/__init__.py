"""Fused ops of one diffusion step: outside the network (issue 7), and the network's
GroupNorm + scale-shift + SiLU (issue 14).

One op per file, each with its pure-torch reference (the specification, the CPU fallback and the
test oracle), a Triton kernel, the C++ op ``torch.ops.fastem.<name>`` (csrc/: CPU always, CUDA
where built) and the fake kernels that let ``torch.compile`` and CUDA-graph capture see through
them. ``_backend`` picks the implementation per device; ``FASTEM_BACKEND`` forces one.

Importing this package compiles and loads nothing: the C++ library is loaded on first use.
"""

from ._backend import table_index
from .ddpm_update import ddpm_coefficients, ddpm_update, predict_x0
from .group_norm_silu import group_norm_silu
from .kernel_project import kernel_project
from .pigdm_filter import pigdm_filter
from .spectral_sums import spectral_sums
from .wiener_z import wiener_z

__all__ = [
    "ddpm_coefficients",
    "ddpm_update",
    "group_norm_silu",
    "kernel_project",
    "pigdm_filter",
    "predict_x0",
    "spectral_sums",
    "table_index",
    "wiener_z",
]
