"""MXFP4 (OCP microscaling FP4), as gpt-oss checkpoints store their experts: blocks of 32 e2m1 values (two a
byte, the low nibble first) sharing one power-of-two scale (a byte: the exponent + 127)."""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., groups, 16) uint8 blocks and (..., groups) uint8 scales as fp32 (..., groups x 32): each row as
    stored, its values in order (exact: a 4-bit value times a power of two)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
    table = torch.tensor(E2M1, dtype=torch.float32)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), -1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)
