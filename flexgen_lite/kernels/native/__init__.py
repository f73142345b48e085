"""Small C kernels for the CPU, built on first use with the system's C compiler for this machine's CPU
(`-march=native`) and loaded with ctypes. Optional: without a compiler, or with FLEXGEN_LITE_NATIVE=0, or when
a build fails its check, callers fall back to their torch path (slower, same values).

Built libraries (build.py) are cached under paths.cache_dir() (~/.cache/flexgen-lite) by a hash of the source, the
flags, the compiler and the CPU's flags, so a different machine or compiler builds its own. Work is split over threads
by each kernel's `_team` entry on torch's own OpenMP pool where the build maps torch's runtime (`team_threads`);
otherwise the kernels take a range of their work and `parallel` hands ranges to threads that sleep when idle (a
second OpenMP runtime beside torch's would spin against it, and against other processes, between calls).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import build
from .build import declared


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels with their argument types declared, or None (no compiler, disabled, unsupported machine,
    or a failed build): build.py."""
    lib = build.built()
    return None if lib is None else declared(lib)


OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # also the kinds of quantize's input


def int4_dequantize_t(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
                      out: torch.Tensor, rows: tuple[int, int] | None = None) -> bool:
    """W.T (K, N) of a weight in the int4 kernel's layout (int4_matmul.Int4Weight) into `out`, or with `rows`
    (r0, r1), multiples of 64, only W.T[:, r0:r1] as a contiguous (K, r1 - r0); False when the kernel cannot do
    it here (the caller then takes its torch path)."""
    lib = library()
    parts = (packed, scale, minimum, out)
    if lib is None or out.dtype not in OUT_KIND or not all(p.is_contiguous() and p.device.type == "cpu"
                                                              for p in parts):
        return False
    n, k = packed.shape[0], packed.shape[1] * 2
    r0, r1 = rows or (0, n)
    if r0 % 64 or r1 % 64 or not 0 <= r0 < r1 <= n or out.numel() != (r1 - r0) * k:
        return False
    if scale.dtype != torch.float16 or minimum.dtype != torch.float16:
        return False
    args = (packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), n, k, group_size, r0, r1, out.data_ptr(),
            OUT_KIND[out.dtype])
    if team_threads():
        lib.int4_dequantize_t_team(*args, team_threads())
    else:
        parallel(lambda t0, t1: lib.int4_dequantize_t(*args, t0, t1), -(-k // 16), cost=k * (r1 - r0))
    return True


def int4_dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, grouped: tuple[int, ...],
                           out: torch.Tensor) -> bool:
    """A 4-bit tensor as compression stores it (codes two a byte in the flat order of `grouped` = (groups, g,
    inner); fp16 scale and minimum, (groups, inner)) dequantized into `out` (contiguous, that many values), bit for
    bit as dequantize_reference; False when the kernel cannot do it here. Split over `parallel`'s sleeping threads,
    never an OpenMP team: the engine's I/O threads call it beside the compute thread's."""
    lib = library()
    groups, g, inner = grouped
    if (lib is None or out.dtype not in OUT_KIND or (inner == 1 and g % 2) or (inner > 1 and inner % 2)
            or scale.dtype != torch.float16 or minimum.dtype != torch.float16 or codes.dtype != torch.uint8
            or out.numel() != groups * g * inner or codes.numel() * 2 < out.numel()
            or scale.numel() != groups * inner or minimum.numel() != groups * inner
            or not all(t.is_contiguous() and t.device.type == "cpu" for t in (codes, scale, minimum, out))):
        return False
    args = (codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), g, inner, out.data_ptr(), OUT_KIND[out.dtype])
    parallel(lambda q0, q1: lib.int4_dequantize_groups(*args, q0, q1), groups, cost=16 * g * inner * groups)
    return True


ROW_GROUP_ROWS = 16  # int4_row_groups.c's rows of x at most


