"""RMSNorm and the rotary embedding on a CPU by the C kernels (native/elementwise.c): one pass each where torch
makes several, with torch's bits (the kernels' note). None where they cannot run (no library, another device,
mixed dtypes): the caller's torch code runs then."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native

TEAM_WORK = 1 << 16  # elements below which a call runs on the calling thread (a decode step's rows)
TORCH_GRAIN = 32768  # a single row this long torch sums on several threads: another order (left to torch)


@functools.cache
def torch_lanes() -> int:
    """The vector width (fp32 lanes) whose order of summing gives torch's RMSNorm here bit for bit, found once
    per process by trying the likely ones on random rows (this torch on an AVX-512 CPU sums with 8, not 16);
    0 when none does: RMSNorm is then torch's."""
    if native.library() is None:
        return 0
    g = torch.Generator().manual_seed(7)
    rows = [3 * torch.randn(37, 576, generator=g), 3 * torch.randn(3, 4100, generator=g)]
    weights = [torch.randn(x.shape[-1], generator=g) for x in rows]
    expected = [w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
                for x, w in zip(rows, weights, strict=True)]
    for width in (8, 16, 4, 32):
        if all(torch.equal(_rms_norm(x, w, 1e-6, width), e) for x, w, e in zip(rows, weights, expected, strict=True)):
            return width
    return 0


def _ready(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return (native.library() is not None and dtype in native.OUT_KIND
            and all(t.device.type == "cpu" and t.dtype == dtype and t.stride(-1) == 1 for t in tensors))


def _run(rows: int, work: int, team, ranged) -> None:
    """team(threads) on torch's OpenMP pool, or ranged(r0, r1) on this thread or the Python pool."""
    threads = native.team_threads()
    if work < TEAM_WORK:
        ranged(0, rows)
    elif threads:
        team(threads)
    else:
        native.parallel(ranged, rows, cost=work)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * round(x * rsqrt(mean(x^2, -1) + eps)) (transformers' LlamaRMSNorm) over x's last dim, with
    torch's bits: its sum's order at the width that reproduces torch here (`torch_lanes`)."""
    n = x.shape[-1]
    if not _ready(x, weight) or weight.shape != (n,) or not weight.is_contiguous() or x.numel() == 0:
        return None
    width = torch_lanes()
    return _rms_norm(x, weight, eps, width) if width and width <= n < TORCH_GRAIN else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, width: int) -> torch.Tensor | None:
    n = x.shape[-1]
    rows = x.numel() // n
    flat = x.reshape(rows, n)
    if flat.stride(0) < n:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    lib, kind = native.library(), native.OUT_KIND[x.dtype]
    args = (flat.data_ptr(), weight.data_ptr(), out.data_ptr(), kind)
    _run(rows, rows * n, lambda threads: lib.rms_norm_team(*args, rows, n, flat.stride(0), eps, width, threads),
         lambda r0, r1: lib.rms_norm_range(*args, n, flat.stride(0), eps, width, r0, r1))
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x * cos + rotate_half(x) * sin for x (B, heads, T, d) and cos, sin (B, 1, T, d) (layers.apply_rope),
    contiguous."""
    if x.dim() != 4 or not _ready(x, cos, sin) or cos.shape != sin.shape or cos.stride() != sin.stride():
        return None
    b, heads, t, d = x.shape
    if cos.shape != (b, 1, t, d) or d % 2 or x.numel() == 0:
        return None
    out = torch.empty(b, heads, t, d, dtype=x.dtype)
    lib, kind = native.library(), native.OUT_KIND[x.dtype]
    xst, cst = (ctypes.c_int64 * 3)(*x.stride()[:3]), (ctypes.c_int64 * 2)(cos.stride(0), cos.stride(2))
    args = (x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), kind, heads, t, d, xst, cst)
    rows = b * heads * t
    _run(rows, rows * d, lambda threads: lib.rope_team(*args, rows, threads),
         lambda r0, r1: lib.rope_range(*args, r0, r1))
    return out
