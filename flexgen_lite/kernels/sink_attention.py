"""Prefill attention with sinks (gpt-oss) from a fused SDPA kernel and its log-sum-exp.

A sink is a head's extra logit in every softmax denominator whose value is dropped. With lse the log-sum-exp of a
row's scaled scores, softmax with the sink is softmax without it times exp(lse) / (exp(lse) + exp(sink)), that is
sigmoid(lse - sink): so a kernel that returns lse (torch's memory-efficient attention on CUDA, its flash attention
on a CPU) computes it without forming the scores in fp32 (`attention.scored_attend`, a chunk of queries at a time).
Used where the C prefill kernel (native/prefill.c, which takes sinks itself) does not run: on a GPU, and on CPUs
without AVX-512. Checked once per (device, dtype) against the whole-score path before use."""

from __future__ import annotations

import functools
import warnings

import torch

from .decode_attention_triton import with_sinks

ALIGN = 16  # CUDA's memory-efficient kernel reads its bias in rows of a multiple of 16 elements


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           sinks: torch.Tensor) -> torch.Tensor | None:
    """softmax over [q k^T / sqrt(d), sink] of q (B, heads, t, d) over k, v (B, kv_heads, L, d) under a bool `mask`
    (B or 1, 1, t, L; None: causal, t = L), the sink's share dropped, times v; None where no kernel here returns
    its log-sum-exp or the check failed."""
    if not agrees(q.device, q.dtype):
        return None
    return _attend(q, k, v, mask, sinks)


def _attend(q, k, v, mask, sinks):
    b, heads, t, _ = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)[None, None]
    group = heads // kv_heads
    padded = -(-length // ALIGN) * ALIGN
    bias = torch.zeros(*mask.shape[:3], padded, dtype=q.dtype, device=q.device)[..., :length]
    bias = bias.masked_fill_(~mask, float("-inf")).expand(b, group, t, length)
    sinks = sinks.to(q.device, torch.float32).view(1, heads, 1)
    parts = []
    for kh in range(kv_heads):  # neither kernel groups heads: a kv head's k and v expanded (views) to its queries
        qh = q[:, kh * group:(kh + 1) * group]
        kh_, vh = (x[:, kh:kh + 1].expand(b, group, length, x.shape[-1]) for x in (k, v))
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh_, vh, bias, True)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh_, vh, 0.0, False,
                                                                                  attn_mask=bias)
        share = torch.sigmoid(lse[..., :t].float() - sinks[:, kh * group:(kh + 1) * group])
        parts.append((out.float() * share[..., None]).to(q.dtype))
    return parts[0] if kv_heads == 1 else torch.cat(parts, 1)


@functools.cache
def agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the path runs on `device` in `dtype` and matches attention from whole scores on random inputs: grouped
    heads, left padding, a window, a length that is not a multiple of ALIGN (checked once; a warning if not)."""
    g = torch.Generator().manual_seed(11)
    t, keys = 21, torch.arange(21)
    q = torch.randn(2, 4, t, 64, generator=g)
    k, v = (torch.randn(2, 2, t, 64, generator=g) for _ in "kv")
    sinks = torch.randn(4, generator=g) * 2
    pad = torch.tensor([0, 6])[:, None, None]
    mask = ((keys[None, :] <= keys[:, None]) & (keys[None, :] > keys[:, None] - 8))[None] & (
        (keys >= pad) | (keys == keys[:, None])[None])
    mask = mask[:, None]
    want = with_sinks(q, k, v, mask, sinks)
    try:
        got = _attend(*(x.to(device, dtype) for x in (q, k, v)), mask.to(device), sinks.to(device)).float().cpu()
    except Exception as e:  # noqa: BLE001 - no such kernel here, or it refuses these inputs
        warnings.warn(f"attention with sinks from whole scores on {device} ({dtype}): {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", stacklevel=3)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not float((got - want).abs().max()) <= tolerance:
        warnings.warn(f"fused attention with sinks disagrees on {device} ({dtype}): from whole scores", stacklevel=3)
        return False
    return True
