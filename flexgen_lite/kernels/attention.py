"""Attention over the KV cache, one cache part (a set of sequences on one tier) at a time.

On CUDA the SDPA kernel is chosen here, not left to torch: on sm90 torch ranks cuDNN attention first, and cuDNN
builds a plan for every new shape (each decode step's cache length), tens to hundreds of ms each."""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import decode_attention_triton as triton_decode
from . import native, sink_attention
from .prefill_attention import prefill_attention, prefill_wins

FLASH, EFFICIENT, MATH = SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
BACKEND_NAMES = {FLASH: "flash", EFFICIENT: "efficient", MATH: "math", SDPBackend.CUDNN_ATTENTION: "cudnn"}
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def sdpa_backends(device_type: str, dtype: torch.dtype, has_mask: bool) -> list[SDPBackend]:
    """The SDPA kernels allowed, best first; [] off CUDA (torch's own choice is kept there). Without a mask
    (a prefill with no padded row: causal; a decode step: every cached position seen) flash, which takes
    fp16 and bf16 only; memory-efficient attention, which takes any mask; math as the last resort."""
    if device_type != "cuda":
        return []
    flash = [FLASH] if not has_mask and dtype in FLASH_DTYPES else []
    return [*flash, EFFICIENT, MATH]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           sparsity: float = 1.0) -> torch.Tensor:
    """q (B, heads, t, hd) over k, v (B, kv_heads, L, hd) with a bool mask (B, 1, t, L); mask None: causal
    (t = L) or, for one query position, every position seen.

    sparsity < 1 (decode only): attend to the top ceil(sparsity * L) scoring positions per head."""
    return attend_named(q, k, v, mask, sparsity)[0]


