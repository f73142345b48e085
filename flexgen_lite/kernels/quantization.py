"""Group-wise asymmetric min-max quantization (FlexGen, Sheng et al. 2023): the layout, quantize, and the
torch dequantization that is the reference (compression.dequantize adds the fused CUDA kernel).

A tensor is split into groups of ``group_size`` consecutive elements along
``group_dim``.  Each group stores an fp16 ``minimum`` and ``scale``, and every
element a ``bits``-wide code ``q`` with ``x ~= q * scale + minimum``.

Rounding guarantee: ``minimum`` is rounded *down* to fp16 and ``scale`` *up*,
and the codes are computed from these stored fp16 values, so every in-range
element maps into ``[0, 2**bits - 1]`` and for finite inputs within the fp16
range (|x| <= 65504)::

    |dequantize(q)[i] - x[i]| <= scale_g / 2 + 2**-20 * (|x[i]| + |min_g| + (2**bits - 1) * scale_g)

where ``scale_g``/``min_g`` are the stored fp16 values (as fp32) and the second
term covers fp32 arithmetic rounding.  Casting the result to a narrower dtype
adds that dtype's rounding error.  Larger magnitudes saturate to +-65504, and
dequantized values are clamped to +-65504 (which only moves them closer to an
in-range input), so fp16 outputs never overflow to inf.

The group dim is padded to a multiple of ``group_size`` by repeating its last
element, so padding never changes any group's min or max; padded codes are
stored (``compressed_nbytes`` counts them) and dropped on dequantize.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "CompressionConfig",
    "QuantizedTensor",
    "compressed_nbytes",
    "dequantize_reference",
    "from_bytes",
    "quantize",
    "to_bytes",
]

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class CompressionConfig:
    """Quantization settings: code width, group length and grouping dim."""

    bits: int = 4
    group_size: int = 64
    group_dim: int = 0

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise TypeError(f"group_size must be an int, got {self.group_size!r}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")
        if not isinstance(self.group_dim, int) or isinstance(self.group_dim, bool):
            raise TypeError(f"group_dim must be an int, got {self.group_dim!r}")


@dataclass(eq=False)
class QuantizedTensor:
    """A quantized tensor.

    ``data`` is a flat uint8 tensor of codes in row-major order of the padded
    tensor (4 bits: element ``2k`` in the low nibble of byte ``k``, ``2k+1`` in
    the high nibble).  ``scale`` and ``minimum`` are fp16 with ``shape`` except
    that the group dim holds the number of groups.
    """

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: tuple[int, ...]
    config: CompressionConfig

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes, scales and minima."""
        return sum(
            t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum)
        )

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        return QuantizedTensor(
            fn(self.data), fn(self.scale), fn(self.minimum), self.shape, self.config
        )

    def to(
        self, device: torch.device | str, non_blocking: bool = False
    ) -> QuantizedTensor:
        """Return a copy with all tensors on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> QuantizedTensor:
        """Return a copy with all tensors in pinned (page-locked) CPU memory."""
        return self._map(lambda t: t.pin_memory())


def _layout(
    shape: tuple[int, ...], config: CompressionConfig
) -> tuple[int, int, int, int, int]:
    """Return ``(outer, dim_len, n_groups, inner, group_dim)`` for ``shape``."""
    ndim = len(shape)
    if ndim == 0:
        raise ValueError("cannot quantize a 0-dim tensor")
    dim = config.group_dim
    if not -ndim <= dim < ndim:
        raise ValueError(f"group_dim {dim} out of range for shape {tuple(shape)}")
    dim %= ndim
    length = shape[dim]
    return (
        math.prod(shape[:dim]),
        length,
        -(-length // config.group_size),
        math.prod(shape[dim + 1 :]),
        dim,
    )


def grouped(q: QuantizedTensor) -> tuple[int, int, int] | None:
    """(groups, group size, inner): q's codes in flat order as groups of group-size x inner values, each group with
    inner scales and minima; None where its groups are padded past the tensor (a length not a multiple)."""
    outer, length, n_groups, inner, _ = _layout(q.shape, q.config)
    return (outer * n_groups, q.config.group_size, inner) if length == n_groups * q.config.group_size else None


def compressed_nbytes(
    shape: tuple[int, ...] | torch.Size, config: CompressionConfig
) -> int:
    """Exact ``quantize(x, config).nbytes`` for a tensor of ``shape``."""
    outer, _, n_groups, inner, _ = _layout(tuple(shape), config)
    n_stats = outer * n_groups * inner
    n_codes = n_stats * config.group_size
    return -(-n_codes * config.bits // 8) + 2 * 2 * n_stats


def _fp16_round(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Round fp32 ``x`` (finite, within fp16 range) to fp16 toward +inf or -inf."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16)
    if up:  # only used for x >= 0: the next fp16 up is the next bit pattern
        wrong = h.float() < x
        stepped = bits + 1
    else:  # positive: previous pattern; +0 -> -min_subnormal; negative: next pattern
        wrong = h.float() > x
        stepped = torch.where(
            h > 0, bits - 1, torch.where(bits == 0, -32767, bits + 1).to(torch.int16)
        )
    return torch.where(wrong, stepped, bits).view(torch.float16)


def quantize(x: torch.Tensor, config: CompressionConfig) -> QuantizedTensor:
    """Quantize a floating-point tensor group-wise (see module docstring)."""
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    shape = tuple(x.shape)
    outer, length, n_groups, inner, dim = _layout(shape, config)
    g, levels = config.group_size, 2**config.bits - 1
    t = x.reshape(outer, length, inner).to(
        torch.float32, copy=True, memory_format=torch.contiguous_format
    )
    pad = n_groups * g - length
    if pad:
        t = torch.cat([t, t[:, -1:, :].expand(outer, pad, inner)], dim=1)
    t = t.view(outer, n_groups, g, inner)
    mn, mx = torch.aminmax(t, dim=2, keepdim=True)
    minimum = _fp16_round(mn.clamp_(-_FP16_MAX, _FP16_MAX), up=False)
    mn = minimum.float()
    scale = _fp16_round(
        (mx.clamp_(-_FP16_MAX, _FP16_MAX) - mn).clamp_(min=0) / levels, up=True
    )
    s = scale.float()
    # a constant group (scale 0) gets code 0 everywhere and decodes to its minimum
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = t.sub_(mn).mul_(inv).round_().clamp_(0, levels).to(torch.uint8).view(-1)
    if config.bits == 4:
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        q = q.view(-1, 2)
        q = q[:, 0] | (q[:, 1] << 4)
    stat_shape = shape[:dim] + (n_groups,) + shape[dim + 1 :]
    return QuantizedTensor(
        data=q,
        scale=scale.reshape(stat_shape),
        minimum=minimum.reshape(stat_shape),
        shape=shape,
        config=config,
    )


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The reference (and the path off CUDA): `code * scale`, then `+ minimum`, each rounded in fp32."""
    outer, length, n_groups, inner, _ = _layout(q.shape, q.config)
    g = q.config.group_size
    n_codes = outer * n_groups * g * inner
    if out is not None and length == n_groups * g and n_codes % 2 == 0:
        if out.is_contiguous():
            return _dequantize_in_place(q, out, (outer, n_groups, g, inner))
        if _prefix_of_slot(out, q):
            return _dequantize_in_place(q, out, (outer, n_groups, g, inner), blocks=out.shape[0] * out.shape[1])
    codes = q.data
    if q.config.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(-1)[:n_codes]
    codes = codes.view(outer, n_groups, g, inner)
    scale = q.scale.reshape(outer, n_groups, 1, inner).float()
    minimum = q.minimum.reshape(outer, n_groups, 1, inner).float()
    y = codes.float().mul_(scale).add_(minimum).clamp_(-_FP16_MAX, _FP16_MAX)  # no FMA (addcmul may fuse)
    y = y.view(outer, n_groups * g, inner)
    y = y[:, :length, :].reshape(q.shape)
    if out is None:
        return y.to(dtype)
    return out.copy_(y)


