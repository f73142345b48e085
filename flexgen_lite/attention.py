"""Attention over the KV cache, one cache part (a set of sequences on one tier) at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, heads, t, hd) over k, v (B, kv_heads, L, hd) with a bool mask (B, 1, t, L)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
