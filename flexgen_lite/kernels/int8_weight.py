"""The embedding and head in 8 bits on a CPU (--compress-weight): int8 codes with one fp16 scale per 32 values
along the input dimension, llama.cpp's Q8_0 (a GGUF's Q8_0 tensor is kept as stored, bit for bit).

A decode step of a few rows reads the whole head once: a 128,256-word head of 2048 is 0.53 GB in bf16, half of a
1B model's 4-bit step, and 0.28 GB here. native.int8_gemv reads the codes as they are, for as many rows as it is
faster than the head in the compute dtype here (`head_wins`: the profile measures both); more rows (a prefill's)
multiply TILE_BYTES of dequantized rows at a time, dense.
Symmetric rounding to 8 bits moves a value by at most 1/254 of its group's largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..system.profile_store import cpu_profile, profile_dependent
from . import native

GROUP = 32
TILE_BYTES = 2 << 20  # dequantized rows per dense product: they stay in the CPU's cache
GEMV_ROWS = 4  # without the profile's measure (head_wins): one pass of int8.c over the codes (XROWS). Where the
# CPU multiplies bf16 by its dot instruction the dense bf16 head wins from 2-4 rows; in fp32 the 8-bit kernel wins
# to 32 rows (49,152 x 576 at 8 rows: 3.9 ms against 1.7 dense in bf16, 4.4 against 12.2 in fp32; AVX-512 bf16 VM)


def int8_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of a matrix (N, K) stored in 8 bits: codes and fp16 scales."""
    n, k = shape
    return n * k + n * (k // GROUP) * 2


@profile_dependent
def head_wins(dtype: torch.dtype, rows: int, n: int, k: int) -> bool:
    """Whether a decode step's `rows` rows multiply an 8-bit (n, k) head faster by its C kernel than the head in
    `dtype` here, as this machine's profile measured both; without that measure, up to GEMV_ROWS rows."""
    hw = cpu_profile()
    wins = None if hw is None else hw.int8_head_wins(str(dtype).removeprefix("torch."), rows, k, n)
    return rows <= GEMV_ROWS if wins is None else wins


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
        return self.rows(ids).to(self.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` of W in fp32, exact."""
        codes, scale = self.codes[ids.reshape(-1)], self.scale[ids.reshape(-1)]
        values = codes.float().reshape(codes.shape[0], -1, GROUP) * scale[..., None].float()
        return values.reshape(*ids.shape, self.shape[1])

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x (..., K) @ W.T in `out_dtype` (default x's: the kernel's fp32 sums kept in fp32 where asked)."""
        k = x.shape[-1]
        flat = x.reshape(-1, k).contiguous()
        rows, n = flat.shape[0], self.shape[0]
        y = None
        if rows <= GEMV_ROWS or head_wins(x.dtype, rows, n, k):
            y = native.int8_gemv(self.codes, self.scale, flat, out_dtype)
        if y is None:
            y = torch.empty(rows, n, dtype=out_dtype or x.dtype)
            step = max(1, TILE_BYTES // (k * x.element_size()))
            for n0 in range(0, n, step):
                n1 = min(n, n0 + step)
                y[:, n0:n1] = flat @ self.dequantize(x.dtype, (n0, n1)).T
        return y.view(*x.shape[:-1], n)