def int4_gemv_row_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
                         x: torch.Tensor) -> torch.Tensor | None:
    """x (rows, K) @ W.T in x's dtype (fp32 sums) for W (N, K) stored as compression's 4-bit codes in groups of
    `group_size` output rows (scale, minimum (N / group_size, K) fp16), read as stored; None when the kernel cannot
    do it here. A bf16 x is scaled into bf16 and multiplied by the CPU's bf16 dot instruction where it has one."""
    product = row_groups_product(codes, scale, minimum, group_size)
    if product is None or x.dim() != 2 or x.device.type != "cpu" or x.shape[1] != scale.shape[1]:
        return None
    return product(x.contiguous())


def row_groups_product(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int):
    """int4_gemv_row_groups of one weight, checked once: a function of x (rows, K) on the CPU, contiguous, that
    returns x @ W.T or None (a row count or dtype it does not take); None where the kernel cannot read the weight.
    A decode step calls it for every product (~5 us of Python a call, against ~25 through the checks)."""
    lib = library()
    if lib is None or scale.dim() != 2 or scale.dtype != torch.float16 or minimum.dtype != torch.float16 \
            or codes.dtype != torch.uint8 or codes.device.type != "cpu" \
            or not all(t.is_contiguous() for t in (codes, scale, minimum)):
        return None
    groups, k = scale.shape
    n = groups * group_size
    if k % 2 or minimum.shape != scale.shape or codes.numel() * 2 != n * k:
        return None
    weight = (codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), n, k, group_size)
    kernel, team = lib.int4_gemv_row_groups_team, team_threads()

    def product(x: torch.Tensor) -> torch.Tensor | None:
        rows, kind = x.shape[0], OUT_KIND.get(x.dtype)
        if kind is None or not 0 < rows <= ROW_GROUP_ROWS:
            return None
        out = torch.empty(rows, n, dtype=x.dtype)
        args = (*weight, x.data_ptr(), kind, rows, int(kind == OUT_KIND[torch.bfloat16] and group_size % 2 == 0),
                out.data_ptr())
        if team:
            kernel(*args, team)
        else:
            parallel(lambda q0, q1: lib.int4_gemv_row_groups(*args, q0, q1), groups, cost=rows * n * k)
        return out

    product.weight = (codes, scale, minimum)  # the tensors live as long as their pointers are used
    return product


