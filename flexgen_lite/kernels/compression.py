"""Compressed tensors (quantization.py), their quantization and dequantization where they are: on CUDA by one
fused kernel each (quantize_triton.py, dequant_triton.py) where it passed its self-check, elsewhere by the torch
path. Importers use this module."""

from __future__ import annotations

import torch

from . import dequant_triton, native, quantize_triton
from .quantization import (
    CompressionConfig,
    QuantizedTensor,
    compressed_nbytes,
    dequantize_reference,
    from_bytes,
    grouped,
    to_bytes,
)
from .quantization import quantize as quantize_reference

__all__ = [
    "CompressionConfig",
    "QuantizedTensor",
    "compressed_nbytes",
    "dequantize",
    "dequantize_prefix",
    "dequantize_reference",
    "from_bytes",
    "quantize",
    "quantize_reference",
    "to_bytes",
]


def quantize(x: torch.Tensor, config: CompressionConfig) -> QuantizedTensor:
    """Group-wise quantization of ``x`` where it is (quantization.py); on CUDA by one fused kernel
    (quantize_triton.py) where it passed its self-check there: a decode step's token in one launch, not ~35; on a
    CPU, 4 bits in groups along the last dimension by the C kernel (native.int4_quantize_rows), bit for bit."""
    if x.is_cuda and quantize_triton.supported(x, config) and quantize_triton.usable(x, config):
        return quantize_triton.quantize(x, config)
    if x.device.type == "cpu" and config.bits == 4 and x.dim() and config.group_dim in (-1, x.dim() - 1):
        found = native.int4_quantize_rows(x, config.group_size)
        if found is not None:
            return QuantizedTensor(*found, shape=tuple(x.shape), config=config)
    return quantize_reference(x, config)


def dequantize(
    q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruct ``q`` as a ``dtype`` tensor on ``q.device`` (into ``out`` if given); on CUDA by one fused
    kernel (dequant_triton.py) where it passed its self-check there."""
    if out is not None and (
        tuple(out.shape) != q.shape or out.dtype != dtype or out.device != q.device
    ):
        raise ValueError(
            f"out must have shape {q.shape}, dtype {dtype} and device {q.device}; "
            f"got {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    if q.data.is_cuda and dequant_triton.supported(q, dtype) and dequant_triton.usable(q, dtype):
        return dequant_triton.dequantize(q, dtype, out)
    if q.data.device.type == "cpu" and q.config.bits == 4 and native.library() is not None:
        found = _dequantize_native(q, dtype, out)
        if found is not None:
            return found
    return dequantize_reference(q, dtype, out)


def _dequantize_native(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor | None:
    """On a CPU, 4 bits by the C kernel in one pass (native.int4_dequantize_groups), bit for bit: the torch path
    takes ~8 passes and an OpenMP team per call, which from the engine's I/O threads beside the compute thread's
    cost 5-10x the arithmetic (FlexGen's weight grouping, dequantized every step)."""
    shape = grouped(q)
    if shape is None or (out is not None and not out.is_contiguous()):
        return None
    target = torch.empty(q.shape, dtype=dtype) if out is None else out
    return target if native.int4_dequantize_groups(q.data, q.scale, q.minimum, shape, target) else None


def dequantize_prefix(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor,
                      config: CompressionConfig) -> torch.Tensor:
    """(A, B, L, .) codes, scales and minima of values grouped along the last dimension, any strides (a cache
    part's first L positions where they are stored), dequantized into `out` (A, B, L, D), any strides (a slot's
    first L positions): on CUDA in one pass (dequant_triton.dequantize_prefix), else through `dequantize`."""
    kernel = out.is_cuda and dequant_triton.prefix_supported(codes, scale, minimum, out, config)
    if kernel and dequant_triton.prefix_usable(out, config):
        return dequant_triton.dequantize_prefix(codes, scale, minimum, out, config)
    q = QuantizedTensor(codes.reshape(-1), scale, minimum, tuple(out.shape), config)
    return dequantize(q, out.dtype, out=out)
