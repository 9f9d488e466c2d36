"""Masked sums, means and whitening over padded [B, T] tensors: ground floor, used by reward sources and trainers.

Here rather than in ``rl/`` so that reward sources (``rewards/``) never import the consumers (``rl/``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is 1."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1 (0 when the mask is empty rather than NaN)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean if shift_mean) over masked entries; 0 on padding.

    ``reduce`` sums a tensor over the processes of a data-parallel run (tokencredit.distributed): the mean and
    variance are then those of every process's entries together, as one process holding them all would compute.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        total, n = reduce(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
        mean = total / n.clamp(min=1)
        var = reduce(masked_sum((x - mean) ** 2, mask).reshape(1))[0] / n.clamp(min=1)
        if n > 1:
            var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
