"""llama.cpp's other quantized types (the K-quants, Q5_0/Q5_1, IQ4_NL/IQ4_XS) dequantized to float32 with torch.

A Q4_K_M or Q5_K_M file, the most common downloads, mixes several of them (Q4_K or Q5_K, and Q6_K for the value
and down projections of some layers and for the head). Each function takes a tensor's blocks as uint8 (blocks,
bytes of one block) and returns float32 (blocks, values of one block), with the float32 operations of gguf's
numpy code in the same order, so the values are equal bit for bit (tests/test_gguf_quants.py).

Layouts (all little-endian; d, dmin fp16; a K-quant block holds 256 values in sub-blocks of 16 or 32):
  Q5_0   d | high bits (4) | low nibbles (16)                          (q - 16) d
  Q5_1   d | m | high bits (4) | low nibbles (16)                      q d + m
  Q2_K   scales (16: 4-bit scale | 4-bit min) | 2-bit codes (64) | d | dmin
  Q3_K   high bits (32) | 2-bit codes (64) | 6-bit signed scales (12) | d
  Q4_K   d | dmin | 6-bit scales and mins (12) | nibbles (128)          d sc q - dmin m, 8 sub-blocks of 32
  Q5_K   d | dmin | scales and mins (12) | high bits (32) | nibbles (128)
  Q6_K   low nibbles (128) | high 2 bits (64) | int8 scales (16) | d
  IQ4_NL d | nibbles (16) into a 16-value table
  IQ4_XS d | high scale bits (2) | low scale bits (4) | nibbles (128) into the same table
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(blocks, 2) bytes -> (blocks, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _shifted(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """x (..., n) uint8 -> (..., len(shifts), n): (x >> s) & mask for each shift s."""
    s = torch.tensor(shifts, dtype=torch.uint8).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _bit_planes(x: torch.Tensor) -> torch.Tensor:
    """(blocks, bytes) -> (blocks, 8, bytes): bit i of each byte in plane i."""
    return _shifted(x, tuple(range(8)), 1)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    low = _shifted(qs, (0, 4), 0x0F).reshape(n, 32)
    high = _bit_planes(qh).transpose(1, 2).reshape(n, 32)  # bit j of the little-endian 32-bit word: value j
    q = (low | (high << 4)).to(torch.int8) - 16
    return d * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    low = _shifted(qs, (0, 4), 0x0F).reshape(n, 32)
    high = _bit_planes(qh).transpose(1, 2).reshape(n, 32)
    return d * (low | (high << 4)).float() + m


def q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _shifted(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
    high = _shifted(scales[:, 8:], (0, 2, 4, 6), 3).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _shifted(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _bit_planes(hmask).reshape(n, 16, 16) ^ 1  # a set bit means no offset of -4
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, 256)


def _scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 (blocks, 8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def q4_k_groups(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K blocks as 8 groups of 32 each: codes (blocks, 8, 32) uint8 0..15, and the float32 scale and
    subtrahend (blocks, 8, 1) of value = scale * code - subtrahend."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scales_mins(b[:, 4:16])
    codes = _shifted(b[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return codes, (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)


def q4_k(b: torch.Tensor) -> torch.Tensor:
    codes, scale, sub = q4_k_groups(b)
    return (scale * codes.float() - sub).reshape(b.shape[0], 256)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scales_mins(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    low = _shifted(qs.reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _bit_planes(qh).reshape(n, 8, 32)
    q = (low | (high << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, 256)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _shifted(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _shifted(qh.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, 256)


def _table(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32)[codes.long()]


def iq4_nl(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    return _f16(b[:, :2]) * _table(_shifted(b[:, 2:], (0, 4), 0x0F).reshape(n, 32))


def iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    high_bits = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    high = (high_bits.view(n, 1) >> torch.arange(0, 16, 2, dtype=torch.int32)) & 3
    low = _shifted(b[:, 4:8], (0, 4), 0x0F).transpose(1, 2).reshape(n, 8)
    sc = ((low.to(torch.int32) | (high << 4)) - 32).float()
    codes = _shifted(b[:, 8:].reshape(n, 8, 16), (0, 4), 0x0F).reshape(n, 8, 32)
    return ((d * sc).reshape(n, 8, 1) * _table(codes)).reshape(n, 256)


DEQUANTIZE = {T.Q5_0: q5_0, T.Q5_1: q5_1, T.Q2_K: q2_k, T.Q3_K: q3_k, T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k,
              T.IQ4_NL: iq4_nl, T.IQ4_XS: iq4_xs}