def attend_named(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 sparsity: float = 1.0, native_prefill: bool = True, shared=None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """`attend`, and which kernel ran: triton (decode_attend), flash, efficient, math, default (CUDA), cpu-native,
    sdpa-cpu, topk, softcap, fused-sinks, sinks. native_prefill False: torch's prefill attention on a CPU even where
    the C kernel wins (the profile). shared: the rows' shared prefix positions, read from one row by the C decode kernel
    (shared_prefix.py). softcap: scores capped as cap * tanh(score / cap) (Gemma-2); sinks: each head's logit in the
    softmax's denominator (gpt-oss): the CPU's C kernels and the Triton decode kernel take them, a prefill's
    fused SDPA with its log-sum-exp (sink_attention) elsewhere; otherwise either is computed from the whole scores
    (`scored_attend`)."""
    decode = q.shape[2] == 1
    if softcap is None and sinks is not None and (found := _fused_sinks(q, k, v, mask, sinks, native_prefill,
                                                                         shared)):
        return found
    if softcap is not None or sinks is not None:
        return scored_attend(q, k, v, mask, softcap, sinks), "softcap" if softcap is not None else "sinks"
    if sparsity < 1 and decode:
        return topk_attend(q, k, v, mask, max(1, math.ceil(sparsity * k.shape[2]))), "topk"
    if decode and shared is None and (chosen := decode_attend(q, k, v, mask)) is not None:
        return chosen
    if q.device.type == "cuda":
        return _cuda_attend(q, k, v, mask)
    if decode and q.device.type == "cpu" and q.shape[0] and native_decode_agrees():
        seen = mask if mask is not None else torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
        out = native.decode_attention(q, k, v, seen, shared)
        if out is not None:
            return out, "cpu-native"
    if not decode and native_prefill and q.device.type == "cpu" and q.shape[0] and prefill_wins(q.dtype):
        out = prefill_attention(q, k, v, mask)
        if out is not None:
            return out, "cpu-native"
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and not decode,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out, f"sdpa-{q.device.type}"


def _fused_sinks(q, k, v, mask, sinks, native_prefill: bool, shared) -> tuple[torch.Tensor, str] | None:
    """Attention with sinks by a kernel that takes them: at decode the Triton kernel where chosen, else a CPU's C
    kernel; at prefill the CPU's C kernel where it wins, else a fused SDPA's log-sum-exp (sink_attention). None:
    none does here (the whole scores then)."""
    if q.shape[2] == 1:
        if shared is None and (chosen := decode_attend(q, k, v, mask, sinks=sinks)):
            return chosen
        if q.device.type == "cpu" and q.shape[0] and native_decode_agrees():
            seen = mask if mask is not None else torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
            out = native.decode_attention(q, k, v, seen, shared, sinks)
            return None if out is None else (out, "cpu-native")
        return None
    if q.device.type == "cpu" and q.shape[0] and native_prefill and prefill_wins(q.dtype):
        out = prefill_attention(q, k, v, mask, sinks)
        if out is not None:
            return out, "cpu-native"
    out = sink_attention.attend(q, k, v, mask, sinks)
    return None if out is None else (out, "fused-sinks")


_failed: set[tuple] = set()  # kinds of call whose chosen kernels failed: torch's default SDPA from then on
_chosen: dict[tuple, str] = {}  # kind of call -> the kernel torch picked among those allowed


DECODE_ENV = "FLEXGEN_LITE_DECODE_ATTENTION"  # "auto" (measured on CUDA), "sdpa", or a Triton kernel's name
# (TRITON_NAMES: the default variant for "triton") anywhere it runs
TRITON_NAMES = {"triton": "tiles", "triton-lanes": "lanes", "triton-lanes-ahead": "lanes-ahead"}  # name -> variant
_measured: dict[tuple, str] = {}  # kind of decode call -> the faster kernel, measured once


def decode_attend(q, k, v, mask, graphed: bool = False, sinks=None) -> tuple[torch.Tensor, str] | None:
    """One query position by the Triton split-KV kernel (decode_attention_triton), where it is chosen for this
    kind of call: on CUDA the fastest of its variants and SDPA, measured (once per kind: a few syncs; `graphed`: as
    replayed in a CUDA graph, as the constant-shape decode step runs it), anywhere it runs under
    FLEXGEN_LITE_DECODE_ATTENTION=triton (or a variant's name: TRITON_NAMES; a CPU: Triton's interpreter, tests).
    None: SDPA's turn. sinks (gpt-oss): measured against the whole scores' path (scored_attend), which SDPA's place
    takes. Returns the output and the kernel's name."""
    want = os.environ.get(DECODE_ENV, "auto")
    if q.shape[2] != 1 or want == "sdpa" or (want == "auto" and q.device.type != "cuda"):
        return None
    if want != "auto":  # a variant that does not take grouped heads: the default one
        name = want if TRITON_NAMES.get(want) in triton_decode.variants(q, k) else "triton"
        if not triton_decode.usable(q, k, sinks is not None, TRITON_NAMES[name]):
            return None
        return triton_decode.attend(q, k, v, mask, sinks=sinks, variant=TRITON_NAMES[name]), name
    # rows and positions by powers of two: rows finishing early or a growing cache re-measure a few times
    kind = (q.device, q.dtype, q.shape[0].bit_length(), q.shape[1], k.shape[1], q.shape[-1],
            k.shape[2].bit_length(), mask is None, sinks is None, graphed)
    chosen = _measured.get(kind)  # a decode step's every layer asks: the candidates only until measured
    if chosen is None:
        candidates = decode_candidates(q, k, v, mask, sinks)
        if not candidates.keys() & TRITON_NAMES.keys():
            return None
        chosen = faster(kind, candidates, q.device, graphed=graphed)
    if chosen not in TRITON_NAMES:
        return None
    return triton_decode.attend(q, k, v, mask, sinks=sinks, variant=TRITON_NAMES[chosen]), chosen


def decode_candidates(q, k, v, mask, sinks=None) -> dict:
    """{name: call} of the decode attention kernels to measure for this call: each Triton variant that takes it and
    passed its self-check here, then SDPA's place (the last: what a capture takes before anything is measured)."""
    candidates = {name: functools.partial(triton_decode.attend, q, k, v, mask, sinks=sinks, variant=variant)
                  for name, variant in TRITON_NAMES.items()
                  if variant in triton_decode.variants(q, k) and triton_decode.usable(q, k, sinks is not None, variant)}
    if sinks is None:
        candidates["sdpa"] = lambda: _cuda_attend(q, k, v, mask)
    else:
        candidates["sinks"] = lambda: scored_attend(q, k, v, mask, None, sinks)
    return candidates


def faster(kind: tuple, candidates: dict, device: torch.device, reps: int = 5, graphed: bool = False) -> str:
    """The name of the fastest of `candidates` (name -> call) for this kind of call: each run once (compiled,
    warmed), then `reps` times in turn, by the median; measured once per kind. graphed (CUDA): each captured into
    a graph and its replays timed, the device's time alone, as a captured step runs it (eager calls also pay
    their launches); the calls themselves where capturing fails. While a CUDA graph is captured nothing is timed:
    the kind's choice so far, else the last candidate (the default)."""
    if kind in _measured:
        return _measured[kind]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return list(candidates)[-1]
    for call in candidates.values():
        call()
    calls = dict(candidates)
    if graphed and device.type == "cuda":
        try:
            calls = {name: replayed(call, device) for name, call in candidates.items()}
        except Exception:  # noqa: BLE001 - a call that cannot be captured: timed as it is
            calls = dict(candidates)
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(timed_once(call, device))
    _measured[kind] = min(times, key=lambda name: statistics.median(times[name]))
    return _measured[kind]


def replayed(call, device: torch.device):
    """`call` captured once into a CUDA graph of its own: the graph's replay."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # I/O threads may use CUDA meanwhile
        call()
    return graph.replay


def timed_once(call, device: torch.device) -> float:
    """Seconds one call takes: on CUDA by events on the current stream, else by the clock."""
    if device.type != "cuda":
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    call()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


def _cuda_attend(q, k, v, mask) -> tuple[torch.Tensor, str]:
    causal = mask is None and q.shape[2] > 1
    grouped = k.shape[1] != q.shape[1]
    fold = grouped and not causal  # memory-efficient attention may not take grouped heads: fold them instead
    kind = (q.device, q.dtype, mask is not None, causal, grouped, q.shape[-1])
    if kind not in _failed:
        qf, mf = fold_groups(q, mask, k.shape[1]) if fold else (q, mask)
        gqa = grouped and not fold
        try:
            with sdpa_kernel(sdpa_backends("cuda", q.dtype, mask is not None), set_priority=True):
                out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, is_causal=causal, enable_gqa=gqa)
                name = _chosen.get(kind) or _chosen.setdefault(kind, _picked(qf, k, v, mf, causal, gqa))
            return (out.reshape(q.shape) if fold else out), name
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            _failed.add(kind)
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            warnings.warn(f"attention: the chosen kernels failed here ({reason}); "
                          "torch's default choice from now on", stacklevel=3)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)
    return out, "default"


def _picked(q, k, v, mask, causal: bool, gqa: bool) -> str:
    """The kernel torch runs for these inputs among those allowed now (asked once per kind of call)."""
    try:
        backend = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, enable_gqa=gqa))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return "sdpa"
    return BACKEND_NAMES.get(backend, backend.name.lower())


def fold_groups(q: torch.Tensor, mask: torch.Tensor | None, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped-query attention as plain attention: the query heads sharing a kv head become query positions
    of it, q (B, heads, t, hd) -> (B, kv_heads, group * t, hd), and the mask is repeated for each. Exact for
    any mask (not for is_causal); the output, (B, kv_heads, group * t, hd), reshapes back to q's shape."""
    b, heads, t, hd = q.shape
    group = heads // kv_heads
    q = q.reshape(b, kv_heads, group * t, hd)
    if mask is not None:
        length = mask.shape[-1]
        mask = mask.expand(b, 1, group, length) if t == 1 else \
            mask[:, :, None].expand(b, 1, group, t, length).reshape(b, 1, group * t, length)
    return q, mask


SCORE_BYTES = 64 << 20  # fp32 scores scored_attend holds at once: queries taken in chunks that fit


def scored_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  cap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`attend` from explicit scores: each capped as cap * tanh(score / cap) before the mask and softmax (those in
    fp32), as transformers' eager Gemma-2 attention computes it; with `sinks` (heads,), each head's sink logit
    beside its scores in the softmax and dropped after it, as gpt-oss's. mask None: causal (t > 1) or every
    position seen. A long prefill's queries go in chunks, so that its scores stay within SCORE_BYTES."""
    b, heads, t, hd = q.shape
    length = k.shape[2]
    if mask is None and t > 1:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)[None, None]
    step = max(1, SCORE_BYTES // (4 * b * heads * length))
    if step < t:
        return torch.cat([_scored(q[:, :, i:i + step], k, v, None if mask is None else mask[:, :, i:i + step], cap,
                                  sinks) for i in range(0, t, step)], 2)
    return _scored(q, k, v, mask, cap, sinks)


def _scored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cap: float | None,
            sinks: torch.Tensor | None):
    b, heads, t, hd = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    qg = q.reshape(b, kv_heads, heads // kv_heads * t, hd)
    # in the cache's dtype, as transformers multiplies (no fp32 copy of the cache); capped and normalised in fp32
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, heads, t, length).float() / math.sqrt(hd)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1)
    else:
        sink = sinks.to(scores.device, torch.float32).view(1, heads, 1, 1).expand(b, heads, t, 1)
        probs = torch.cat((scores, sink), -1).softmax(-1)[..., :length]
    probs = probs.to(q.dtype).view(b, kv_heads, heads // kv_heads * t, length)
    return torch.matmul(probs, v).view(b, heads, t, hd)


def topk_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                top: int) -> torch.Tensor:
    """Decode attention reading only the values of the `top` highest-scoring cached positions (FlexGen)."""
    b, heads, _, hd = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    qg = q.view(b, kv_heads, group, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)) / math.sqrt(hd)  # (b, kv_heads, group, L)
    scores = scores.float()
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    top_scores, index = scores.topk(min(top, length), dim=-1)
    probs = top_scores.softmax(-1).to(v.dtype)  # (b, kv_heads, group, top)
    picked = v[:, :, None].expand(b, kv_heads, group, length, hd).gather(
        3, index[..., None].expand(*index.shape, hd))
    return (probs[..., None] * picked).sum(-2).view(b, heads, 1, hd)


@functools.cache
def native_decode_agrees() -> bool:
    """The C decode attention (flexgen_lite.kernels.native: ~4x torch's SDPA at decode batches on a CPU, which spends
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
