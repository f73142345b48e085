"""4-bit weights multiplied as they are stored, on a CPU: torch's int4 weight-only matmul (the kernel
gpt-fast uses) reads the packed codes and group scales directly, so a decode step reads 0.56 bytes per
weight instead of dequantizing it into a slot (a pass that costs as much as the multiply at small batch).

A weight qualifies when it is a matrix (N, K) quantized to 4 bits in groups along K of 32, 64, 128 or 256,
with N a multiple of 64 (the kernel's block of output rows). It is stored as

    packed codes (N * K / 2 bytes, the layout below) | scale (K / g, N) fp16 | minimum (K / g, N) fp16

which is exactly `compressed_nbytes` of the same weight. The layout is torch's AVX-512 one (byte (b, k, j) holds the
codes of rows 64 b + j and 64 b + 32 + j at column k), made by `pack` itself: torch packs other CPUs' weights
otherwise (row-major pairs of columns on AVX2), and its int4 kernel is used only where it reads this layout
(`available`). At a few rows (decode steps of small batches) a C kernel multiplies the codes itself
(native.int4_gemv), else torch's kernel does where it can. Two other ways multiply it, both
through a C kernel that unpacks the layout (flexgen_lite.kernels.native, bit-identical to
`Int4Weight.dequantize_t`'s torch path): by tiles (a cache-sized slice of rows dequantized and multiplied dense at
a time: decode batches), or dequantized whole once into a slot for dense matmuls (many rows: prefill, or a block's
GPU batches sharing it). `int4_cost.int4_path` takes the fastest by this machine's stored profile, the same in
every run.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from ..system.profile_store import cpu_profile, profile_dependent
from . import native
from .compression import CompressionConfig, QuantizedTensor, dequantize, quantize

GROUP_SIZES = (32, 64, 128, 256)
BLOCK_N = 64  # output rows per block of the kernel's packed layout: byte (block, k, j) holds rows j, j + 32
TILE_BYTES = 2 << 20  # rows of W dequantized at a time by the tiled product: they stay in the CPU's cache
GEMV_ROWS = 32  # without a profile, up to this many rows the C kernel multiplies the codes, more are dequantized
# and multiplied dense (with one, where it measured each faster: `codes_gemv_wins`, int4_cost); by tiles, 4-5x the
# C kernel at 8 rows on this VM (a manual policy's first run had SmolLM2's step at 80-110 ms instead of 15-19)


def eligible(shape: tuple[int, ...], config: CompressionConfig | None, device: torch.device) -> bool:
    """Whether a weight of `shape` compressed with `config` is stored in the layout on `device`: where the C
    kernels or torch's int4 kernel multiply it (elsewhere compression's own grouping dequantizes faster)."""
    return device.type == "cpu" and layout_fits(shape, config) and (native_agrees() or available())


def layout_fits(shape: tuple[int, ...], config: CompressionConfig | None) -> bool:
    """Whether the kernel's layout can hold a weight of `shape` compressed with `config` (on any machine:
    the cost model asks this of a profile's CPU)."""
    if config is None or len(shape) != 2 or config.bits != 4:
        return False
    n, k = shape
    return (config.group_dim % 2 == 1 and config.group_size in GROUP_SIZES and k % config.group_size == 0
            and n % BLOCK_N == 0)


