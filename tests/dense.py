"""Brute-force, loop-based operators: test oracles independent of the FFT code."""

from __future__ import annotations

import torch


def circular_convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """True circular convolution by direct summation; kernel centre at (K1//2, K2//2).

    y[i, j] = Σ_{a,b} k[a, b] x[(i − a + c1) mod H, (j − b + c2) mod W]. x: [..., H, W].
    """
    k1, k2 = kernel.shape
    c1, c2 = k1 // 2, k2 // 2
    out = torch.zeros_like(x)
    for a in range(k1):
        for b in range(k2):
            out = out + kernel[a, b] * torch.roll(x, shifts=(a - c1, b - c2), dims=(-2, -1))
    return out


def operator_matrix(apply, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense matrix [N_out, N_in] of a linear map, column by column (float64)."""
    n_in = 1
    for s in shape:
        n_in *= s
    columns = []
    for j in range(n_in):
        e = torch.zeros(n_in, dtype=torch.float64)
        e[j] = 1.0
        columns.append(apply(e.reshape(shape)).reshape(-1))
    return torch.stack(columns, dim=1)


def origin_kernel_matrix(x: torch.Tensor) -> torch.Tensor:
    """Matrix X [N, N] with X z = z ⊛ x for a full-grid kernel z whose centre is at the origin."""
    height, width = x.shape

    def apply(z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for a in range(height):
            for b in range(width):
                if z[a, b] != 0:
                    out = out + z[a, b] * torch.roll(x, shifts=(a, b), dims=(0, 1))
        return out

    return operator_matrix(apply, (height, width))
