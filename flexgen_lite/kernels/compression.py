"""Compressed tensors (quantization.py) and their dequantization where they are: on CUDA by one fused kernel
(dequant_triton.py) where it passed its self-check, elsewhere by the torch path. Importers use this module."""

from __future__ import annotations

import torch

from . import dequant_triton
from .quantization import (
    CompressionConfig,
    QuantizedTensor,
    compressed_nbytes,
    dequantize_reference,
    from_bytes,
    quantize,
    to_bytes,
)

__all__ = [
    "CompressionConfig",
    "QuantizedTensor",
    "compressed_nbytes",
    "dequantize",
    "dequantize_reference",
    "from_bytes",
    "quantize",
    "to_bytes",
]


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
    return dequantize_reference(q, dtype, out)
