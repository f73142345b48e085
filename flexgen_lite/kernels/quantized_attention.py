"""Decode attention on a CPU over a 4-bit KV cache as it is stored (native/attention_q4.c), and its reference.

A compressed cache part attended on the CPU (cpu_cache_compute beside a GPU, or any part on a CPU-only machine)
was dequantized whole into a dense buffer every step, then attended: a write and a read of 16 or 32 bits a
value, per layer and step. The kernel reads the codes (4 bits a value, and two fp16 statistics per group of 64)
and turns them into values where they are used: code x scale + minimum in fp32. Where a kv head has one query
head no row is made at all (its score is the sum over groups of scale x (codes . q) + minimum x sum(q)); grouped
heads share rows rebuilt 16 positions at a time. The sums are the reference's (`reference`: `dequantize` into a
buffer of the attention dtype, then SDPA) but for that buffer's rounding and the order of the additions; the
scalar path (no AVX-512, or groups padded past head_dim) rounds as the buffer does.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings

import torch
import torch.nn.functional as F

from . import native
from .quantization import CompressionConfig, QuantizedTensor, dequantize_reference

KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def supported(config: CompressionConfig | None) -> bool:
    """Whether the kernel takes a cache compressed by `config` (4 bits, groups along head_dim) and is built and
    checked here."""
    return (config is not None and config.bits == 4 and config.group_dim == -1 and config.group_size % 2 == 0
            and checked())


def attend(q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], config: CompressionConfig,
           mask: torch.Tensor | None, skip: int, k_new: torch.Tensor, v_new: torch.Tensor,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query position per row: q (B, heads, 1, d) over a cache part's stored
    slots [0, L) (k, v: codes (R, kv_heads, L, bytes), scales and minima (R, kv_heads, L, groups), any strides
    with the last dim contiguous), slot `skip` standing for the new token k_new, v_new (B, kv_heads, 1, d), not yet
    stored. mask (B, 1, 1, L) bool (None: every slot seen); rows: the cache row of each of q's rows (None: the
    same). Same dtype for q, k_new, v_new and the output."""
    lib = _library()
    b, heads, _, d = q.shape
    codes, scale = k[0], k[1]
    kv_heads, length = codes.shape[1], codes.shape[2]
    if lib is None:
        raise RuntimeError("the 4-bit attention kernel is not built here (quantized_attention.supported)")
    if not usable(q, k, v):
        raise ValueError("the 4-bit attention kernel takes CPU arrays with K's and V's laid out alike, uint8 codes, "
                         "fp16 statistics and rows of the last dim contiguous")
    if mask is None:
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask = mask.expand(b, 1, 1, length).reshape(b, length).contiguous()
    q, k_new, v_new = (x.contiguous() for x in (q, k_new, v_new))
    out = torch.empty(b, heads, 1, d, dtype=q.dtype)
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    block = native.attention_block(kv_heads, heads // kv_heads, codes)  # position-major: heads side by side

    def strides(x: torch.Tensor, n: int):
        return (ctypes.c_int64 * n)(*x.stride()[:n])

    args = (q.data_ptr(), strides(q, 2), KINDS[q.dtype], *(x.data_ptr() for x in (*k, *v)), strides(codes, 3),
            strides(scale, 3), k_new.data_ptr(), v_new.data_ptr(), strides(k_new, 2), mask.data_ptr(), length,
            None if rows is None else rows.data_ptr(), out.data_ptr(), strides(out, 2), heads, kv_heads, length,
            skip, d, config.group_size, 1.0 / math.sqrt(d), block)
    items = b * -(-kv_heads // block)
    if native.team_threads():
        lib.decode_attention_q4_team(*args, items, native.team_threads())
    else:
        native.parallel(lambda begin, end: lib.decode_attention_q4(*args, begin, end), items,
                        cost=b * heads * length * d)
    return out


def usable(q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...]) -> bool:
    """Whether `attend` takes these arrays (CPU, layouts, dtypes, whole head groups)."""
    heads, kv_heads = q.shape[1], k[0].shape[1]
    same = all(a.shape == b.shape and a.stride() == b.stride() for a, b in zip(k, v, strict=True))
    stats = k[1].dtype == k[2].dtype == torch.float16 and k[1].stride() == k[2].stride()
    return (q.device.type == "cpu" and q.dtype in KINDS and same and heads % kv_heads == 0 and stats
            and k[0].dtype == torch.uint8 and all(x.device.type == "cpu" and x.stride(-1) == 1 for x in (*k, *v)))


def reference(q: torch.Tensor, k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], config: CompressionConfig,
              mask: torch.Tensor | None, skip: int, k_new: torch.Tensor, v_new: torch.Tensor,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """`attend` by dequantizing the slots into q's dtype, putting the new token at `skip`, and torch's SDPA."""
    keys, values = (_dense(parts, config, q.dtype, rows)[..., :q.shape[-1]] for parts in (k, v))
    keys[:, :, skip:skip + 1], values[:, :, skip:skip + 1] = k_new, v_new
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != q.shape[1])


