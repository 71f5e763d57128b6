"""A dispatch mode for CPU-only tests of what CUDA-graph capture needs.

Run on the ``meta`` device under :class:`NoHostTensors`, a step fails if any op receives a host
tensor (a host-to-device copy under capture) or reads a value back (``.item()`` raises on meta
tensors) — the two ways a captured CUDA step breaks. Capture itself is tested on a GPU
(``cuda``-marked tests).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class NoHostTensors(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for leaf in tree_leaves((args, kwargs or {})):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                raise AssertionError(f"{func} got a host tensor {tuple(leaf.shape)}")
        return func(*args, **(kwargs or {}))
