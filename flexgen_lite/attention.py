"""Attention over the KV cache, one cache part (a set of sequences on one tier) at a time."""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from . import native


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           sparsity: float = 1.0) -> torch.Tensor:
    """q (B, heads, t, hd) over k, v (B, kv_heads, L, hd) with a bool mask (B, 1, t, L).

    sparsity < 1 (decode only): attend to the top ceil(sparsity * L) scoring positions per head."""
    if sparsity < 1 and q.shape[2] == 1:
        return topk_attend(q, k, v, mask, max(1, math.ceil(sparsity * k.shape[2])))
    if q.shape[2] == 1 and q.device.type == "cpu" and q.shape[0] and native_decode_agrees():
        out = native.decode_attention(q, k, v, mask)
        if out is not None:
            return out
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def topk_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, top: int) -> torch.Tensor:
    """Decode attention reading only the values of the `top` highest-scoring cached positions (FlexGen)."""
    b, heads, _, hd = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.view(b, kv_heads, group, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) / math.sqrt(hd)  # (b, kv_heads, group, L)
    scores = scores.float().masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    top_scores, index = scores.topk(min(top, length), dim=-1)
    probs = top_scores.softmax(-1).to(v.dtype)  # (b, kv_heads, group, top)
    picked = v[:, :, None].expand(b, kv_heads, group, length, hd).gather(
        3, index[..., None].expand(*index.shape, hd))
    return (probs[..., None] * picked).sum(-2).view(b, heads, 1, hd)


@functools.cache
def native_decode_agrees() -> bool:
    """The C decode attention (flexgen_lite.native: ~4x torch's SDPA at decode batches on a CPU, which spends
    microseconds per sequence and head) is built here and matches SDPA on random fp32 inputs with grouped heads,
    masked positions and a strided cache (checked once per process); otherwise SDPA is used."""
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 3, 3, 11, 72, generator=g)  # k and v: 3 sequences, 3 kv heads, 9 of 11 positions seen
    k, v = cache[0, :, :, :9], cache[1, :, :, :9]
    q = torch.randn(3, 6, 1, 72, generator=g)  # 6 query heads: 2 per kv head
    mask = torch.rand(3, 1, 1, 9, generator=g) > 0.3
    mask[..., 0] = True
    out = native.decode_attention(q, k, v, mask)
    if out is None:
        return False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
        warnings.warn("the built decode-attention kernel disagrees with torch here: using torch's", stacklevel=2)
        return False
    return True
