"""The lanes variants of the Triton decode attention (decode_attention_triton.py): a program's positions walked in
lanes, each lane keeping a softmax of its own (max, sum, weighted values), the lanes combined once after the loop.

The tiles kernel reduces each tile's max, sum and weighted values over the program's warps: on sm_90, 9-16
`bar.sync` inside its loop over positions. Here no step of that loop reduces across warps:
- one query head per kv head (OPT, Llama-2): each of a tile's BLOCK positions is a lane (products and sums in
  registers); `AHEAD` issues the next tile's K and V loads before this tile's math;
- grouped query heads (Llama-3, Mistral, Qwen): each of the program's LANE_WARPS warps walks LANE_POSITIONS positions
  of a tile for all the query heads of the kv head, on tensor cores (a batched tl.dot: Triton puts the warps along
  its batch, the lanes), and keeps their softmax. Four times the tiles' accumulator registers: fp16 and bf16 at head
  dims up to 128 and up to 16 query heads a kv head (168 registers on sm_90, no spills; fp32 and 256 spill).

Same arguments and outputs as decode_attention_triton's split kernel (a split's normalized fp32 part and its
log2-sum-exp2 where there are several)."""

from __future__ import annotations

import functools

import torch

LANE_WARPS = 4  # grouped heads: warps, each its own lane of positions
LANE_POSITIONS = 16  # grouped heads: positions a lane takes from each tile (tl.dot's least dimension)
BROADCAST_VALUES = 4096  # one head: a tile of (positions x head dim) in registers


def grouped_takes(dtype: torch.dtype, group: int, head_dim: int) -> bool:
    """Whether the grouped lanes kernel takes this kind of call (compiled for sm_90 without spills)."""
    return dtype in (torch.float16, torch.bfloat16) and 1 < group <= 16 and head_dim <= 128


