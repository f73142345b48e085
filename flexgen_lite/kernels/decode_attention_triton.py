"""One new token's attention over a GPU-resident KV cache in Triton, split along the cache (flash-decoding).

SDPA's fused kernels are built for many queries: at decode (one query per row) the memory-efficient one walks a
row's whole cache in one program per (row, head) with tiles made for 64 queries, and flash takes no mask (left
padding needs one). Here each program reads one (row, kv head, split of the positions) once, for all the query
heads sharing that kv head, keeping a running max and sum in fp32; splits are combined by their log-sum-exp. The
cache is read in place, any strides (head-major slots, a prefix of max_len, a window's ring), under a bool mask
(rows or 1, 1, 1, L). Rows x kv heads x splits fill the GPU several times over. Its lanes variants
(decode_attention_lanes.py) walk a split without reducing over the program's warps inside the loop.

`usable` checks the kernel once per kind of call against SDPA in fp32 on the call's device; attention.py measures it
against SDPA where both run and keeps the faster. TRITON_INTERPRET=1 runs it on a CPU (tests);
FLEXGEN_LITE_TRITON=0 turns it off."""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn.functional as F

from . import decode_attention_lanes as lanes
from .dequant_triton import interpreting, unavailable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BROADCAST_VALUES = lanes.BROADCAST_VALUES  # a tile of (positions x head dim) multiplied in registers (one query
# head): on sm90, 80-94 registers a thread at head dims 64-256, no spills, 16-byte loads (tests/test_triton_sm90.py)
PROGRAMS_PER_SM = 16  # split the positions until rows x kv heads x splits is at least this many per SM (~4 waves of
# 4-5 resident programs: a short last wave idles less of the GPU)
_lock = threading.Lock()  # one self-check per kind at a time
_interpreter = threading.Lock()  # Triton's interpreter is not thread-safe (its patched language is global)