def _prefix_of_slot(out: torch.Tensor, q: QuantizedTensor) -> bool:
    """Whether `out` is (A, B, L, D), grouped along D, the first L positions of a longer contiguous slot (a cache
    part's prefix read into its slot): A x B blocks of L x D values, each contiguous."""
    return (out.dim() == 4 and q.config.group_dim in (-1, 3) and out.stride(3) == 1 and out.stride(2) == out.shape[3]
            and out.stride(0) == out.shape[1] * out.stride(1))


def _dequantize_in_place(q: QuantizedTensor, out: torch.Tensor, grouped: tuple[int, int, int, int],
                         blocks: int = 1) -> torch.Tensor:
    """The fast path for weights, decompressed on every use: chunk by chunk through a small fp32 buffer
    that stays in cache, straight into `out` (large temporaries cost more than the arithmetic on a CPU;
    on a GPU chunks are 16x larger, so launches stay few). blocks: `out` is that many contiguous blocks apart
    (_prefix_of_slot), chunks whole blocks."""
    outer, n_groups, g, inner = grouped
    rows, per_row = outer * n_groups, g * inner  # a "row" is one group (x inner)
    codes = q.data.view(rows, per_row * q.config.bits // 8)
    scale, minimum = q.scale.reshape(rows, 1, inner), q.minimum.reshape(rows, 1, inner)
    if blocks > 1:
        return _dequantize_blocks(codes, scale, minimum, out, rows // blocks, g, q.config.bits)
    dst = out.view(rows, g, inner)
    # a CPU wants the chunk in its caches; a GPU wants few kernel launches (~7 per chunk)
    step = max(1, (1 << 24 if out.is_cuda else 1 << 20) // per_row)
    tmp = torch.empty((min(step, rows), per_row), dtype=torch.float32, device=out.device)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        dst[r:r + n].copy_(_chunk_values(tmp[:n], codes[r:r + n], scale[r:r + n], minimum[r:r + n], q.config.bits))
    return out


def _chunk_values(t: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """A chunk of groups' values in the fp32 buffer t (groups, g x inner): the codes unpacked, times the scale,
    plus the minimum (each (groups, 1, inner)), clamped to fp16's range; viewed (groups, g, inner)."""
    n = codes.shape[0]
    if bits == 4:
        pairs = t.view(n, -1, 2)
        pairs[..., 0].copy_(codes & 0x0F)
        pairs[..., 1].copy_(codes >> 4)
    else:
        t.copy_(codes)
    return t.view(n, -1, scale.shape[-1]).mul_(scale).add_(minimum).clamp_(-_FP16_MAX, _FP16_MAX)


def _dequantize_blocks(codes, scale, minimum, out: torch.Tensor, per_block: int, g: int, bits: int) -> torch.Tensor:
    """_dequantize_in_place into blocks apart: out (A, B, L, D) viewed (A x B, L x D / g groups, g), whole blocks
    a chunk; each group's codes, scale and minimum as there (inner 1: groups along the last dim)."""
    blocks = out.shape[0] * out.shape[1]
    dst = out.flatten(0, 1).unflatten(2, (-1, g)).flatten(1, 2)  # (blocks, groups a block, g), blocks apart
    step = max(1, (1 << 24 if out.is_cuda else 1 << 20) // (per_block * g))
    tmp = torch.empty((min(step, blocks) * per_block, g), dtype=torch.float32, device=out.device)
    for r in range(0, blocks, step):
        n = min(step, blocks - r)
        lo, hi = r * per_block, (r + n) * per_block
        values = _chunk_values(tmp[:hi - lo], codes[lo:hi], scale[lo:hi], minimum[lo:hi], bits)
        dst[r:r + n].copy_(values.view(n, per_block, g))
    return out


def to_bytes(q: QuantizedTensor) -> torch.Tensor:
    """Codes, scales and minima as one flat uint8 tensor (for a single file or copy)."""
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in (q.data, q.scale, q.minimum)])


def from_bytes(buf: torch.Tensor, shape: tuple[int, ...], config: CompressionConfig) -> QuantizedTensor:
    """Views into a buffer laid out by `to_bytes` for a tensor of `shape`."""
    outer, _, n_groups, inner, dim = _layout(tuple(shape), config)
    n_stats = outer * n_groups * inner
    n_data = -(-n_stats * config.group_size * config.bits // 8)
    stat_shape = tuple(shape[:dim]) + (n_groups,) + tuple(shape[dim + 1:])
    scale = buf[n_data:n_data + 2 * n_stats].view(torch.float16).view(stat_shape)
    minimum = buf[n_data + 2 * n_stats:n_data + 4 * n_stats].view(torch.float16).view(stat_shape)
    return QuantizedTensor(buf[:n_data], scale, minimum, tuple(shape), config)