def block(padded_head_dim: int, group: int) -> int:
    """Positions a tile: one head's lanes hold (positions x head dim) values as a tile's product does; grouped
    heads' lanes LANE_POSITIONS each."""
    return LANE_WARPS * LANE_POSITIONS if group > 1 else max(16, BROADCAST_VALUES // padded_head_dim)


@functools.cache
def kernels(interpret: bool):
    """(one head's lanes kernel, grouped heads' lanes kernel), jitted on first use."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["length", "split_len"])
    def head_lanes(q, k, v, seen, out, lse, sinks, length, split_len, scale,
                   sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h, so_s, sl_b, sl_h,
                   D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                   ONE_SPLIT: tl.constexpr, SINKS: tl.constexpr, AHEAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        d = tl.arange(0, DP)
        d_ok = d < D
        qv = tl.load(q + row * sq_b + head * sq_h + d, mask=d_ok, other=0.0).to(tl.float32)
        k_row, v_row, seen_row = k + row * sk_b + head * sk_h, v + row * sv_b + head * sv_h, seen + row * sm_b
        begin = split * split_len
        end = tl.minimum(begin + split_len, length)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, DP], tl.float32)
        pos = begin + tl.arange(0, BLOCK)
        if AHEAD:
            ok = pos < end
            if MASKED:
                ok = ok & (tl.load(seen_row + pos.to(tl.int64) * sm_l, mask=ok, other=0) != 0)
            kt = tl.load(k_row + (pos[:, None] * sk_l + d[None, :]), mask=ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_row + (pos[:, None] * sv_l + d[None, :]), mask=ok[:, None] & d_ok[None, :], other=0.0)
        for offset in range(0, split_len, BLOCK):
            if AHEAD:  # past the split's end the loads are masked whole: nothing read
                pos_next = pos + BLOCK
                ok_next = pos_next < end
                if MASKED:
                    ok_next = ok_next & (tl.load(seen_row + pos_next.to(tl.int64) * sm_l, mask=ok_next, other=0) != 0)
                tile_next = ok_next[:, None] & d_ok[None, :]
                kt_next = tl.load(k_row + (pos_next[:, None] * sk_l + d[None, :]), mask=tile_next, other=0.0)
                vt_next = tl.load(v_row + (pos_next[:, None] * sv_l + d[None, :]), mask=tile_next, other=0.0)
            else:
                pos = begin + offset + tl.arange(0, BLOCK)
                ok = pos < end
                if MASKED:
                    ok = ok & (tl.load(seen_row + pos.to(tl.int64) * sm_l, mask=ok, other=0) != 0)
                kt = tl.load(k_row + (pos[:, None] * sk_l + d[None, :]), mask=ok[:, None] & d_ok[None, :],
                             other=0.0)
                vt = tl.load(v_row + (pos[:, None] * sv_l + d[None, :]), mask=ok[:, None] & d_ok[None, :],
                             other=0.0)
            s = tl.where(ok, tl.sum(qv[None, :] * kt.to(tl.float32), 1) * scale, float("-inf"))
            m_new = tl.maximum(m, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that saw nothing yet: no NaN
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(s - m_safe)
            total = total * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vt.to(tl.float32)
            m = m_new
            if AHEAD:
                pos, ok, kt, vt = pos_next, ok_next, kt_next, vt_next
        top = tl.max(m, 0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp2(m - top_safe)  # a lane that saw nothing weighs 0
        denominator = tl.sum(total * weight, 0)
        o = tl.sum(acc * weight[:, None], 0)
        if ONE_SPLIT:
            if SINKS:
                denominator += tl.exp2(tl.load(sinks + head) * 1.4426950408889634 - top_safe)
            tl.store(out + row * so_b + head * so_h + d, (o / denominator).to(out.dtype.element_ty), mask=d_ok)
        else:  # a normalized fp32 part and its log2-sum-exp2; zeros for a split that saw nothing
            part = tl.where(denominator > 0, o / denominator, 0.0)
            tl.store(out + row * so_b + head * so_h + split * so_s + d, part, mask=d_ok)
            tl.store(lse + row * sl_b + head * sl_h + split, top + tl.log2(denominator))

    @triton.jit(do_not_specialize=["length", "split_len"])
    def grouped_lanes(q, k, v, seen, out, lse, sinks, length, split_len, scale,
                      sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l, so_b, so_h, so_s, sl_b, sl_h,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, W: tl.constexpr,
                      SUB: tl.constexpr, MASKED: tl.constexpr, ONE_SPLIT: tl.constexpr, SINKS: tl.constexpr,
                      UPCAST: tl.constexpr):
        # lane w of a tile: positions [w * SUB, (w + 1) * SUB); every (lane, head) its own max, sum and values.
        # UPCAST: fp32 (tf32) products where Triton's interpreter gets bf16 tl.dot wrong; compiled, bf16 as stored
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        g, d, lane, j = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, W), tl.arange(0, SUB)
        heads = kv_head * G + g
        head_ok, d_ok = g < G, d < D
        qv = tl.load(q + row * sq_b + heads[:, None] * sq_h + d[None, :], mask=head_ok[:, None] & d_ok[None, :],
                     other=0.0)
        if UPCAST:
            qv = qv.to(tl.float32)
        q3 = tl.broadcast_to(qv[None, :, :], (W, GP, DP))
        k_row, v_row = k + row * sk_b + kv_head * sk_h, v + row * sv_b + kv_head * sv_h
        begin = split * split_len
        end = tl.minimum(begin + split_len, length)
        m_i = tl.full([W, GP], float("-inf"), tl.float32)
        l_i = tl.zeros([W, GP], tl.float32)
        acc = tl.zeros([W, GP, DP], tl.float32)
        for offset in range(0, split_len, W * SUB):
            pos = begin + offset + lane[:, None] * SUB + j[None, :]  # (lanes, positions)
            ok = pos < end
            if MASKED:
                ok = ok & (tl.load(seen + row * sm_b + pos.to(tl.int64) * sm_l, mask=ok, other=0) != 0)
            tile_ok = ok[:, :, None] & d_ok[None, None, :]  # positions not attended are not read (left padding)
            kt = tl.load(k_row + (pos[:, :, None] * sk_l + d[None, None, :]), mask=tile_ok, other=0.0)
            s = tl.dot(q3, tl.trans(kt.to(q3.dtype), (0, 2, 1))) * scale  # (lanes, heads, positions)
            s = tl.where(ok[:, None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that saw nothing yet: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, :, None])
            l_i = l_i * alpha + tl.sum(p, 2)
            vt = tl.load(v_row + (pos[:, :, None] * sv_l + d[None, None, :]), mask=tile_ok, other=0.0)
            acc = acc * alpha[:, :, None] + tl.dot(p.to(q3.dtype), vt.to(q3.dtype))
            m_i = m_new
        top = tl.max(m_i, 0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp2(m_i - top_safe[None, :])  # a lane that saw nothing weighs 0
        total = tl.sum(l_i * weight, 0)
        o = tl.sum(acc * weight[:, :, None], 0)
        keep = head_ok[:, None] & d_ok[None, :]
        if ONE_SPLIT:
            if SINKS:
                sink = tl.load(sinks + heads, mask=head_ok, other=float("-inf")) * 1.4426950408889634
                total = total + tl.exp2(sink - top_safe)
            tl.store(out + row * so_b + heads[:, None] * so_h + d[None, :],
                     (o / total[:, None]).to(out.dtype.element_ty), mask=keep)
        else:
            part = tl.where(total[:, None] > 0, o / total[:, None], 0.0)
            tl.store(out + row * so_b + heads[:, None] * so_h + split * so_s + d[None, :], part, mask=keep)
            tl.store(lse + row * sl_b + heads * sl_h + split, top + tl.log2(total), mask=head_ok)

    return head_lanes, grouped_lanes
