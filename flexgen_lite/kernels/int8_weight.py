"""The embedding and head in 8 bits on a CPU (--compress-weight): int8 codes with one fp16 scale per 32 values
along the input dimension, llama.cpp's Q8_0 (a GGUF's Q8_0 tensor is kept as stored, bit for bit).

A decode step of a few rows reads the whole head once: a 128,256-word head of 2048 is 0.53 GB in bf16, half of a
1B model's 4-bit step, and 0.28 GB here. Up to GEMV_ROWS rows native.int8_gemv reads the codes as they are; more
rows (a prefill's, a bigger batch's) multiply TILE_BYTES of dequantized rows at a time, dense.
Symmetric rounding to 8 bits moves a value by at most 1/254 of its group's largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native

GROUP = 32
TILE_BYTES = 2 << 20  # dequantized rows per dense product: they stay in the CPU's cache
GEMV_ROWS = 4  # one pass of int8.c over the codes (XROWS): more rows would convert every group again per pass;
# measured here (128,256 x 2048, bf16): 9.0 / 10.9 / 13.9 ms at 1 / 2 / 4 rows against the dense head's best 14.9 /
# 15.3 / 16.0, and at 16 rows 55 ms by tiles against 33: more rows keep the head dense (weights.in_8_bits)


def int8_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of a matrix (N, K) stored in 8 bits: codes and fp16 scales."""
    n, k = shape
    return n * k + n * (k // GROUP) * 2


def fits(shape: tuple[int, ...]) -> bool:
    """Whether a matrix of `shape` can be stored in 8 bits here (its rows whole groups; the kernels built)."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and native.library() is not None


@dataclass
class Int8Weight:
    codes: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K / GROUP) fp16
    dtype: torch.dtype = torch.float32  # the compute dtype it stands in for (what an embedding lookup gives)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 2

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Int8Weight:
        n, k = shape
        return cls(torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // GROUP, dtype=torch.float16), dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> Int8Weight:
        """Symmetric 8-bit groups of GROUP along K: scale = max |w| / 127 (in fp16), code = round(w / scale)."""
        n, k = w.shape
        groups = w.float().reshape(n, k // GROUP, GROUP)
        scale = (groups.abs().amax(-1) / 127).to(torch.float16)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.round(groups / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        return cls(codes.reshape(n, k).contiguous(), scale.contiguous(), dtype)

    @classmethod
    def from_q8_0(cls, blocks: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> Int8Weight:
        """A GGUF Q8_0 tensor as stored: blocks of 34 bytes (fp16 scale, 32 int8 codes), row-major over (N, K)."""
        n, k = shape
        raw = blocks.reshape(n * (k // GROUP), 34)
        scale = raw[:, :2].contiguous().view(torch.float16).reshape(n, k // GROUP)
        codes = raw[:, 2:].contiguous().view(torch.int8).reshape(n, k)
        return cls(codes, scale.contiguous(), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
        n0, n1 = rows or (0, self.shape[0])
        out = torch.empty(n1 - n0, self.shape[1], dtype=dtype)
        if not native.int8_dequantize(self.codes, self.scale, n0, n1, out):
            values = self.codes[n0:n1].float().reshape(n1 - n0, -1, GROUP) * self.scale[n0:n1, :, None].float()
            out.copy_(values.reshape(out.shape))
        return out

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` of W in the compute dtype (an embedding lookup)."""
        codes, scale = self.codes[ids.reshape(-1)], self.scale[ids.reshape(-1)]
        values = codes.float().reshape(codes.shape[0], -1, GROUP) * scale[..., None].float()
        return values.to(self.dtype).reshape(*ids.shape, self.shape[1])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ W.T in x's dtype."""
        k = x.shape[-1]
        flat = x.reshape(-1, k).contiguous()
        rows, n = flat.shape[0], self.shape[0]
        y = None
        if rows <= GEMV_ROWS:
            y = native.int8_gemv(self.codes, self.scale, flat)
        if y is None:
            y = torch.empty(rows, n, dtype=x.dtype)
            step = max(1, TILE_BYTES // (k * x.element_size()))
            for n0 in range(0, n, step):
                n1 = min(n, n0 + step)
                y[:, n0:n1] = flat @ self.dequantize(x.dtype, (n0, n1)).T
        return y.view(*x.shape[:-1], n)
