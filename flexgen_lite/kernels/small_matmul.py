"""Dense products of a few rows on a CPU (decode steps of small batches): native.dense_gemv reads each weight
once at the memory's speed, where torch's matmul reads a cold weight at about half of it (its blocking is for
many rows). Where the kernel wins (rows, shape, dtype) is read from the profile, which measures both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..system.profile_store import cpu_profile, profile_dependent
from . import native


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by native.dense_gemv where it is faster for this product here."""
    return linears(x, [(weight, bias)])[0]


def linears(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    """F.linear(x, w, b) for each (w, b) of `weights` (dense; sharing x: q, k and v), in one call to the kernel
    where it is faster for every one of them here, else by torch."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if x.device.type == "cpu" and rows and all(w.dim() == 2 and gemv_wins(x.dtype, rows, *w.shape) for w, _ in weights):
        outs = native.dense_gemv_many(x.reshape(rows, k).contiguous(), weights)
        if outs is not None:
            return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]
    return [F.linear(x, w, b) for w, b in weights]


@profile_dependent
def gemv_wins(dtype: torch.dtype, rows: int, n: int, k: int) -> bool:
    """Whether the C kernel multiplies `rows` rows by a weight (n, k) in `dtype` faster than torch here, as this
    machine's stored profile measured both (the cost model reads the same); without a profile, at one row (a
    read of the weight, which the kernel makes at the memory's speed)."""
    hw = cpu_profile()
    if hw is None:
        return rows == 1
    return hw.gemv_wins(str(dtype).removeprefix("torch."), rows, k, n)