def _dense(parts: tuple[torch.Tensor, ...], config: CompressionConfig, dtype: torch.dtype,
           rows: torch.Tensor | None) -> torch.Tensor:
    codes, scale, minimum = (x if rows is None else x[rows] for x in parts)
    r, heads, length, _ = codes.shape
    d = scale.shape[-1] * config.group_size  # padded groups; cut below by the caller's head_dim
    q = QuantizedTensor(codes.contiguous().view(-1), scale.contiguous(), minimum.contiguous(), (r, heads, length, d),
                        config)
    return dequantize_reference(q, dtype, None)


@functools.cache
def _library():
    lib = native.library()
    return None if lib is None else declared(lib)


def declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib (a build of the native kernels) with the 4-bit attention's argument types set."""
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    common = ([ptr, ptr, i32] + [ptr] * 6 + [ptr] * 2 + [ptr] * 3 + [ptr, i64, ptr, ptr, ptr] + [i64] * 6
              + [f32, i64])
    for name, tail in (("decode_attention_q4", [i64, i64]), ("decode_attention_q4_team", [i64, i32])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, common + tail
    return lib


@functools.cache
def checked() -> bool:
    """The kernel is built here and matches `reference` on random bf16 inputs with grouped heads, a masked slot, a
    ring's new token mid-cache, a padded last group and strided (position-major) stores (once per process)."""
    if _library() is None:
        return False
    g = torch.Generator().manual_seed(5)
    config = CompressionConfig(4, 64, -1)
    ok = True
    for d, group in ((128, 2), (96, 1)):
        q = torch.randn(3, 2 * group, 1, d, generator=g).bfloat16()
        stores = [position_major(torch.randn(7, 4, 2, d, generator=g), config) for _ in "kv"]
        k_new, v_new = (torch.randn(3, 2, 1, d, generator=g).bfloat16() for _ in "kv")
        mask = torch.rand(3, 1, 1, 7, generator=g) > 0.3
        mask[..., 2] = True
        rows = torch.tensor([3, 0, 2])
        out = attend(q, *stores, config, mask, 2, k_new, v_new, rows)
        want = reference(q, *stores, config, mask, 2, k_new, v_new, rows)
        ok = ok and torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    if not ok:
        warnings.warn("the built 4-bit attention kernel disagrees with torch here: dequantizing instead", stacklevel=2)
    return ok


def position_major(x: torch.Tensor, config: CompressionConfig) -> tuple[torch.Tensor, ...]:
    """x (positions, rows, kv_heads, d) quantized, each part viewed (rows, kv_heads, positions, last) as a
    position-major store is (cache_store.Store): for checks and measurements."""
    from .quantization import quantize

    qt = quantize(x, config)
    t, r, h, _ = x.shape
    parts = (qt.data.view(t, r, h, -1), qt.scale, qt.minimum)
    return tuple(p.permute(1, 2, 0, 3) for p in parts)
