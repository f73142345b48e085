"""Prefill attention on a CPU by the C kernel (native/prefill.c: bf16 with the CPU's bf16 dot instruction, fp32
with AVX-512), where this machine's profile measured it faster than torch's scaled_dot_product_attention;
torch's otherwise.

The kernel takes each query row's visible keys as one interval [lo, hi], which is what the engine's prefill
masks are (causal, left padding hidden, a padding row seeing itself); any other mask is left to torch."""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
import weakref

import torch
import torch.nn.functional as F

from ..system.profile_store import cpu_profile
from . import native

KINDS = {torch.bfloat16: native.OUT_KIND[torch.bfloat16], torch.float32: native.OUT_KIND[torch.float32]}
_last: tuple = (None, -1, None)  # (weak reference to a mask, its version, its intervals): one per prefill step


def intervals(mask: torch.Tensor | None, t: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lo, hi), int32 (B, t): each query row's first and last visible key, for a bool mask (B, 1, t, length)
    that is one interval per row (None: causal, t == length); None when it is not."""
    if mask is None:
        if t != length:
            return None
        hi = torch.arange(t, dtype=torch.int32)[None]
        return torch.zeros_like(hi), hi
    global _last
    ref, version, kept = _last  # one read: another thread's engine may replace it meanwhile
    if ref is not None and ref() is mask and version == mask._version:
        return kept
    rows = mask.reshape(mask.shape[0], t, length).to(torch.uint8)
    lo = rows.argmax(-1).to(torch.int32).contiguous()
    hi = (length - 1 - rows.flip(-1).argmax(-1)).to(torch.int32).contiguous()
    keys = torch.arange(length)
    one_interval = torch.equal((keys >= lo[..., None]) & (keys <= hi[..., None]), rows.bool())
    found = (lo, hi) if one_interval else None
    _last = (weakref.ref(mask), mask._version, found)
    return found


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d)) v of bf16 or fp32 q (B, heads, t, d) over k, v (B, kv_heads, L, d) under `mask`
    (bool (B, 1, t, L), or None: causal), by the C kernel; None where it cannot do this call here. sinks (heads,):
    each head's sink logit, a term of its softmax's denominator only (gpt-oss)."""
    lib, kind = native.library(), KINDS.get(q.dtype)
    b, heads, t, d = q.shape
    if (lib is None or kind is None or not lib.prefill_available(kind) or k.dtype != q.dtype
            or v.dtype != q.dtype or k.shape != v.shape or k.shape[0] != b or heads % k.shape[1] or d % 16 or d > 256
            or any(x.device.type != "cpu" or x.stride(-1) != 1 for x in (q, k, v))
            or mask is not None and (mask.dtype != torch.bool or mask.shape[-2:] != (t, k.shape[2]))):
        return None
    kv_heads, length = k.shape[1], k.shape[2]
    found = intervals(mask, t, length)
    if found is None:
        return None
    lo, hi = (x.expand(b, t).contiguous() for x in found)
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
        if sinks.shape != (heads,) or sinks.device.type != "cpu":
            return None
    out = torch.empty(b, heads, t, d, dtype=q.dtype)
    strides = [(ctypes.c_int64 * 3)(*x.stride()[:3]) for x in (q, k, v, out)]
    threads = native.threads()
    # each (sequence, head)'s blocks of 16 query rows dealt to `splits` items: ~4 items a thread at least
    splits = max(1, min(-(-t // 16), -(-4 * threads // (b * heads))))
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), lo.data_ptr(), hi.data_ptr(), out.data_ptr(), kind, heads,
            kv_heads, t, length, d, *strides, 1.0 / math.sqrt(d), None if sinks is None else sinks.data_ptr(), splits)
    items, team = b * heads * splits, native.team_threads()
    if team:
        lib.prefill_attention_team(*args, items, team)
    else:
        native.parallel(lambda begin, end: lib.prefill_attention(*args, begin, end), items,
                        cost=b * heads * t * length * d)
    return out


def prefill_wins(dtype: torch.dtype) -> bool:
    """Whether the C kernel runs prefill attention in `dtype` here: this machine's profile measured it faster
    than torch's (the cost model reads the same), and it agrees with torch (checked once)."""
    hw = cpu_profile()
    return hw is not None and hw.prefill_native_wins(str(dtype).removeprefix("torch.")) and prefill_agrees(dtype)


@functools.cache
def prefill_agrees(dtype: torch.dtype = torch.bfloat16) -> bool:
    """The kernel is built here for `dtype` and matches torch's SDPA on random inputs: grouped heads, left
    padding, a last partial block of rows (checked once per process); otherwise torch's is used."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 37, 64, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 37, 64, generator=g).to(dtype) for _ in range(2))
    keys = torch.arange(37)
    pad = torch.tensor([0, 5])
    mask = ((keys[None, :] <= keys[:, None])[None] & ((keys >= pad[:, None, None]) | (keys == keys[:, None])))[:, None]
    out = prefill_attention(q, k, v, mask)
    if out is None:
        return False
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    if not torch.allclose(out.float(), exact, rtol=2e-2, atol=2e-2):
        warnings.warn("the built prefill-attention kernel disagrees with torch here: using torch's", stacklevel=2)
        return False
    return True
