"""4-bit group-wise quantization on CUDA in one launch: a Triton kernel for tensors grouped along their last
dimension (a KV cache's head_dim, a weight's input dimension), bit-identical to the torch path
(`quantization.quantize`) on the same device.

A decode step stores one token's k and v into every compressed cache part of every layer. The torch path takes
~35 launches a tensor for that (min, max, the fp16 roundings up and down, the codes, their packing): the H100
run's profile measured 0.64 ms a store, 0.15 s of the OPT-30B auto row's 0.56 s decode step. This is one launch.

Bit for bit: the minimum rounded down and the scale rounded up to fp16 by stepping the bit pattern, as
quantization._fp16_round does; codes rounded half to even exactly (floor and the remainder, never `x + 0.5`).
Only one thing differs by device, so the kernel takes it as a switch: torch divides the range by the number of
levels as `range * fp32(1 / levels)` on CUDA (a CPU scalar divisor) and as a true division on a CPU.
`usable` checks the kernel against the torch path once per kind on its device; elsewhere the torch path runs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import numpy as np
import torch

from .dequant_triton import DTYPES, interpreting, unavailable
from .quantization import CompressionConfig, QuantizedTensor
from .quantization import quantize as quantize_reference

BLOCK = 32  # groups per program


@functools.cache
def _kernel(interpret: bool):
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n_groups"])
    def quantize_kernel(x, codes, scale, minimum, n_groups, inv_levels, G: tl.constexpr, LEVELS: tl.constexpr,
                        BLOCK: tl.constexpr, RECIPROCAL: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # groups; a group's G values are contiguous
        i = tl.arange(0, G)
        keep = (r < n_groups)[:, None] & (i < G)[None, :]
        v = tl.load(x + r.to(tl.int64)[:, None] * G + i[None, :], mask=keep, other=0).to(tl.float32)
        mn = tl.minimum(tl.maximum(tl.min(v, 1), -65504.0), 65504.0)
        mx = tl.minimum(tl.maximum(tl.max(v, 1), -65504.0), 65504.0)
        # the minimum rounded down to fp16: the next pattern toward -inf where rounding to nearest went up
        low = mn.to(tl.float16)
        bits = low.to(tl.int16, bitcast=True)
        down = tl.where(low > 0, bits - 1, tl.where(bits == 0, -32767, bits + 1)).to(tl.int16)
        low = tl.where(low.to(tl.float32) > mn, down, bits).to(tl.float16, bitcast=True)
        m = low.to(tl.float32)
        spread = tl.maximum(mx - m, 0.0)
        if RECIPROCAL:
            step = spread * inv_levels
        else:
            step = tl.math.div_rn(spread, tl.full(spread.shape, LEVELS, tl.float32))
        up = step.to(tl.float16)  # rounded up to fp16 (steps are >= 0: the next pattern)
        ubits = up.to(tl.int16, bitcast=True)
        up = tl.where(up.to(tl.float32) < step, ubits + 1, ubits).to(tl.int16).to(tl.float16, bitcast=True)
        s = up.to(tl.float32)
        inv = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)
        y = (v - m[:, None]) * inv[:, None]  # two roundings, as torch's sub_ then mul_
        f = tl.floor(y)
        rest = y - f  # exact
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        f = tl.where((rest > 0.5) | ((rest == 0.5) & odd), f + 1.0, f)  # to nearest, ties to even
        q = tl.minimum(tl.maximum(f, 0.0), LEVELS).to(tl.int32)
        lo, hi = tl.split(tl.reshape(q, (BLOCK, G // 2, 2)))  # value 2j in the low nibble, 2j + 1 in the high
        h = tl.arange(0, G // 2)
        tl.store(codes + r.to(tl.int64)[:, None] * (G // 2) + h[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=(r < n_groups)[:, None] & (h < G // 2)[None, :])
        tl.store(scale + r, up, mask=r < n_groups)
        tl.store(minimum + r, low, mask=r < n_groups)

    return quantize_kernel


def supported(x: torch.Tensor, config: CompressionConfig) -> bool:
    """4-bit groups along the last dimension, whole (no padded group), of a power-of-two size."""
    g = config.group_size
    return (x.dtype in DTYPES and config.bits == 4 and config.group_dim in (-1, x.dim() - 1) and x.dim() >= 1
            and 2 <= g <= 1024 and g & (g - 1) == 0 and x.shape[-1] % g == 0)


def quantize(x: torch.Tensor, config: CompressionConfig, reciprocal: bool | None = None) -> QuantizedTensor:
    """`quantization.quantize` by the kernel; reciprocal: divide the range as torch does on CUDA (default: where
    `x` is)."""
    g, shape = config.group_size, tuple(x.shape)
    groups = x.numel() // g
    codes = torch.empty(x.numel() // 2, dtype=torch.uint8, device=x.device)
    stat_shape = (*shape[:-1], shape[-1] // g)
    scale, minimum = (torch.empty(stat_shape, dtype=torch.float16, device=x.device) for _ in range(2))
    if groups:
        levels = 2**config.bits - 1
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _kernel(interpreting())[(-(-groups // BLOCK),)](
                x.contiguous(), codes, scale, minimum, groups, float(np.float32(1) / np.float32(levels)),
                G=g, LEVELS=levels, BLOCK=BLOCK, RECIPROCAL=x.is_cuda if reciprocal is None else reciprocal,
                enable_fp_fusion=False)
    return QuantizedTensor(data=codes, scale=scale, minimum=minimum, shape=shape, config=config)


_warned: list[bool] = []
_lock = threading.Lock()


def usable(x: torch.Tensor, config: CompressionConfig) -> bool:
    """Whether the kernel runs here and equals the torch path bit for bit for this kind (device, dtype, group
    size), checked once on a small tensor; on CUDA a refusal is said once."""
    with _lock:
        why = _refusal(x.device, x.dtype, config.group_size)
    if why is not None and x.is_cuda and not _warned:
        _warned.append(True)
        warnings.warn(f"4-bit quantization on {x.device} uses the torch path (more launches): {why}", stacklevel=3)
    return why is None


@functools.cache
def _refusal(device: torch.device, dtype: torch.dtype, group: int) -> str | None:
    return unavailable(_kernel) or _self_check(device, dtype, group)


def _self_check(device: torch.device, dtype: torch.dtype, group: int) -> str | None:
    config = CompressionConfig(4, group, -1)
    x = torch.randn(5, 3, 2 * group, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, :group] = 1.5  # a constant group: scale 0, codes 0
    x = x.to(dtype).to(device)
    try:
        got, want = quantize(x, config), quantize_reference(x, config)
    except Exception as e:  # a kernel that fails to compile or launch here
        return f"self-check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for name in ("data", "scale", "minimum"):
        if not torch.equal(getattr(got, name), getattr(want, name).reshape(getattr(got, name).shape)):
            return f"self-check mismatch ({dtype}, groups of {group}: {name})"
    return None


def reset() -> None:
    """Forget the checks (tests; after changing FLEXGEN_LITE_TRITON)."""
    _refusal.cache_clear()
    _warned.clear()