@functools.cache
def _kernels(interpret: bool):
    """(split kernel, combine kernel), jitted on first use (Triton decides at `jit` whether it interprets)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["length", "split_len"])
    def split_kernel(q, k, v, seen, out, lse, sinks, length, split_len, scale,
                     sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h, so_s, sl_b, sl_h,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                     DOT: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr, ONE_SPLIT: tl.constexpr,
                     SINKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        g, d = tl.arange(0, GP), tl.arange(0, DP)
        heads = kv_head * G + g
        head_ok, d_ok = g < G, d < D
        qv = tl.load(q + row * sq_b + heads[:, None] * sq_h + d[None, :], mask=head_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if not DOT or q.dtype.element_ty == tl.bfloat16:  # bf16 values are exact in tf32
            qv = qv.to(tl.float32)
        k_row, v_row = k + row * sk_b + kv_head * sk_h, v + row * sv_b + kv_head * sv_h
        begin = split * split_len
        end = tl.minimum(begin + split_len, length)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for offset in range(0, split_len, BLOCK):
            pos = begin + offset + tl.arange(0, BLOCK)
            ok = pos < end
            if MASKED:
                ok = ok & (tl.load(seen + row * sm_b + pos.to(tl.int64) * sm_l, mask=ok, other=0) != 0)
            tile_ok = ok[:, None] & d_ok[None, :]  # positions not attended are not read (left padding)
            kt = tl.load(k_row + (pos[:, None] * sk_l + d[None, :]), mask=tile_ok, other=0.0)
            if DOT:  # the query heads of a kv head on tensor cores (padded to 16 rows)
                s = tl.dot(qv, tl.trans(kt.to(qv.dtype)), input_precision=PRECISION) * scale
            else:  # one query head: products and sums in registers, 2-D
                s = tl.sum(qv * kt.to(tl.float32), 1)[None, :] * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no NaN from -inf - -inf
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_row + (pos[:, None] * sv_l + d[None, :]), mask=tile_ok, other=0.0)
            if DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(qv.dtype), vt.to(qv.dtype), input_precision=PRECISION)
            else:
                acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * vt.to(tl.float32), 0)[None, :]
            m_i = m_new
        keep = head_ok[:, None] & d_ok[None, :]
        if ONE_SPLIT:
            if SINKS:  # each head's sink logit (times log2(e): the scores' units) in its denominator alone
                sink = tl.load(sinks + heads, mask=head_ok, other=float("-inf")) * 1.4426950408889634
                l_i = l_i + tl.exp2(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
            tl.store(out + row * so_b + heads[:, None] * so_h + d[None, :],
                     (acc / l_i[:, None]).to(out.dtype.element_ty), mask=keep)
        else:  # fp32 partial output, normalized, and its log2-sum-exp2 beside it; a split that saw nothing (a row's
            # left padding) stores zeros, not 0 / 0, for the combination to weigh by exp2(-inf) = 0
            part = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
            tl.store(out + row * so_b + heads[:, None] * so_h + split * so_s + d[None, :], part, mask=keep)
            tl.store(lse + row * sl_b + heads * sl_h + split, m_i + tl.log2(l_i), mask=head_ok)

    @triton.jit
    def combine_kernel(part, lse, sinks, out, splits, sp_b, sp_h, sp_s, sl_b, sl_h, so_b, so_h,
                       D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr, SINKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        s, d = tl.arange(0, SP), tl.arange(0, DP)
        s_ok = s < splits
        at = row * sp_b + head * sp_h
        weights = tl.load(lse + row * sl_b + head * sl_h + s, mask=s_ok, other=float("-inf"))
        top = tl.max(weights, 0)
        weights = tl.where(s_ok, tl.exp2(weights - top), 0.0)
        parts = tl.load(part + at + s[:, None] * sp_s + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
        total = tl.sum(weights, 0)
        if SINKS:
            total += tl.exp2(tl.load(sinks + head) * 1.4426950408889634 - top)
        o = tl.sum(weights[:, None] * parts, 0) / total
        tl.store(out + row * so_b + head * so_h + d, o.to(out.dtype.element_ty), mask=d < D)

    return split_kernel, combine_kernel


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Decode shapes the kernel takes: one query position, kv heads dividing the query heads, a head dim up to 256,
    a (row, kv head)'s positions within 32-bit offsets."""
    return (q.dim() == 4 and q.shape[2] == 1 and q.dtype in DTYPES and k.dtype == q.dtype
            and q.shape[1] % k.shape[1] == 0 and q.shape[-1] <= 256 and k.shape[2] > 0
            and k.shape[2] * max(k.stride(2), k.shape[-1]) < 2 ** 31)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


VARIANTS = ("tiles", "lanes", "lanes-ahead")  # how a program walks its positions (attend's `variant`)


