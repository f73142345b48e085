"""Decode attention on a GPU over a 4-bit KV cache as it is stored, in Triton (split along the cache, as
decode_attention_triton.py, whose splits' combination it shares).

A compressed cache part in GPU memory was dequantized every step into a dense slot of max_len positions, then
attended: per value a read of 4 bits and a write and a read of 16. Here each program reads its positions' codes
(two a byte, element 2j in the low nibble) and their fp16 scale and minimum per group along head_dim, and makes
the values where they are used: code x scale + minimum in fp32, rounded to q's dtype as the dense slot held them
(`quantized_attention.reference`). The new token (k_new, v_new), not yet stored, stands at slot `skip` as in the
CPU kernel (quantized_attention.py); the slot's stored row is not read. No slot is needed, so none is reserved.

`refusal` checks the kernel once per kind of call against that reference; TRITON_INTERPRET=1 runs it on a CPU
(tests); FLEXGEN_LITE_TRITON=0 turns it off."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings

import torch

from . import decode_attention_triton as dense
from .dequant_triton import interpreting, unavailable
from .quantization import CompressionConfig

WARPS = 8  # a tile's codes, statistics and values live at once: twice the threads of the dense kernel hold them
TILE_DIVISOR = 2  # positions a tile: the dense kernel's over this (gpu_checks section 8 times 1 beside it)
ENV = "FLEXGEN_LITE_CODES_ATTENTION"  # "triton" ("triton-lanes": that variant where it applies): also where a CPU
# computes (Triton's interpreter; tests)


def asked() -> bool:
    """Whether FLEXGEN_LITE_CODES_ATTENTION asks for the kernel where a CPU computes."""
    return os.environ.get(ENV, "").startswith("triton")
_lock = threading.Lock()


@functools.cache
def _kernel(interpret: bool):
    """The split kernel over codes, jitted on first use."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["length", "split_len", "skip"])
    def codes_kernel(q, kc, ks, km, vc, vs, vm, k_new, v_new, seen, row_of, out, lse, length, split_len, skip, scale,
                     sq_b, sq_h, sc_b, sc_h, sc_l, ss_b, ss_h, ss_l, sn_b, sn_h, sm_b, sm_l, so_b, so_h, so_s, sl_b,
                     sl_h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NG: tl.constexpr,
                     BLOCK: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                     ROWS: tl.constexpr, ONE_SPLIT: tl.constexpr, LANES: tl.constexpr):
        # LANES (one query head per kv head): each of a tile's position lanes keeps its own softmax, combined once
        # after the loop, as decode_attention_lanes' head_lanes: no reduction over the warps inside the loop
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        cache_row = tl.load(row_of + row).to(tl.int64) if ROWS else row
        g, d = tl.arange(0, GP), tl.arange(0, DP)
        heads = kv_head * G + g
        head_ok, d_ok = g < G, d < D
        qv = tl.load(q + row * sq_b + heads[:, None] * sq_h + d[None, :], mask=head_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if not DOT or q.dtype.element_ty == tl.bfloat16:  # bf16 values are exact in tf32
            qv = qv.to(tl.float32)
        c, n = tl.arange(0, DP // 2), tl.arange(0, NG)  # a position's bytes (two values each) and its groups
        at_codes = cache_row * sc_b + kv_head * sc_h + c[None, :]
        at_stats = cache_row * ss_b + kv_head * ss_h + n[None, :]
        c_ok, n_ok = (2 * c < D)[None, :], (n * (DP // NG) < D)[None, :]
        begin = split * split_len
        end = tl.minimum(begin + split_len, length)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        if LANES:
            lane_m = tl.full([BLOCK], float("-inf"), tl.float32)
            lane_l = tl.zeros([BLOCK], tl.float32)
            lane_acc = tl.zeros([BLOCK, DP], tl.float32)
        for offset in range(0, split_len, BLOCK):
            pos = begin + offset + tl.arange(0, BLOCK)
            ok = (pos < end) & (pos != skip)  # the new token's slot: its stored row is an older position's
            if MASKED:
                ok = ok & (tl.load(seen + row * sm_b + pos.to(tl.int64) * sm_l, mask=ok, other=0) != 0)
            p64 = pos.to(tl.int64)[:, None]
            codes = tl.load(kc + at_codes + p64 * sc_l, mask=ok[:, None] & c_ok, other=0)
            codes = tl.interleave(codes & 15, codes >> 4).to(tl.float32)  # element 2j: byte j's low nibble
            sk = tl.load(ks + at_stats + p64 * ss_l, mask=ok[:, None] & n_ok, other=0.0).to(tl.float32)
            mk = tl.load(km + at_stats + p64 * ss_l, mask=ok[:, None] & n_ok, other=0.0).to(tl.float32)
            kt = tl.reshape(tl.reshape(codes, [BLOCK, NG, DP // NG]) * sk[:, :, None] + mk[:, :, None], [BLOCK, DP])
            kt = kt.to(q.dtype.element_ty)  # as a dense slot of q's dtype holds it
            if LANES:
                s_lane = tl.where(ok, tl.sum(qv * kt.to(tl.float32), 1) * scale, float("-inf"))
                lane_new = tl.maximum(lane_m, s_lane)
                lane_safe = tl.where(lane_new == float("-inf"), 0.0, lane_new)  # a lane that saw nothing yet
                lane_alpha = tl.exp2(lane_m - lane_safe)
                lane_p = tl.exp2(s_lane - lane_safe)
                lane_l = lane_l * lane_alpha + lane_p
                lane_m = lane_new
            else:
                if DOT:
                    s = tl.dot(qv, tl.trans(kt.to(qv.dtype)), input_precision=PRECISION) * scale
                else:
                    s = tl.sum(qv * kt.to(tl.float32), 1)[None, :] * scale
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
            codes = tl.load(vc + at_codes + p64 * sc_l, mask=ok[:, None] & c_ok, other=0)
            codes = tl.interleave(codes & 15, codes >> 4).to(tl.float32)
            sv = tl.load(vs + at_stats + p64 * ss_l, mask=ok[:, None] & n_ok, other=0.0).to(tl.float32)
            mv = tl.load(vm + at_stats + p64 * ss_l, mask=ok[:, None] & n_ok, other=0.0).to(tl.float32)
            vt = tl.reshape(tl.reshape(codes, [BLOCK, NG, DP // NG]) * sv[:, :, None] + mv[:, :, None], [BLOCK, DP])
            vt = vt.to(q.dtype.element_ty)
            if LANES:
                lane_acc = lane_acc * lane_alpha[:, None] + lane_p[:, None] * vt.to(tl.float32)
            else:
                if DOT:
                    acc = acc * alpha[:, None] + tl.dot(p.to(qv.dtype), vt.to(qv.dtype), input_precision=PRECISION)
                else:
                    acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * vt.to(tl.float32), 0)[None, :]
                m_i = m_new
        if LANES:  # the lanes as one softmax: statistics relative to their largest max (a lane that saw nothing: 0)
            m_i = tl.max(lane_m, 0, keep_dims=True)
            weight = tl.exp2(lane_m - tl.where(m_i == float("-inf"), 0.0, m_i))
            l_i = tl.sum(lane_l * weight, 0, keep_dims=True)
            acc = tl.sum(lane_acc * weight[:, None], 0, keep_dims=True)
        own = (skip >= begin) & (skip < end)  # the new token, in the split holding its slot, where the mask sees it
        if MASKED:
            own = own & (tl.load(seen + row * sm_b + skip.to(tl.int64) * sm_l, mask=own, other=0) != 0)
        if own:
            kn = tl.load(k_new + row * sn_b + kv_head * sn_h + d, mask=d_ok, other=0.0).to(tl.float32)
            vn = tl.load(v_new + row * sn_b + kv_head * sn_h + d, mask=d_ok, other=0.0).to(tl.float32)
            s1 = tl.sum(qv.to(tl.float32) * kn[None, :], 1) * scale
            m_new = tl.maximum(m_i, s1)
            alpha = tl.exp2(m_i - m_new)
            p1 = tl.exp2(s1 - m_new)
            l_i = l_i * alpha + p1
            acc = acc * alpha[:, None] + p1[:, None] * vn[None, :]
            m_i = m_new
        keep = head_ok[:, None] & d_ok[None, :]
        part = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)  # a split inside a row's padding: nothing
        if ONE_SPLIT:
            tl.store(out + row * so_b + heads[:, None] * so_h + d[None, :], part.to(out.dtype.element_ty), mask=keep)
        else:
            tl.store(out + row * so_b + heads[:, None] * so_h + split * so_s + d[None, :], part, mask=keep)
            tl.store(lse + row * sl_b + heads * sl_h + split, m_i + tl.log2(l_i), mask=head_ok)

    return codes_kernel


def tiling(dtype: torch.dtype, group: int, head_dim: int) -> tuple[int, int, bool]:
    """decode_attention_triton's tiling with half the positions a tile: a tile's codes, statistics and values live
    at once (on sm90, with WARPS warps, no spills at head dims up to 256: tests/test_triton_sm90.py)."""
    padded, block, dot = dense.tiling(dtype, group, head_dim)
    return padded, max(16, block // TILE_DIVISOR), dot


def supported(config: CompressionConfig | None) -> bool:
    """Whether a cache compressed by `config` has the layout the kernel reads (4 bits, groups of a power of two
    along head_dim)."""
    return (config is not None and config.bits == 4 and config.group_dim == -1 and config.group_size >= 2
            and config.group_size & (config.group_size - 1) == 0)


def variants(group: int) -> tuple[str, ...]:
    """How a program walks its positions (decode_attention_triton.VARIANTS): the lanes for one query head a kv head."""
    return ("tiles", "lanes") if group == 1 else ("tiles",)


def refusal(device: torch.device, dtype: torch.dtype, group: int, head_dim: int, group_size: int,
            variant: str = "tiles") -> str | None:
    """Why the kernel (`variant`) is not used for this kind of call here (None: it is)."""
    if variant not in variants(group):
        return f"the {variant} variant takes one query head per kv head"
    with _lock:
        return _refusal(torch.device(device), dtype, group, head_dim, group_size, variant)


@functools.cache
def _refusal(device: torch.device, dtype: torch.dtype, group: int, head_dim: int, group_size: int,
             variant: str = "tiles") -> str | None:
    why = unavailable(_kernel)
    if why is not None:
        return why
    from .quantized_attention import position_major, reference

    g = torch.Generator().manual_seed(group * 1000 + head_dim)
    config, rows, kv_heads, length = CompressionConfig(4, group_size, -1), 3, 2, 150
    q = torch.randn(rows, kv_heads * group, 1, head_dim, generator=g).to(dtype)
    stores = [tuple(x.contiguous() for x in position_major(torch.randn(length, 4, kv_heads, head_dim, generator=g),
                                                           config)) for _ in "kv"]
    k_new, v_new = (torch.randn(rows, kv_heads, 1, head_dim, generator=g).to(dtype) for _ in "kv")
    mask = torch.rand(rows, 1, 1, length, generator=g) > 0.3
    mask[..., 100] = True
    picked = torch.tensor([3, 0, 2])
    want = reference(q.float(), stores[0], stores[1], config, mask, 100, k_new.float(), v_new.float(), picked)
    try:
        on = [tuple(x.to(device) for x in s) for s in stores]
        got = attend(q.to(device), *on, mask.to(device), 100, k_new.to(device), v_new.to(device),
                     picked.to(device), splits=3, variant=variant).float().cpu()
    except Exception as e:  # a kernel that fails to compile or launch here
        return f"self-check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    error = float((got - want).abs().max())
    if not error <= (1e-4 if dtype == torch.float32 else 3e-2):
        return (f"self-check mismatch ({variant}, {dtype}, {group} heads per kv head, head dim {head_dim}: "
                f"{error:.3g})")
    return None


def attend(q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], mask: torch.Tensor | None,
           skip: int, k_new: torch.Tensor, v_new: torch.Tensor, rows: torch.Tensor | None = None,
           splits: int | None = None, variant: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query position per row: q (B, heads, 1, d) over a part's stored slots
    [0, L) (k, v: codes (R, kv_heads, L, bytes), scales and minima (R, kv_heads, L, groups)), slot `skip` standing
    for k_new, v_new (B, kv_heads, 1, d). mask (B, 1, 1, L) bool (None: every slot); rows: the cache row of each
    of q's rows (None: the same). Returns (B, heads, 1, d) in q's dtype. As quantized_attention.attend, on q's
    device. variant (`variants`): "tiles" or "lanes"; None: on CUDA the faster of those that passed their checks,
    measured once per kind of call (attention.faster), elsewhere FLEXGEN_LITE_CODES_ATTENTION's ("triton-lanes":
    the lanes where they apply), else the tiles."""
    if variant is None:
        variant = _chosen(q, k, v, mask, skip, k_new, v_new, rows, splits)
    b, heads, _, hd = q.shape
    codes, scale, minimum = k
    kv_heads, length, group = codes.shape[1], codes.shape[2], heads // codes.shape[1]
    group_size = 2 * codes.shape[-1] // scale.shape[-1]
    q, k_new, v_new = (x.contiguous() for x in (q, k_new, v_new))
    if variant not in variants(group):
        raise ValueError(f"4-bit cache attention variant {variant!r} does not take {group} query heads a kv head")
    gp, block, dot = tiling(q.dtype, group, hd)
    dp = dense._pow2(hd)
    splits, split_len = dense.split_plan(b * kv_heads, length, block, dense._sm_count(q.device), splits)
    out = torch.empty(b, heads, 1, hd, dtype=q.dtype, device=q.device)
    if mask is None:
        seen, sm_b, sm_l = q, 0, 0  # not read
    else:
        seen = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        sm_b = seen.stride(0) if seen.shape[0] > 1 else 0
        sm_l = seen.stride(-1) if seen.shape[-1] > 1 else 0
    row_of = q if rows is None else rows.to(q.device, torch.int64).contiguous()
    if splits == 1:
        target, lse, strides = out, out, (out.stride(0), out.stride(1), 0, 0, 0)
    else:
        target = torch.empty(b, heads, splits, dp, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
        strides = (*target.stride()[:3], *lse.stride()[:2])
    with torch.cuda.device(q.device) if q.device.type == "cuda" else dense._interpreter if interpreting() else \
            contextlib.nullcontext():
        _kernel(interpreting())[(b, kv_heads, splits)](
            q, codes, scale, minimum, *v, k_new, v_new, seen, row_of, target, lse, length, split_len, skip,
            math.log2(math.e) / math.sqrt(hd), q.stride(0), q.stride(1), *codes.stride()[:3], *scale.stride()[:3],
            k_new.stride(0), k_new.stride(1), sm_b, sm_l, *strides, G=group, GP=gp, D=hd, DP=dp,
            NG=max(1, dp // group_size), BLOCK=block, DOT=dot, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            MASKED=mask is not None, ROWS=rows is not None, ONE_SPLIT=splits == 1, LANES=variant == "lanes",
            num_warps=WARPS)
        if splits > 1:
            dense._kernels(interpreting())[1][(b, heads)](
                target, lse, q, out, splits, *strides, out.stride(0), out.stride(1), D=hd, DP=dp,
                SP=dense._pow2(splits), SINKS=False)
    return out


def wanted_on(device, dtype: torch.dtype, group: int, head_dim: int, group_size: int) -> bool:
    """Whether compressed parts in `device`'s memory are attended by this kernel (that kind of call): on a GPU
    where it passes its check (else one warning, and slots as before). Elsewhere only with
    FLEXGEN_LITE_CODES_ATTENTION=triton: a CPU then runs it in Triton's interpreter (tests), and a plan for a GPU
    made without one counts on it; without that, such a plan counts slots, as a CPU playing a GPU uses them."""
    device = torch.device(device)
    if head_dim > 256:  # the split kernels' tiles (decode_attention_triton.supported)
        return False
    if device.type != "cuda" or not torch.cuda.is_available():
        if not asked():
            return False
        return device.type == "cuda" or refusal(device, dtype, group, head_dim, group_size) is None
    why = refusal(device, dtype, group, head_dim, group_size)
    if why is not None:
        _say_once(why)
    return why is None


@functools.cache
def _say_once(why: str) -> None:
    warnings.warn(f"the Triton 4-bit cache attention is not used here ({why}): dequantizing into slots instead",
                  stacklevel=3)


def reset() -> None:
    """Forget the checks (tests)."""
    _refusal.cache_clear()


def _chosen(q, k, v, mask, skip, k_new, v_new, rows, splits) -> str:
    """The variant for this call: see `attend`."""
    group, head_dim = q.shape[1] // k[0].shape[1], q.shape[-1]
    if q.device.type != "cuda":
        lanes = os.environ.get(ENV) == "triton-lanes" and "lanes" in variants(group)
        return "lanes" if lanes and refusal(q.device, q.dtype, group, head_dim, _group_size(k)) is None else "tiles"
    from .attention import _measured, faster

    kind = ("codes", q.device, q.dtype, q.shape[0].bit_length(), q.shape[1], k[0].shape[1], head_dim,
            k[0].shape[2].bit_length(), mask is None, _group_size(k))
    if kind in _measured:  # every layer of a step asks: the checks and candidates only until measured
        return _measured[kind]
    names = [name for name in variants(group) if name == "tiles"
             or refusal(q.device, q.dtype, group, head_dim, _group_size(k), name) is None]
    if len(names) == 1:
        return names[0]
    return faster(kind, {name: functools.partial(attend, q, k, v, mask, skip, k_new, v_new, rows, splits, name)
                         for name in names}, q.device)


def _group_size(k: tuple[torch.Tensor, ...]) -> int:
    return 2 * k[0].shape[-1] // k[1].shape[-1]