@functools.cache
def available() -> bool:
    """torch's int4 kernel exists here and reads the layout: torch packs codes into it (on AVX2 CPUs it packs
    pairs of columns instead) and multiplies a random weight so stored close to its dequantized product."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return False
    try:
        w = torch.randn(2 * BLOCK_N, 96, generator=torch.Generator().manual_seed(0))
        q = quantize(w, CompressionConfig(4, 32, 1))
        stored = pack(q)
        by_torch = ops._convert_weight_to_int4pack_for_cpu(codes_of(q).to(torch.int32), 2)
        if not torch.equal(by_torch.view(-1).view(torch.uint8), stored[:by_torch.numel()]):
            return False
        weight = Int4Weight.from_bytes(stored, q.shape, 32)
        x = torch.randn(3, 96, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        product = weight.torch_kernel(x).float()
        reference = x.float() @ dequantize(q, torch.float32).t()
    except (RuntimeError, NotImplementedError):
        return False
    return float((product - reference).norm() / reference.norm()) < 1e-2


@functools.cache
def native_agrees() -> bool:
    """The C kernels (flexgen_lite.kernels.native) are built here and give exactly the torch path's bytes and values
    (checked once on a random weight: its quantization, and its dequantization into every dtype); otherwise
    the torch paths are used."""
    w = torch.randn(2 * BLOCK_N, 256, generator=torch.Generator().manual_seed(2))
    stored = pack(quantize(w, CompressionConfig(4, 64, 1)))
    weight = Int4Weight.from_bytes(stored, w.shape, 64)
    by_c = native.int4_quantize_pack(w, 64)
    if by_c is None:
        return False
    if not torch.equal(by_c, stored):
        warnings.warn("the built int4 quantization kernel disagrees with torch here: using torch's", stacklevel=2)
        return False
    for dtype in native.OUT_KIND:
        out = torch.empty(256, 2 * BLOCK_N, dtype=dtype)
        if not native.int4_dequantize_t(weight.packed, weight.scale, weight.minimum, 64, out):
            return False
        if not torch.equal(out, weight.dequantize_t(torch.empty_like(out), use_native=False)):
            warnings.warn("the built int4 dequantization kernel disagrees with torch here: using torch's",
                          stacklevel=2)
            return False
    return True


def codes_of(q: QuantizedTensor) -> torch.Tensor:
    """The codes (N, K) uint8 of a 4-bit weight quantized along K (two a byte, low nibble first)."""
    n, k = q.shape
    return torch.stack([q.data & 0x0F, q.data >> 4], dim=-1).view(n, k)


def pack(q: QuantizedTensor) -> torch.Tensor:
    """A 4-bit weight quantized along K, as the bytes it is stored as (see the module docstring)."""
    n, k = q.shape
    halves = codes_of(q).view(n // BLOCK_N, 2, BLOCK_N // 2, k)  # rows 64 b + j and 64 b + 32 + j
    packed = (halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2)  # (N / 64, K, 32)
    stats = [s.t().contiguous().view(-1).view(torch.uint8) for s in (q.scale, q.minimum)]
    return torch.cat([packed.reshape(-1), *stats])


def quantize_packed(x: torch.Tensor, config: CompressionConfig) -> torch.Tensor:
    """`pack(quantize(x, config))`, by the C kernel in one pass where it is built (about 9x faster: placing a
    13B model's weights is minutes of it), else through torch."""
    if native_agrees():
        found = native.int4_quantize_pack(x.contiguous(), config.group_size)
        if found is not None:
            return found
    return pack(quantize(x, config))


@profile_dependent
def codes_gemv_wins(dtype: torch.dtype, rows: int, n: int, k: int) -> bool:
    """Whether the C kernel (native.int4_gemv) multiplies `rows` rows by a 4-bit weight (n, k) faster than torch's
    int4 kernel here, as this machine's stored profile measured both (the cost model reads the same); without a
    profile that measured it, up to GEMV_ROWS rows."""
    hw = cpu_profile()
    if hw is None or not hw.int4_gemv:
        return rows <= GEMV_ROWS
    return hw.int4_gemv_wins(str(dtype).removeprefix("torch."), rows, k, n)


@dataclass
class Int4Weight:
    """Views into a stored weight's bytes (`pack`): what the layers multiply by, in place of a dense tensor."""

    packed: torch.Tensor  # (N, K / 2) uint8, the kernel's layout
    scale: torch.Tensor  # (K / g, N) fp16
    minimum: torch.Tensor  # (K / g, N) fp16
    group_size: int
    tiles: torch.Tensor | None = None  # set: multiplied a tile at a time, dequantized into this buffer (_tiled)

    @classmethod
    def from_bytes(cls, buf: torch.Tensor, shape: tuple[int, ...], group_size: int) -> Int4Weight:
        n, k = shape
        groups, codes = k // group_size, n * k // 2
        stats = buf[codes:codes + 4 * groups * n].view(torch.float16).view(2, groups, n)
        return cls(buf[:codes].view(n, k // 2), stats[0], stats[1], group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ W.T with the kernel, or by tiles (`tiles` set); x.dtype is the compute dtype (bf16, fp16
        or fp32)."""
        if self.tiles is not None:
            return self._tiled(x)
        rows = x.numel() // x.shape[-1]
        if codes_gemv_wins(x.dtype, rows, *self.shape) or not available():
            out = self.codes_gemv(x)
            if out is not None:
                return out
        if available():
            return self.torch_kernel(x)
        n, k = self.shape  # neither kernel here: dequantized whole
        return x @ self.dequantize_t(torch.empty(k, n, dtype=x.dtype))

    def codes_gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T by the C kernel (native.int4_gemv); None where it is not built or disagrees here."""
        if not native_agrees():
            return None
        out = native.int4_gemv(self.packed, self.scale, self.minimum, self.group_size,
                               x.reshape(-1, x.shape[-1]).contiguous())
        return None if out is None else out.view(*x.shape[:-1], out.shape[-1])

    def torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T by torch's int4 kernel: its dequantization is (q - 8) * scale + zero."""
        scale = self.scale.float()
        scale_zeros = torch.stack([scale, self.minimum.float() + 8 * scale], dim=-1).to(x.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.packed,
                                                          self.group_size, scale_zeros)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W dequantized (by the C kernel) TILE_BYTES of rows at a time into `tiles`, each tile
        multiplied dense while it is in the cache: the weight is read once as 4-bit codes and never written out
        whole (at decode batches, dequantizing all of it and a dense matmul are both bound by memory)."""
        n, k = self.shape
        x2 = x.reshape(-1, k)
        step = max(BLOCK_N, TILE_BYTES // (k * x.dtype.itemsize) // BLOCK_N * BLOCK_N)
        parts = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            tile = self.tiles[:(r1 - r0) * k].view(k, r1 - r0)
            if not native.int4_dequantize_t(self.packed, self.scale, self.minimum, self.group_size, tile, (r0, r1)):
                raise RuntimeError("the tiled int4 product needs the C kernel (flexgen_lite.kernels.native)")
            parts.append(x2 @ tile)
        return torch.cat(parts, dim=-1).view(*x.shape[:-1], n)

    def dequantize_t(self, out: torch.Tensor, chunk_rows: int = 256, use_native: bool = True) -> torch.Tensor:
        """W.T (K, N) into `out`: by the C kernel where it is built (about 9x faster on 2 cores), else a group
        of K rows at a time through a small fp32 buffer. The two give identical values."""
        if use_native and native_agrees() and native.int4_dequantize_t(self.packed, self.scale, self.minimum,
                                                                        self.group_size, out):
            return out
        n, k = self.shape
        g = self.group_size
        src = self.packed.view(n // BLOCK_N, k, BLOCK_N // 2)
        dst = out.view(k, n)
        rows = max(g, chunk_rows // g * g)
        tmp = torch.empty((rows, n // BLOCK_N, 2, BLOCK_N // 2), dtype=torch.float32)
        for r in range(0, k, rows):
            m = min(rows, k - r)
            codes, t = src[:, r:r + m].transpose(0, 1), tmp[:m]
            t[:, :, 0].copy_(codes & 0x0F)
            t[:, :, 1].copy_(codes >> 4)
            t3 = t.view(m // g, g, n)
            t3.mul_(self.scale[r // g:(r + m) // g, None]).add_(self.minimum[r // g:(r + m) // g, None])
            dst[r:r + m].copy_(t.view(m, n))
        return out