def int4_gemv(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int,
              x: torch.Tensor) -> torch.Tensor | None:
    """x (rows, K) @ W.T in x's dtype (fp32 sums), reading W's codes as they are (a few rows: decode steps of
    small batches); None when the kernel cannot do it here."""
    lib, kind = library(), OUT_KIND.get(x.dtype)
    if lib is None or kind is None or x.dim() != 2 or scale.dtype != torch.float16 \
            or minimum.dtype != torch.float16 or not (packed.is_contiguous() and scale.is_contiguous()
                                                     and minimum.is_contiguous() and x.is_contiguous()) \
            or x.device.type != "cpu" or packed.device.type != "cpu":
        return None
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % 64 or k % group_size or x.shape[1] != k:
        return None
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    team = team_threads()
    if team:
        lib.int4_gemv_team(packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), n, k, group_size, x.data_ptr(),
                           kind, x.shape[0], out.data_ptr(), team)
        return out
    xf, sums = x.float(), torch.empty(x.shape[0], n)
    xb = x.data_ptr() if x.dtype == torch.bfloat16 else 0
    args = (packed.data_ptr(), scale.data_ptr(), minimum.data_ptr(), n, k, group_size, xf.data_ptr(), xb,
            x.shape[0], sums.data_ptr())
    parallel(lambda b0, b1: lib.int4_gemv_blocks(*args, b0, b1), n // 64, cost=x.shape[0] * n * k)
    return out.copy_(sums)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x (rows, K) @ weight.T (+ bias) in `out_dtype` (default x's; float32: the fp32 sums as they are), each row
    of the weight read once from memory (a few rows: decode steps of small batches; gemv.c); None when the kernel
    cannot do it here."""
    found = dense_gemv_many(x, [(weight, bias)], out_dtype)
    return None if found is None else found[0]


def dense_gemv_many(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
                    out_dtype: torch.dtype | None = None) -> list[torch.Tensor] | None:
    """`dense_gemv` of x by each (weight, bias) of `weights` (up to 64, sharing K: q, k and v), in one call to
    the kernel; None when it cannot do them here."""
    out_dtype = out_dtype or x.dtype
    lib, kind, out_kind = library(), OUT_KIND.get(x.dtype), OUT_KIND.get(out_dtype)
    if lib is None or kind is None or out_kind is None or x.dim() != 2 or not x.is_contiguous() \
            or x.device.type != "cpu" or not 0 < len(weights) <= 64:
        return None
    (rows, k), dtype = x.shape, x.dtype
    for w, b in weights:
        if (w.dim() != 2 or w.shape[1] != k or w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous()
                or b is not None and (b.dtype != dtype or not b.is_contiguous() or b.device.type != "cpu")):
            return None
    outs = [torch.empty(rows, w.shape[0], dtype=out_dtype) for w, _ in weights]
    team = team_threads()
    if team:
        count, pointers = len(weights), ctypes.c_void_p * len(weights)
        lib.dense_gemv_team(count, pointers(*(w.data_ptr() for w, _ in weights)),
                            pointers(*(0 if b is None else b.data_ptr() for _, b in weights)),
                            (ctypes.c_int64 * count)(*(w.shape[0] for w, _ in weights)), kind, out_kind, k,
                            x.data_ptr(), rows, pointers(*(y.data_ptr() for y in outs)), team)
        return outs
    xf = x.float().contiguous()
    for (w, b), y in zip(weights, outs, strict=True):
        n = w.shape[0]
        args = (w.data_ptr(), 0 if b is None else b.data_ptr(), kind, out_kind, n, k, x.data_ptr(), xf.data_ptr(),
                rows, y.data_ptr())
        parallel(lambda n0, n1, args=args: lib.dense_gemv(*args, n0, n1), n, cost=rows * n * k)
    return outs


def dense_gemv_groups(products: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> bool:
    """y = x @ w.T for each (x, w, y) of `products` (dense, sharing K and the dtype, each x its own rows: a mixture
    of experts' products over each expert's rows), in one call to the kernel's team; False when it cannot do them
    here (then nothing is written)."""
    lib, team = library(), team_threads()
    kind = OUT_KIND.get(products[0][0].dtype) if products else None
    if lib is None or not team or kind is None:
        return False
    k, dtype = products[0][1].shape[1], products[0][0].dtype
    for x, w, y in products:
        if (w.dim() != 2 or w.shape[1] != k or x.shape[-1] != k or x.shape[0] != y.shape[0] or w.shape[0] != y.shape[1]
                or not (x.dtype == w.dtype == y.dtype == dtype) or not all(t.is_contiguous() for t in (x, w, y))
                or not all(t.device.type == "cpu" for t in (x, w, y))):
            return False
    count, pointers, sizes = len(products), ctypes.c_void_p * len(products), ctypes.c_int64 * len(products)
    xs, ws, ys = zip(*products, strict=True)
    lib.dense_gemv_groups(count, pointers(*(w.data_ptr() for w in ws)), pointers(*([0] * count)),
                          sizes(*(w.shape[0] for w in ws)), kind, kind, k, pointers(*(x.data_ptr() for x in xs)),
                          sizes(*(x.shape[0] for x in xs)), pointers(*(y.data_ptr() for y in ys)), team)
    return True


def int4_gemv_groups(products: list[tuple[torch.Tensor, object, torch.Tensor]]) -> bool:
    """y = x @ W.T for each (x, W, y) of `products`, W an Int4Weight (its packed codes, fp16 scales and minima; all
    sharing K and the group size), each x its own rows: a mixture of experts' 4-bit products, in one call to the
    kernel's team (int4_gemv_groups); False when it cannot do them here (then nothing is written)."""
    lib, team = library(), team_threads()
    kind = OUT_KIND.get(products[0][0].dtype) if products else None
    if lib is None or not team or kind is None:
        return False
    k, group = products[0][1].packed.shape[1] * 2, products[0][1].group_size
    for x, w, y in products:
        n = w.packed.shape[0]
        if (w.packed.shape[1] * 2 != k or w.group_size != group or n % 64 or k % group or x.shape[-1] != k
                or x.shape[0] != y.shape[0] or y.shape[1] != n or x.dtype != y.dtype or x.dtype != products[0][0].dtype
                or w.scale.dtype != torch.float16 or w.minimum.dtype != torch.float16
                or not all(t.is_contiguous() and t.device.type == "cpu" for t in (x, y, w.packed, w.scale, w.minimum))):
            return False
    count, pointers, sizes = len(products), ctypes.c_void_p * len(products), ctypes.c_int64 * len(products)
    xs, ws, ys = zip(*products, strict=True)
    lib.int4_gemv_groups(count, pointers(*(w.packed.data_ptr() for w in ws)),
                         pointers(*(w.scale.data_ptr() for w in ws)), pointers(*(w.minimum.data_ptr() for w in ws)),
                         sizes(*(w.packed.shape[0] for w in ws)), k,
                         group, pointers(*(x.data_ptr() for x in xs)), kind, sizes(*(x.shape[0] for x in xs)),
                         pointers(*(y.data_ptr() for y in ys)), team)
    return True


def int8_gemv(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
              out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x (rows, K) @ W.T in `out_dtype` (default x's; fp32 sums) for 8-bit W (codes int8 (N, K), fp16 scales
    (N, K / 32)), each weight row read once (int8.c); None when the kernel cannot do it here."""
    out_dtype = out_dtype or x.dtype
    lib, kind = library(), OUT_KIND.get(out_dtype)
    if lib is None or kind is None or x.dtype not in OUT_KIND or x.dim() != 2 or not _int8_fits(codes, scale) \
            or x.shape[1] != codes.shape[1] or x.device.type != "cpu":
        return None
    (n, k), rows = codes.shape, x.shape[0]
    x, out = x.contiguous(), torch.empty(rows, n, dtype=out_dtype)
    as_is = x.dtype == torch.bfloat16 and lib.int8_gemv_takes_bf16()
    xf = None if as_is else x.float().contiguous()
    args = (codes.data_ptr(), scale.data_ptr(), n, k, 0 if as_is else xf.data_ptr(), x.data_ptr() if as_is else 0,
            rows, out.data_ptr(), kind)
    if team_threads():
        lib.int8_gemv_team(*args, team_threads())
    else:
        parallel(lambda n0, n1: lib.int8_gemv(*args, n0, n1), n, cost=rows * n * k)
    return out


def int8_dequantize(codes: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, out: torch.Tensor) -> bool:
    """Rows [n0, n1) of 8-bit W into `out` ((n1 - n0, K), its dtype); False when the kernel cannot do it here."""
    lib, kind = library(), OUT_KIND.get(out.dtype)
    if lib is None or kind is None or not _int8_fits(codes, scale) or not out.is_contiguous() \
            or out.shape != (n1 - n0, codes.shape[1]):
        return False
    k = codes.shape[1]
    if team_threads():
        lib.int8_dequantize_team(codes.data_ptr(), scale.data_ptr(), n0, n1, k, out.data_ptr(), kind, team_threads())
        return True
    row_bytes = k * out.element_size()
    parallel(lambda a, b: lib.int8_dequantize(codes.data_ptr(), scale.data_ptr(), k, out.data_ptr() + a * row_bytes,
                                              kind, n0 + a, n0 + b), n1 - n0, cost=(n1 - n0) * k)
    return True


def _int8_fits(codes: torch.Tensor, scale: torch.Tensor) -> bool:
    return (codes.dtype == torch.int8 and scale.dtype == torch.float16 and codes.dim() == 2 and codes.is_contiguous()
            and scale.is_contiguous() and codes.device.type == "cpu" and codes.shape[1] % 32 == 0
            and scale.shape == (codes.shape[0], codes.shape[1] // 32))


def team_threads() -> int:
    """Threads for gemv.c's teams (`threads()`), or 0 where they cannot run on torch's own OpenMP pool: the
    library was built without OpenMP, or its OpenMP calls bind to another runtime than torch's (two pools would
    spin against each other). Another runtime merely loaded beside them (scikit-learn's renamed libgomp, which
    transformers 5.17 imports) is no matter: its pool starts only if something calls it."""
    return threads() if _shares_torch_openmp() else 0


@functools.cache
def _shares_torch_openmp() -> bool:
    if library() is None or not _uses_openmp():
        return False
    ours = build.runtime_file(library(), "GOMP_parallel")
    return ours is not None and ours == build.runtime_file(build.torch_library(), "omp_get_max_threads")


@functools.cache
def _uses_openmp() -> bool:
    """The built library links an OpenMP runtime (it was built with -fopenmp)."""
    return build.links_openmp(library())


def int4_quantize_pack(x: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """`int4_matmul.pack(quantize(x, CompressionConfig(4, group_size, 1)))` of a matrix x (N, K), bit for bit,
    in one pass; None when the kernel cannot do it here."""
    lib = library()
    if lib is None or x.dtype not in OUT_KIND or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu":
        return None
    n, k = x.shape
    if n % 64 or k % group_size:
        return None
    codes, stats = n * k // 2, k // group_size * n * 2
    out = torch.empty(codes + 2 * stats, dtype=torch.uint8)
    scale, minimum = (out[codes + i * stats:codes + (i + 1) * stats] for i in (0, 1))
    args = (x.data_ptr(), OUT_KIND[x.dtype], n, k, group_size, out.data_ptr(), scale.data_ptr(), minimum.data_ptr())
    parallel(lambda b0, b1: lib.int4_quantize_pack(*args, b0, b1), n // 64, cost=8 * n * k)
    return out


ROW_VALUES = 1 << 16  # int4_quantize_rows holds a row in fp32 on its thread's stack (256 KiB at most)


def int4_quantize_rows(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...] | None:
    """`quantize(x, CompressionConfig(4, group_size, -1))`'s codes (flat uint8), scales and minima (x's shape with
    the last dimension in groups: fp16), bit for bit, in one pass over x; None when the kernel cannot do it here
    (a KV cache's new tokens stored in host RAM: ~35 torch calls otherwise)."""
    lib = library()
    d = x.shape[-1] if x.dim() else 0
    if (lib is None or x.dtype not in OUT_KIND or x.device.type != "cpu" or not d or group_size % 2
            or d % group_size or d > ROW_VALUES):
        return None
    x = x.contiguous()
    rows = x.numel() // d
    codes = torch.empty(rows * d // 2, dtype=torch.uint8)
    scale, minimum = (torch.empty(*x.shape[:-1], d // group_size, dtype=torch.float16) for _ in range(2))
    args = (x.data_ptr(), OUT_KIND[x.dtype], d, group_size, codes.data_ptr(), scale.data_ptr(), minimum.data_ptr())
    parallel(lambda r0, r1: lib.int4_quantize_rows(*args, r0, r1), rows, cost=8 * rows * d)
    return codes, scale, minimum


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     shared: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d)) v for one query position: q (B, heads, 1, d) over k, v (B, kv_heads, L, d) with
    a bool mask (B, 1, 1, L), as torch's scaled_dot_product_attention (fp32 inside); None when the kernel
    cannot do it here. k and v may be views of longer caches (any strides, rows of d contiguous), such as the
    position-major cache across a link. Runs on `threads()` threads.

    shared (source, shift, columns): row b's positions below `columns` are read from row source[b]'s, shift[b]
    positions earlier (int64 (B,) each on the CPU): a prompt prefix stored alike in every row, read once.
    sinks (heads,): each head's sink logit, a term of its softmax's denominator only (gpt-oss)."""
    lib = library()
    b, heads, t, d = q.shape
    if (lib is None or t != 1 or q.dtype not in OUT_KIND or not (q.dtype == k.dtype == v.dtype)
            or k.shape != v.shape or k.shape[0] != b or heads % k.shape[1] or heads // k.shape[1] > MAX_GROUP
            or mask.dtype != torch.bool
            or any(x.device.type != "cpu" or x.stride(-1) != 1 for x in (q, k, v))):
        return None
    kv_heads, length = k.shape[1], k.shape[2]
    if sinks is not None:
        sinks = sinks.to(torch.float32).contiguous()
        if sinks.shape != (heads,) or sinks.device.type != "cpu":
            return None
    mask = mask.expand(b, 1, 1, length).reshape(b, length).contiguous()
    out = torch.empty(b, heads, 1, d, dtype=q.dtype)
    strides = [(ctypes.c_int64 * 3)(*x.stride()[:2], x.stride(2)) for x in (q, k, v, out)]
    block = attention_block(kv_heads, heads // kv_heads, k)

    source, shift, columns = shared if shared is not None else (None, None, 0)
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), OUT_KIND[q.dtype], b, heads,
            kv_heads, length, d, strides[0], strides[1], strides[2], length, strides[3], 1.0 / math.sqrt(d), block,
            None if source is None else source.data_ptr(), None if shift is None else shift.data_ptr(), columns,
            None, None if sinks is None else sinks.data_ptr())
    items = b * -(-kv_heads // block)
    if team_threads():
        lib.decode_attention_team(*args, items, team_threads())
    else:
        parallel(lambda begin, end: lib.decode_attention(*args, begin, end), items, cost=b * heads * length * d)
    return out


def attention_block(kv_heads: int, group: int, k: torch.Tensor) -> int:
    """kv heads attention.c walks together over the cache k: several where a position's rows of them are
    adjacent (position-major), one at a time where they are apart (head-major)."""
    return min(kv_heads, max(1, MAX_Q // group)) if k.stride(2) > k.stride(1) else 1


MAX_Q = 16  # query heads per work item of attention.c, for position-major caches
MAX_GROUP = 64  # query heads per kv head it takes
MIN_WORK = 1 << 22  # multiply-adds a thread is given at least (~0.1 ms: handing out work costs tens of us)


def threads() -> int:
    """Threads for the CPU kernels: torch's intra-op count (all cores by default), within this process's CPUs."""
    return max(1, min(torch.get_num_threads(), _cpus(os.getpid())))


@functools.cache
def _cpus(pid: int) -> int:
    """CPUs this process may run on (asked once per process: a decode step calls the kernels hundreds of times).
    Under OMP_PROC_BIND the OpenMP runtime pins the main thread to one CPU of the process's places and its team to
    the others: the main thread's affinity is not the process's CPUs then, and all the machine's are counted."""
    if os.environ.get("OMP_PROC_BIND", "false").strip().lower() not in ("", "false"):
        return os.cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_pool: ThreadPoolExecutor | None = None
_pool_size = _pool_pid = 0
_pool_lock = threading.Lock()


def parallel(fn, n: int, cost: int = 1 << 30) -> None:
    """fn(begin, end) over [0, n) in about 4 chunks a thread, taken in turn by the calling thread and pool
    threads (ctypes calls release the GIL), so that a thread the OS delays holds up one chunk, not the call.
    Idle pool threads sleep on a queue: nothing spins beside torch's own pool or the engine's I/O threads."""
    global _pool, _pool_size, _pool_pid
    workers = min(threads(), n, max(1, cost // MIN_WORK))
    if workers <= 1:
        fn(0, n)
        return
    with _pool_lock:
        if _pool is None or _pool_size < workers - 1 or _pool_pid != os.getpid():  # a forked child has no threads
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)  # its threads end once idle
            _pool, _pool_size = ThreadPoolExecutor(workers - 1, thread_name_prefix="flexgen-cpu"), workers - 1
            _pool_pid = os.getpid()
        pool = _pool
    step = max(1, -(-n // (4 * workers)))
    chunks = iter(range(0, n, step))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                begin = next(chunks, None)
            if begin is None:
                return
            fn(begin, min(n, begin + step))

    futures = [pool.submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        for f in futures:
            f.result()
