"""Reading a weight from its source for placement a chunk of rows at a time, cast to the compute dtype or
compressed: the transient is a chunk's values (in fp32, the compute dtype and quantization's own copy), not the
whole matrix twice (an OPT-1.3B's embedding: 0.58 GiB) or, compressed, three times (a Llama-3-70B MLP matrix,
235M values: 2.8 GB). Compressed, groups never span chunks, so the result is bit for bit the whole matrix's."""

from __future__ import annotations

import math

import torch

from ..kernels.compression import CompressionConfig, QuantizedTensor, quantize
from ..kernels.int4_matmul import BLOCK_N, quantize_packed
from ..models.specs import WeightSpec
from .weight_sources import WeightSource

READ_CHUNK = 16 << 20  # placement reads an uncompressed weight this many bytes (in the compute dtype) at a time


def read_chunk_rows(spec: WeightSpec, dtype: torch.dtype) -> int:
    """Rows of `spec` read at once: READ_CHUNK's worth (the same on every tier: DummySource's values depend on the
    rows read together)."""
    return max(1, READ_CHUNK // max(1, math.prod(spec.shape[1:]) * dtype.itemsize))


def read_in_chunks(spec: WeightSpec, source: WeightSource, dtype: torch.dtype, chunk: int | None = None):
    """(first row, rows in `dtype`) of spec from `source`, `chunk` rows (read_chunk_rows) at a time: placement's
    transient is a chunk in the source's dtype and the compute dtype, not the whole tensor twice (a Llama-3-8B's
    embedding read in fp32 and cast took 3 GiB)."""
    rows, chunk = spec.shape[0], chunk or read_chunk_rows(spec, dtype)
    for s in range(0, rows, chunk):
        yield s, source.read(spec, s, min(rows, s + chunk)).to(dtype)


def filled(out: torch.Tensor, spec: WeightSpec, source: WeightSource) -> torch.Tensor:
    """`out` (spec's shape, in memory of its own) with spec's values, read a chunk at a time."""
    for s, rows_read in read_in_chunks(spec, source, out.dtype):
        out[s:s + rows_read.shape[0]].copy_(rows_read)
    return out


def chunk_rows(spec: WeightSpec, dtype: torch.dtype, config: CompressionConfig, packed: bool) -> int | None:
    """Rows compressed at once: read_chunk_rows' worth, rounded down to whole groups where groups run
    along the rows, to whole blocks of the kernel's layout (packed) and to an even count (two 4-bit codes a
    byte); None for a weight that is not a matrix (compressed whole)."""
    if len(spec.shape) != 2:
        return None
    align = math.lcm(2, config.group_size if config.group_dim % 2 == 0 else 1, BLOCK_N if packed else 1)
    return max(align, read_chunk_rows(spec, dtype) // align * align)


def quantized_rows(spec: WeightSpec, source: WeightSource, dtype: torch.dtype,
                   config: CompressionConfig) -> QuantizedTensor:
    """quantize(spec's values in `dtype`, config), a chunk of rows at a time."""
    step = chunk_rows(spec, dtype, config, packed=False)
    if step is None or step >= spec.shape[0]:
        return quantize(source.read(spec, 0, spec.shape[0]).to(dtype), config)
    whole, row_codes = _empty_whole(spec.shape, config)
    for start, values in read_in_chunks(spec, source, dtype, step):
        part = quantize(values, config)
        stats = start // config.group_size if config.group_dim % 2 == 0 else start  # the chunk's first stats row
        first = start * row_codes * config.bits // 8  # whole bytes: start is even
        whole.data[first:first + part.data.numel()].copy_(part.data)
        whole.scale[stats:stats + part.scale.shape[0]].copy_(part.scale)
        whole.minimum[stats:stats + part.minimum.shape[0]].copy_(part.minimum)
    return whole


def _empty_whole(shape: tuple[int, ...], config: CompressionConfig) -> tuple[QuantizedTensor, int]:
    """Storage for a matrix's codes, scales and minima as quantize lays them out, and its codes a row (padded to
    whole groups where groups run along a row)."""
    n, k = shape
    along_rows = config.group_dim % 2 == 0
    groups = -(-(n if along_rows else k) // config.group_size)
    stat_shape, row_codes = ((groups, k), k) if along_rows else ((n, groups), groups * config.group_size)
    rows = groups * config.group_size if along_rows else n
    data = torch.empty(-(-rows * row_codes * config.bits // 8), dtype=torch.uint8)
    stats = [torch.empty(stat_shape, dtype=torch.float16) for _ in range(2)]
    return QuantizedTensor(data, *stats, tuple(shape), config), row_codes


def packed_rows(spec: WeightSpec, source: WeightSource, dtype: torch.dtype, config: CompressionConfig) -> torch.Tensor:
    """quantize_packed(spec's values in `dtype`, config): the int4 kernel's bytes, a chunk of rows at a time
    (codes by blocks of BLOCK_N rows, then scales and minima by column: int4_matmul.pack's layout)."""
    step = chunk_rows(spec, dtype, config, packed=True)
    n, k = spec.shape
    if step >= n:
        return quantize_packed(source.read(spec, 0, n).to(dtype), config)
    codes, stats = n * k // 2, k // config.group_size * n * 2
    out = torch.empty(codes + 2 * stats, dtype=torch.uint8)
    scale, minimum = (out[codes + i * stats:codes + (i + 1) * stats].view(torch.float16).view(-1, n) for i in (0, 1))
    for start, values in read_in_chunks(spec, source, dtype, step):
        rows = values.shape[0]
        part = quantize_packed(values, config)
        part_codes, part_stats = rows * k // 2, k // config.group_size * rows * 2
        out[start * k // 2:start * k // 2 + part_codes].copy_(part[:part_codes])
        for i, into in enumerate((scale, minimum)):
            stats_bytes = part[part_codes + i * part_stats:part_codes + (i + 1) * part_stats]
            into[:, start:start + rows].copy_(stats_bytes.view(torch.float16).view(-1, rows))
    return out
