"""4-bit (and 8-bit) dequantization on CUDA in one pass: a Triton kernel reading the packed codes and the fp16
scale and minimum of each group, writing fp16, bf16 or fp32 (quantization.py has the layout and the torch path).

The torch path makes ~8 passes over 16M-element chunks (~37 bytes of GPU memory traffic per weight, thousands of
launches per step); this reads half a byte and writes one value per weight, one launch per tensor. Values are
bit-identical to the torch path: `code * scale` and `+ minimum` rounded separately in fp32 (no fused
multiply-add: `enable_fp_fusion=False`), clamped to +-65504, rounded to the output dtype to nearest even (bf16 by
integer arithmetic, as native/int4.c does, which Triton's interpreter also gets right). `usable` runs a one-time
self-check against the torch path, per kind of tensor on its device; where it fails, `compression.dequantize` keeps
the torch path.
TRITON_INTERPRET=1 runs the kernel on a CPU (tests); FLEXGEN_LITE_TRITON=0 turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch

from .quantization import QuantizedTensor, _layout, dequantize_reference, quantize

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE = 2048  # values per program: TILE / G groups x G when a group's values are contiguous (inner == 1), else
# G x 2 * TILE / G along the inner dims


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(build) -> str | None:
    """Why Triton kernels are not used here: FLEXGEN_LITE_TRITON=0, or `build` (jitting them) fails; else None."""
    if os.environ.get("FLEXGEN_LITE_TRITON", "1") == "0":
        return "FLEXGEN_LITE_TRITON=0"
    try:
        build(interpreting())
    except Exception as e:  # ImportError, or a triton that cannot build here
        return f"triton unavailable: {type(e).__name__}: {e}"
    return None


@functools.cache
def _kernels(interpret: bool):
    """The jitted kernels, contiguous and strided (made on first use: Triton decides at `jit` whether it
    interprets)."""
    import triton
    import triton.language as tl

    # sizes not specialized on: the self-check's small tensor runs the very binary the engine's large ones do
    @triton.jit(do_not_specialize=["n_rows", "length", "inner", "n_groups"])
    def dequantize_kernel(codes, scale, minimum, out, n_rows, length, inner, n_groups,
                          G: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, INNER_ONE: tl.constexpr,
                          PADDED: tl.constexpr):
        # a "row" is one group: G codes (x inner) with one scale and minimum (per inner index)
        g = tl.arange(0, G)
        if INNER_ONE:  # a tile of BLOCK rows x G: codes and output contiguous, stats one per row
            r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            keep = r < n_rows
            p = r.to(tl.int64)[:, None] * G + g[None, :]
            stat = r.to(tl.int64)[:, None] + 0 * g[None, :]
            if PADDED:
                o = r // n_groups
                el = (r - o * n_groups)[:, None] * G + g[None, :]
                keep2 = keep[:, None] & (el < length)
                dst = o.to(tl.int64)[:, None] * length + el
            else:
                keep2 = keep[:, None] & (g[None, :] < G)
                dst = p
        else:  # one row x BLOCK inner indices: stats contiguous along inner
            r = tl.program_id(0).to(tl.int64)
            i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            o = r // n_groups
            el = (r - o * n_groups) * G + g
            keep2 = (el < length)[:, None] & (i < inner)[None, :]
            p = r * G * inner + g[:, None] * inner + i[None, :]
            stat = r * inner + i[None, :] + 0 * g[:, None]
            dst = o * length * inner + el[:, None] * inner + i[None, :]
        if BITS == 4:
            byte = tl.load(codes + (p >> 1), mask=keep2, other=0).to(tl.int32)
            c = (byte >> ((p & 1) * 4).to(tl.int32)) & 15
        else:
            c = tl.load(codes + p, mask=keep2, other=0).to(tl.int32)
        s = tl.load(scale + stat, mask=keep2, other=0).to(tl.float32)
        m = tl.load(minimum + stat, mask=keep2, other=0).to(tl.float32)
        y = c.to(tl.float32) * s + m
        y = tl.minimum(tl.maximum(y, -65504.0), 65504.0)
        if out.dtype.element_ty == tl.bfloat16:
            u = y.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(out + dst, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=keep2)
        else:
            tl.store(out + dst, y.to(out.dtype.element_ty), mask=keep2)


    # sizes and the scales' strides not specialized on; the codes' and the output's are (16-byte accesses)
    @triton.jit(do_not_specialize=["n_rows", "heads", "length", "s0", "s1", "s2"])
    def dequantize_strided(codes, scale, minimum, out, n_rows, heads, length, c0, c1, c2, s0, s1, s2, o0, o1, o2,
                           G: tl.constexpr, NG: tl.constexpr, BLOCK: tl.constexpr):
        # a "row" is one group of G values along the last dimension of an (A, B, L, .) array: (a, b, position,
        # group) in that order; every array by its own strides (a cache part's prefix in place, or a slot's)
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = r < n_rows
        gi = r % NG
        t = r // NG
        ab = t // length
        a, b, pos = (ab // heads).to(tl.int64), (ab % heads).to(tl.int64), (t % length).to(tl.int64)
        h = tl.arange(0, G // 2)
        byte = tl.load(codes + (a * c0 + b * c1 + pos * c2 + gi * (G // 2))[:, None] + h[None, :],
                       mask=keep[:, None] & (h[None, :] < G // 2), other=0).to(tl.int32)
        c = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK, G))  # value 2j from the low nibble, 2j + 1 the high
        stat = a * s0 + b * s1 + pos * s2 + gi
        s = tl.load(scale + stat, mask=keep, other=0).to(tl.float32)
        m = tl.load(minimum + stat, mask=keep, other=0).to(tl.float32)
        y = tl.minimum(tl.maximum(c.to(tl.float32) * s[:, None] + m[:, None], -65504.0), 65504.0)
        if out.dtype.element_ty == tl.bfloat16:  # to nearest even by integers: then exact in bf16
            u = y.to(tl.uint32, bitcast=True)
            y = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        g = tl.arange(0, G)
        tl.store(out + (a * o0 + b * o1 + pos * o2 + gi * G)[:, None] + g[None, :], y.to(out.dtype.element_ty),
                 mask=keep[:, None] & (g[None, :] < G))

    return dequantize_kernel, dequantize_strided


def supported(q: QuantizedTensor, dtype: torch.dtype) -> bool:
    g = q.config.group_size
    return dtype in DTYPES and q.config.bits in (4, 8) and g & (g - 1) == 0 and 1 <= g <= 1024


def _kind(q: QuantizedTensor, dtype: torch.dtype) -> tuple:
    """What the kernel is compiled for: (dtype, bits, group size, inner == 1, padded groups)."""
    _, length, n_groups, inner, _ = _layout(q.shape, q.config)
    return dtype, q.config.bits, q.config.group_size, inner == 1, length != n_groups * q.config.group_size


def dequantize(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`compression.dequantize` by the kernel (no checks of `out`: the caller's)."""
    outer, length, n_groups, inner, _ = _layout(q.shape, q.config)
    target = out if out is not None and out.is_contiguous() else torch.empty(q.shape, dtype=dtype, device=q.device)
    if target.numel():
        g, rows = q.config.group_size, outer * n_groups
        scale, minimum = q.scale.contiguous(), q.minimum.contiguous()
        if inner == 1 and q.config.bits == 4 and length == n_groups * g:  # whole groups side by side: a group a
            # "position" of the strided kernel, whose loads take a group's bytes together (the kernel below loads a
            # byte and two statistics a value: 50 loads a thread where that one issues 7 on sm90)
            dequantize_prefix(q.data.contiguous().view(1, 1, rows, g // 2), scale.view(1, 1, rows, 1),
                              minimum.view(1, 1, rows, 1), target.view(1, 1, rows, g), q.config)
        else:
            _dequantize_rows(q, scale, minimum, target, rows, length, inner, n_groups)
    if out is None or target is out:
        return target
    return out.copy_(target)


def _dequantize_rows(q: QuantizedTensor, scale: torch.Tensor, minimum: torch.Tensor, target: torch.Tensor, rows: int,
                     length: int, inner: int, n_groups: int) -> None:
    g = q.config.group_size
    if inner == 1:
        block = max(1, TILE // g)
        grid = (-(-rows // block),)
    else:
        block = max(16, 2 * TILE // g)
        grid = (rows, -(-inner // block))
    on = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on:  # Triton launches on the current device's current stream
        _kernels(interpreting())[0][grid](q.data.contiguous(), scale, minimum, target, rows, length, inner, n_groups,
                                          G=g, BITS=q.config.bits, BLOCK=block, INNER_ONE=inner == 1,
                                          PADDED=length != n_groups * g, enable_fp_fusion=False)


def prefix_supported(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor,
                     config) -> bool:
    """dequantize_prefix's arrays: 4-D, 4 bits, groups of a power of two along the last dimension, whole, which is
    contiguous in each array; scales and minima laid out alike."""
    g = config.group_size
    return (out.dtype in DTYPES and config.bits == 4 and config.group_dim in (-1, 3) and codes.dim() == out.dim() == 4
            and g & (g - 1) == 0 and 2 <= g <= 1024 and out.shape[-1] % g == 0 and out.stride(-1) == 1
            and codes.stride(-1) == 1 and scale.stride() == minimum.stride() and scale.stride(-1) == 1)


def dequantize_prefix(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor,
                      config) -> torch.Tensor:
    """(A, B, L, D/2) codes and (A, B, L, D/G) scales and minima, each by its own strides (a cache part's first L
    positions where it is stored), dequantized into `out` (A, B, L, D, by its strides: a slot's first L positions)
    in one pass: no gathered copies of the prefix, no temporary. The same values as `dequantize`."""
    heads, length, d = out.shape[1], out.shape[2], out.shape[3]
    g = config.group_size
    rows = out.shape[0] * heads * length * (d // g)
    if rows:
        on = torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext()
        block = max(1, TILE // g)
        with on:
            _kernels(interpreting())[1][(-(-rows // block),)](
                codes, scale, minimum, out, rows, heads, length, *codes.stride()[:3], *scale.stride()[:3],
                *out.stride()[:3], G=g, NG=d // g, BLOCK=block, enable_fp_fusion=False)
    return out


_warned: list[bool] = []
_lock = threading.Lock()


def usable(q: QuantizedTensor, dtype: torch.dtype) -> bool:
    """Whether the kernel runs here and equals the torch path bit for bit, for this kind of tensor on its device
    (checked once per kind, on a small one: only what the engine uses is compiled). On CUDA the first refusal is
    said with a warning."""
    with _lock:  # I/O threads may ask at once (weights, cache): one compiles and checks, the others wait
        why = _refusal(q.device, *_kind(q, dtype))
    if why is not None and q.device.type == "cuda" and not _warned:
        _warned.append(True)
        warnings.warn(f"4-bit dequantization on {q.device} uses the torch path (slower): {why}", stacklevel=3)
    return why is None


@functools.cache
def _refusal(device: torch.device, dtype: torch.dtype, bits: int, group: int, inner_one: bool,
             padded: bool) -> str | None:
    return unavailable(_kernels) or _self_check(device, dtype, bits, group, inner_one, padded)


def _self_check(device: torch.device, dtype: torch.dtype, bits: int, group: int, inner_one: bool,
                padded: bool) -> str | None:
    from .quantization import CompressionConfig

    length = 2 * group - (5 if padded else 0)
    shape, dim = ((3, length), 1) if inner_one else ((length, 7), 0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    try:
        q = quantize(x.to(dtype).to(device), CompressionConfig(bits, group, dim))
        got, want = dequantize(q, dtype), dequantize_reference(q, dtype, None)
    except Exception as e:  # a kernel that fails to compile or launch here
        return f"self-check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not torch.equal(got, want):
        bad = (got.float() - want.float()).abs().max().item()
        return f"self-check mismatch ({dtype}, {bits} bits, groups of {group}, inner == 1: {inner_one}: {bad:g})"
    if inner_one and not padded and bits == 4:
        return _self_check_prefix(device, dtype, group)
    return None


def _self_check_prefix(device: torch.device, dtype: torch.dtype, group: int) -> str | None:
    """dequantize_prefix over the first 5 of 8 positions of a stored (2, 3, 8, 2 x group) array, into the first 5 of
    a 9-position slot, against the torch path over the same prefix made contiguous."""
    from .quantization import CompressionConfig

    config = CompressionConfig(4, group, -1)
    x = torch.randn(2, 3, 8, 2 * group, generator=torch.Generator().manual_seed(1)) * 3
    q = quantize(x.to(dtype).to(device), config)
    codes = q.data.view(2, 3, 8, group)
    slot = torch.zeros(2, 3, 9, 2 * group, dtype=dtype, device=device)
    try:
        got = dequantize_prefix(codes[:, :, :5], q.scale[:, :, :5], q.minimum[:, :, :5], slot[:, :, :5], config)
    except Exception as e:
        return f"self-check of prefixes failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    want = dequantize_reference(quantize(x[:, :, :5].to(dtype).to(device), config), dtype, None)
    if not torch.equal(got, want) or slot[:, :, 5:].any():
        return f"self-check mismatch of prefixes ({dtype}, groups of {group})"
    return None


def prefix_usable(out: torch.Tensor, config) -> bool:
    """`usable` for dequantize_prefix: the kernels checked for this kind, prefixes too."""
    with _lock:
        return _refusal(out.device, out.dtype, 4, config.group_size, True, False) is None


def reset() -> None:
    """Forget the checks (tests; after changing FLEXGEN_LITE_TRITON)."""
    _refusal.cache_clear()
    _warned.clear()