def variants(q: torch.Tensor, k: torch.Tensor) -> tuple[str, ...]:
    """The variants that take this call: all where each kv head has one query head (OPT, Llama-2); for grouped
    heads, the lanes where decode_attention_lanes.grouped_takes them."""
    if q.shape[1] == k.shape[1]:
        return VARIANTS
    return VARIANTS[:2] if lanes.grouped_takes(q.dtype, q.shape[1] // k.shape[1], q.shape[-1]) else VARIANTS[:1]


def tiling(dtype: torch.dtype, group: int, head_dim: int) -> tuple[int, int, bool]:
    """(padded query heads, positions per tile, tl.dot): one query head per kv head multiplies and sums in
    registers; more go on tensor cores (tl.dot wants 16 rows): fp16 as stored, bf16 as tf32 (exact for its
    values), fp32 in full precision."""
    if group == 1:
        return 1, max(16, min(64, BROADCAST_VALUES // _pow2(head_dim))), False
    return max(16, _pow2(group)), 64 if head_dim <= 128 else 32, True  # 256: 146-148 registers at 32, 192-204 at 64


def split_plan(programs: int, length: int, block: int, sms: int, wanted: int | None = None) -> tuple[int, int]:
    """(splits, positions per split, a multiple of `block`) of a cache of `length` positions: `wanted` splits, by
    default enough that `programs` (rows x kv heads) times them is PROGRAMS_PER_SM per SM; two tiles each at least."""
    wanted = wanted or -(-PROGRAMS_PER_SM * sms // programs)
    splits = max(1, min(wanted, length // (2 * block)))
    split_len = -(-length // splits)
    split_len = -(-split_len // block) * block
    return -(-length // split_len), split_len


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           splits: int | None = None, sinks: torch.Tensor | None = None, variant: str = "tiles") -> torch.Tensor:
    """q (rows, heads, 1, D) over k, v (rows, kv_heads, L, D) where `mask` (rows or 1, 1, 1, L; None: every
    position) is True: as SDPA with that bool mask, grouped heads shared. Returns (rows, heads, 1, D) in q's dtype.
    splits: parts of the positions read by programs of their own (default: split_plan's). sinks (heads,): each
    head's sink logit, a term of its softmax's denominator alone (gpt-oss). variant (`variants`): "tiles", a tile's
    softmax statistics reduced over the program at each tile; "lanes", each position lane its own softmax, combined
    once (decode_attention_lanes.py: one query head a lane per position, grouped heads a lane per warp);
    "lanes-ahead" (one query head per kv head), the next tile's loads issued first."""
    if variant not in variants(q, k):
        raise ValueError(f"decode attention variant {variant!r} does not take {q.shape[1]} query heads over "
                         f"{k.shape[1]} kv heads in {q.dtype} at head dim {q.shape[-1]}")
    rows, heads, _, hd = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    q = q.contiguous()
    gp, block, dot = tiling(q.dtype, group, hd)
    dp = _pow2(hd)
    if variant != "tiles":
        block = lanes.block(dp, group)
    splits, split_len = split_plan(rows * kv_heads, length, block, _sm_count(q.device), splits)
    out = torch.empty(rows, heads, 1, hd, dtype=q.dtype, device=q.device)
    if mask is None:
        seen, sm_b, sm_l = q, 0, 0  # not read
    else:
        seen = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        sm_b = seen.stride(0) if seen.shape[0] > 1 else 0
        sm_l = seen.stride(-1) if seen.shape[-1] > 1 else 0
    split_kernel, combine_kernel = _kernels(interpreting())
    scale = math.log2(math.e) / math.sqrt(hd)
    if sinks is not None:
        sinks = sinks.to(q.device, torch.float32).contiguous()
    sinks_arg = q if sinks is None else sinks  # not read without sinks
    if splits == 1:
        target, lse, strides = out, out, (out.stride(0), out.stride(1), 0, 0, 0)
    else:
        target = torch.empty(rows, heads, splits, dp, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device)
        strides = (*target.stride()[:3], *lse.stride()[:2])
    with torch.cuda.device(q.device) if q.device.type == "cuda" else _interpreter if interpreting() else \
            contextlib.nullcontext():
        args = (q, k, v, seen, target, lse, sinks_arg, length, split_len, scale, q.stride(0), q.stride(1),
                *k.stride()[:3], *v.stride()[:3], sm_b, sm_l, *strides)
        if variant == "tiles":
            split_kernel[(rows, kv_heads, splits)](
                *args, G=group, GP=gp, D=hd, DP=dp, BLOCK=block, DOT=dot,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", MASKED=mask is not None,
                ONE_SPLIT=splits == 1, SINKS=sinks is not None)
        elif group == 1:
            lanes.kernels(interpreting())[0][(rows, kv_heads, splits)](
                *args, D=hd, DP=dp, BLOCK=block, MASKED=mask is not None, ONE_SPLIT=splits == 1,
                SINKS=sinks is not None, AHEAD=variant == "lanes-ahead")
        else:
            lanes.kernels(interpreting())[1][(rows, kv_heads, splits)](
                *args, G=group, GP=gp, D=hd, DP=dp, W=lanes.LANE_WARPS, SUB=lanes.LANE_POSITIONS,
                MASKED=mask is not None, ONE_SPLIT=splits == 1, SINKS=sinks is not None,
                UPCAST=interpreting() and q.dtype == torch.bfloat16, num_warps=lanes.LANE_WARPS)
        if splits > 1:
            combine_kernel[(rows, heads)](target, lse, sinks_arg, out, splits, *strides,
                                          out.stride(0), out.stride(1), D=hd, DP=dp, SP=_pow2(splits),
                                          SINKS=sinks is not None)
    return out


def usable(q: torch.Tensor, k: torch.Tensor, sinks: bool = False, variant: str = "tiles") -> bool:
    """Whether the kernel (`variant`) runs here for this kind of call and matches SDPA (checked once per kind; with
    sinks, its sinks variant too, against attention from whole scores)."""
    return refusal(q, k, sinks, variant) is None


def refusal(q: torch.Tensor, k: torch.Tensor, sinks: bool = False, variant: str = "tiles") -> str | None:
    """Why the kernel (`variant`) is not used for this kind of call (None: it may be)."""
    if not supported(q, k):
        return "not a decode shape the kernel takes"
    if variant not in variants(q, k):
        return (f"the {variant} variant takes one query head per kv head"
                + ("" if variant == "lanes-ahead" else ", or up to 16 in fp16 or bf16 at head dims up to 128"))
    with _lock:
        return _refusal(q.device, q.dtype, q.shape[1] // k.shape[1], q.shape[-1], sinks, variant)


@functools.cache
def _refusal(device: torch.device, dtype: torch.dtype, group: int, head_dim: int, sinks: bool,
             variant: str = "tiles") -> str | None:
    """The self-check of a kind: the plain kernel; with `sinks`, the plain one passing, its sinks variant (checked
    apart, so that a model without sinks never depends on that variant). Each variant on its own."""
    if sinks:
        return (_refusal(device, dtype, group, head_dim, False, variant)
                or _sinks_refusal(device, dtype, group, head_dim, variant))
    why = unavailable(_kernels)
    if why is not None:
        return why
    gen, (q, k, v, mask) = _check_inputs(group, head_dim)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
    return _checked(device, dtype, group, head_dim, (q, k, v, mask), want, None, variant)


def _sinks_refusal(device: torch.device, dtype: torch.dtype, group: int, head_dim: int,
                   variant: str = "tiles") -> str | None:
    gen, (q, k, v, mask) = _check_inputs(group, head_dim)
    sinks = torch.randn(q.shape[1], generator=gen) * 2
    return _checked(device, dtype, group, head_dim, (q, k, v, mask), with_sinks(q, k, v, mask, sinks), sinks,
                    variant)


def _check_inputs(group: int, head_dim: int) -> tuple[torch.Generator, tuple]:
    """A self-check's random q, k, v and mask (fp32, on the CPU): several splits on any device, a ragged last
    tile; and the generator, for more."""
    gen = torch.Generator().manual_seed(group * 1000 + head_dim)
    rows, kv_heads, length = 3, 2, 150
    q = torch.randn(rows, kv_heads * group, 1, head_dim, generator=gen)
    k, v = (torch.randn(rows, kv_heads, length, head_dim, generator=gen) for _ in "kv")
    mask = torch.rand(rows, 1, 1, length, generator=gen) > 0.3
    mask[..., -1] = True
    return gen, (q, k, v, mask)


def _checked(device, dtype, group: int, head_dim: int, inputs, want: torch.Tensor, sinks,
             variant: str = "tiles") -> str | None:
    """None where the kernel (`variant`, with `sinks` if given) gives `want` for `inputs` (fp32, on the CPU) on
    `device` in `dtype`; else why not."""
    q, k, v, mask = inputs
    try:
        got = attend(*(t.to(device, dtype) for t in (q, k, v)), mask.to(device),
                     sinks=None if sinks is None else sinks.to(device), variant=variant).float().cpu()
    except Exception as e:  # a kernel that fails to compile or launch here
        return f"self-check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    error = float((got - want).abs().max())
    if not error <= tolerance:
        kind = "with sinks, " if sinks is not None else ""
        return (f"self-check mismatch ({variant}, {dtype}, {kind}{group} heads per kv head, head dim {head_dim}: "
                f"{error:.3g})")
    return None


def with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               sinks: torch.Tensor) -> torch.Tensor:
    """Attention with each head's sink logit beside its scores in the softmax, its share dropped: the reference
    for the self-checks (fp32, whole scores; here and sink_attention.py)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    return torch.cat((scores, sink), -1).softmax(-1)[..., :-1] @ v


def reset() -> None:
    """Forget the checks (tests; after changing FLEXGEN_LITE_TRITON)."""
    _refusal.cache_clear()
