"""Timing the machine's kernels, copies and disk: each probe returns rates for the profile (hardware.py).

Matmul rates per dtype over a range of batch rows, the CPU's int4 weight kernel, attention on the compute device
and on the CPU, host<->device links, 4-bit (de)quantization, how dearer work gets beside I/O, and the offload
directory's disk. `measure.py` runs them (and the engine-level ones) in order.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..engine.policy import DTYPES
from ..engine.shared_prefix import shared_rows
from ..kernels import native
from ..kernels.attention import attend_named
from ..kernels.compression import CompressionConfig, dequantize, quantize
from ..kernels.int4_matmul import Int4Weight, native_agrees
from ..kernels.int4_matmul import available as int4_available
from ..kernels.prefill_attention import prefill_attention
from ..system.devices import ComputeDevice

MiB = 2**20


def offload_parent(offload_dir: str) -> str:
    return os.path.abspath(offload_dir or tempfile.gettempdir())


def timed(fn: Callable[[], object], sync: Callable[[], None], min_time: float = 0.05, max_reps: int = 30) -> float:
    """Median seconds of one call, after a warm-up call."""
    fn()
    sync()
    times: list[float] = []
    total = 0.0
    while len(times) < max_reps and (total < min_time or len(times) < 3):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
        total += times[-1]
        if times[-1] > 4 * min_time:  # slow enough: one timed call is representative
            break
    times.sort()
    return times[len(times) // 2]


def others_cpu(since: float = 0.0) -> float:
    """CPU seconds all processes but this one have used (from /proc/stat), less `since`; 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
    mine = sum(os.times()[:2])
    return busy - mine - since


def fit(small: float, t_small: float, large: float, t_large: float) -> tuple[float, float]:
    """(rate, fixed seconds) with t = fixed + amount / rate through two measurements; when noise makes the
    larger one no slower, a rate from the larger alone and no fixed cost."""
    if t_large <= t_small * 1.02:
        return large / t_large, 0.0
    rate = (large - small) / (t_large - t_small)
    return rate, max(0.0, t_small - small / rate)


def matmul_shapes(device: ComputeDevice, scale: int) -> list[tuple[int, int]]:
    shapes = [(8192, 8192), (1024, 1024)] if device.is_cuda else [(2048, 4096), (768, 768)]
    return [(k // scale, n // scale) for k, n in shapes]


def matmul_rates(device: ComputeDevice, scale: int, names: tuple[str, ...] = tuple(DTYPES),
                 rows: tuple[int, ...] | None = None, linear: Callable = F.linear) -> dict:
    """(rows, K) @ (K, N) per dtype of `names` over rows from 1 (weight-read bound) up to compute bound, for a
    large and a small weight: per row count, a rate and a fixed cost per call that fit both. `linear`: the
    product measured (torch's by default)."""
    dev, sync = device.device, device.synchronize
    shapes = matmul_shapes(device, scale)
    rows = rows or ((1, 8, 32, 128, 512, 2048, 8192) if device.is_cuda else (1, 4, 8, 16, 32, 64, 128, 256, 1024))
    out = {}
    for name in names:
        dtype, points = DTYPES[name], []
        # as in a model, each matmul reads a weight no cache holds: rotate over 128 MiB of them
        room = 128 * MiB if scale == 1 else 2 * MiB
        weights = [[torch.randn(n, k, device=dev).to(dtype) for _ in range(max(1, room // (k * n * dtype.itemsize)))]
                   for k, n in shapes]
        for m in rows:
            flops, times = [], []
            for (k, n), ws in zip(shapes, weights, strict=True):
                x = torch.randn(m, k, device=dev).to(dtype)
                s = timed(lambda x=x, ws=ws: [linear(x, w) for w in ws], sync, min_time=0.1 / scale)
                flops.append(2 * m * k * n)
                times.append(s / len(ws))
            rate, fixed = fit(flops[1], times[1], flops[0], times[0])
            points.append((m, rate, fixed))
            if s > 0.25 and scale == 1:  # a slow dtype (float16 on most CPUs): more rows would take seconds
                break
        out[name] = points
    return {"matmul": out, "matmul_shape": shapes[0]}


GEMV_ROWS = (1, 2, 4, 8, 16)  # where the C kernel for a few rows may beat torch's matmul (hardware.gemv_rows)


def gemv_rates(device: ComputeDevice, scale: int) -> dict:
    """native.dense_gemv as `matmul_rates` measures torch's matmul, in the dtypes the CPU computes in (none with
    CUDA or without the kernel). ~1-2 s on this VM."""
    probe = torch.ones(2, 64)
    if device.is_cuda or native.dense_gemv(probe, probe) is None:
        return {"gemv": {}}
    found = matmul_rates(device, scale, tuple(compute_dtypes(device)), GEMV_ROWS, native.dense_gemv)
    return {"gemv": found["matmul"]}


def best_matmul(first: dict, second: dict) -> dict:
    """Per dtype and row count, the faster of two trials taken apart in time: the machine's capability, not
    a moment when another process had the cores."""
    k, n = first["matmul_shape"]

    def seconds(point) -> float:
        m, rate, fixed = point
        return fixed + 2 * m * k * n / rate

    best = {}
    for dtype, points in first["matmul"].items():
        other = dict((p[0], p) for p in second["matmul"].get(dtype, []))
        best[dtype] = [min(p, other.get(p[0], p), key=seconds) for p in points]
    return {"matmul": best}


INT4_ROWS = (1, 2, 4, 16, 64)  # decode batches: beyond them a dense matmul after dequantizing wins (int4_path)
CODES_ROWS = (1, 2, 4, 8, 16, 64)  # the C kernel multiplying the codes (bf16 pairs: near dense speed up to 64 rows)
INT4_ROTATION = 40 * MiB  # large weights rotated over up to 16 rows, so that none comes from the 32 MiB L3


def int4_rates(device: ComputeDevice, scale: int) -> dict:
    """4-bit weights multiplied as stored, on a CPU (none with CUDA or where this torch lacks its int4 kernel),
    per dtype it runs in: by torch's kernel (`int4_matmul`), by the C kernel for a few rows (`int4_gemv`,
    native.int4_gemv) and by tiles (`int4_tiles`). In bfloat16, as `matmul_rates`: a rate and a fixed cost per
    row count fitted to a large and a small weight. In float16 (slow on most CPUs, which auto never computes in)
    torch's kernel on the small weight alone, while a call takes under 2 ms. The fastest of a few calls: on a
    busy machine a call waits for a core now and then. And the rate of dequantizing the layout for a dense
    matmul (large batches). ~0.3-0.5 s on this VM."""
    if device.is_cuda or not int4_available():
        return {"int4_matmul": {}, "int4_dequantize": {}, "int4_tiles": {},
                "int4_gemv": gpu_codes_points(device, scale) if device.is_cuda else {}}
    large, small = [(k // scale, n // scale) for k, n in ((2048, 4096), (1024, 1024))]  # (K, N), multiples of 64
    found = {"bfloat16": _int4_points(torch.bfloat16, small, large), "float16": _int4_points(torch.float16, small)}
    weight = _int4_weights(*large, 1)[0]
    rates = {}
    for name, points in found.items():
        if points:
            out = torch.empty(large, dtype=getattr(torch, name))
            rates[name] = out.numel() / timed(lambda out=out: weight.dequantize_t(out), lambda: None)
    # the C kernels: bfloat16 only (what auto computes in on a CPU with them)
    tiles = {"bfloat16": _int4_points(torch.bfloat16, small, large, "tiles")} if native_agrees() else {}
    codes = {"bfloat16": _int4_points(torch.bfloat16, small, large, "codes")} if native_agrees() else {}
    return {"int4_matmul": {name: points for name, points in found.items() if points}, "int4_dequantize": rates,
            "int4_tiles": {name: points for name, points in tiles.items() if points},
            "int4_gemv": {name: points for name, points in codes.items() if points}}


GPU_CODES_ROWS = (1, 16, 64)  # a decode step's rows, up to int4_gemv_triton.GEMV_ROWS


def gpu_codes_points(device: ComputeDevice, scale: int) -> dict:
    """A GPU's products by 4-bit matrices read as stored (int4_gemv_triton), per compute dtype where its check
    passes: (rows, FLOP/s, fixed s) fitted to a large and a small matrix, as `int4_rates` on a CPU."""
    from ..kernels import int4_gemv_triton as gemv
    from ..kernels.quantization import CompressionConfig, quantize

    config, out = CompressionConfig(4, 64, 1), {}
    shapes = [(k // scale, n // scale) for k, n in ((8192, 8192), (1024, 1024))]  # (K, N)
    for name in compute_dtypes(device):
        dtype = DTYPES[name]
        if gemv.refusal(device.device, dtype, config.group_size) is not None:
            continue
        large, small = (quantize(torch.randn(n, k, device=device.device, dtype=dtype), config) for k, n in shapes)
        points = []
        for m in GPU_CODES_ROWS:
            xs = [torch.randn(m, q.shape[1], device=device.device, dtype=dtype) for q in (small, large)]
            times = [timed(lambda q=q, x=x: gemv.matmul(x, q), device.synchronize)
                     for q, x in zip((small, large), xs, strict=True)]
            points.append((m, *fit(2 * m * math.prod(small.shape), times[0], 2 * m * math.prod(large.shape),
                                   times[1])))
        out[name] = points
    return out


def _int4_weights(k: int, n: int, copies: int, group_size: int = 64,
                  tiled: torch.dtype | None = None) -> list[Int4Weight]:
    """`copies` 4-bit weights (n, k) in the kernel's layout (its time does not depend on the codes); `tiled`:
    multiplied by tiles in that dtype, through one shared buffer (as the engine's slot)."""
    stats = torch.full((2, k // group_size, n), 0.01, dtype=torch.float16)
    tiles = torch.empty(n * k, dtype=tiled) if tiled else None
    return [Int4Weight(torch.full((n, k // 2), 0x93, dtype=torch.uint8), stats[0], stats[1], group_size, tiles)
            for _ in range(copies)]


def _int4_points(dtype: torch.dtype, small: tuple[int, int], large: tuple[int, int] | None = None,
                 way: str = "torch") -> list[tuple[int, float, float]]:
    """(rows, FLOP/s, fixed s) of a 4-bit weight multiplied one `way` ("torch": torch's int4 kernel, "codes":
    the C kernel at CODES_ROWS, "tiles") in `dtype` for weights (K, N) `small` and `large` (the large rotated
    over at few rows); without `large`, from `small` alone with no fixed cost, up to the first row count whose
    call takes over 2 ms. [] where the kernel refuses the dtype."""
    tiled = dtype if way == "tiles" else None
    small_w = _int4_weights(*small, 1, tiled=tiled)
    copies = min(16, max(1, INT4_ROTATION // (large[0] * large[1] // 2))) if large else 0
    large_w = _int4_weights(*large, copies, tiled=tiled) if large else []
    points: list[tuple[int, float, float]] = []
    for m in CODES_ROWS if way == "codes" else INT4_ROWS:
        flops = 2 * m * small[0] * small[1]
        try:
            t_small = _int4_seconds(small_w, m, small[0], dtype, way)
            if not large:
                points.append((m, flops / t_small, 0.0))
                if t_small > 2e-3:
                    break
                continue
            t_large = _int4_seconds(large_w if m <= 16 else large_w[:1], m, large[0], dtype, way)  # 64: compute bound
        except (RuntimeError, NotImplementedError):
            return []
        points.append((m, *fit(flops, t_small, 2 * m * large[0] * large[1], t_large)))
    return points


def _int4_seconds(weights: list[Int4Weight], rows: int, k: int, dtype: torch.dtype, way: str, runs: int = 3) -> float:
    """Seconds of one product of `rows` rows `way` (`_int4_points`), rotating over `weights`: the fastest of `runs`
    after a warm-up."""
    x = torch.randn(rows, k).to(dtype)
    multiply = {"torch": Int4Weight.torch_kernel, "tiles": Int4Weight.matmul, "codes": _codes_gemv}[way]
    best = float("inf")
    for i in range(runs + 1):
        tic = time.perf_counter()
        for w in weights:
            multiply(w, x)
        best = best if i == 0 else min(best, time.perf_counter() - tic)
    return best / len(weights)


def _codes_gemv(weight: Int4Weight, x: torch.Tensor) -> torch.Tensor:
    out = weight.codes_gemv(x)
    if out is None:
        raise RuntimeError("the C kernel for 4-bit weights is not built here")
    return out


def compute_dtypes(device: ComputeDevice) -> list[str]:
    return ["float32", "bfloat16"] + (["float16"] if device.is_cuda else [])


def attention_rates(device: ComputeDevice, scale: int) -> dict:
    """Masked prefill attention (FLOP/s) and one-token decode attention over a cache prefix (bytes of K, V per
    second), with the engine's own attention function, ungrouped and (on the CPU) over grouped-query heads."""
    dev, sync = device.device, device.synchronize
    sdpa, native_prefill, attention, cpu_attention, grouped, cpu_grouped, shared = {}, {}, {}, {}, {}, {}, {}
    for name in compute_dtypes(device):
        dtype = DTYPES[name]
        b, heads, t, hd = (8, 16, 1024, 128) if device.is_cuda else (2, 12, 256 // min(scale, 2), 64)
        q = torch.randn(b, heads, t, hd, device=dev).to(dtype)
        mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None, None].expand(b, 1, t, t)
        s = timed(lambda q=q, mask=mask: attend_named(q, q, q, mask, native_prefill=False), sync)
        sdpa[name] = 4 * b * heads * t * t * hd / s
        if not device.is_cuda and prefill_attention(q, q, q, mask) is not None:  # the C kernel, this dtype here
            s = timed(lambda q=q, mask=mask: prefill_attention(q, q, q, mask), sync)
            native_prefill[name] = 4 * b * heads * t * t * hd / s
        for where, out in ((dev, attention), (torch.device("cpu"), cpu_attention)):
            b, long = (32, 4096 // scale) if where.type == "cuda" else (8, 2048 // scale)
            position_major = out is cpu_attention  # beside a GPU it reads the cache across the link in place
            out[name] = _decode_attention_rate(where, dtype, b, heads, heads, hd, long, position_major)
        # grouped heads on a CPU, 4 per kv head, at the common head dims: as the compute device, and beside a GPU
        for table, position_major in ((cpu_grouped, True),) + (() if device.is_cuda else ((grouped, False),)):
            table[name] = [(hd, *_decode_attention_rate(torch.device("cpu"), dtype, 8, 16, 4, hd, 2048 // scale,
                                                        position_major)) for hd in (64, 128)]
        shared[name] = _shared_speedup(dtype, 2048 // scale, device.is_cuda)
    for table in (sdpa, attention, cpu_attention, grouped, cpu_grouped, shared):  # a float16 cache: bf16 on a CPU
        if "bfloat16" in table:
            table.setdefault("float16", table["bfloat16"])
    return {"sdpa_prefill": sdpa, "prefill_native": native_prefill, "attention": attention,
            "cpu_attention": cpu_attention, "attention_grouped": grouped, "cpu_attention_grouped": cpu_grouped,
            "attention_shared": shared}


def codes_attention_rates(device: ComputeDevice, scale: int) -> dict:
    """CPU decode attention over a 4-bit cache read as stored (quantized_attention), 1 and 4 query heads per kv
    head of 128, over prefixes of 32 and `long` positions of 8 rows, laid out as the engine keeps the parts a CPU
    attends: (fixed s, stored K+V bytes/s) per CPU attention dtype; {} without the kernel. With CUDA, the GPU's
    kernel too (`attention_codes`)."""
    from ..kernels import quantized_attention as qa
    from ..kernels.quantization import CompressionConfig, quantize

    config = CompressionConfig(4, 64, -1)
    if not qa.supported(config):
        return {"cpu_attention_codes": {}, "attention_codes": _device_codes_rates(device, config, scale)}
    rows, hd, long = 8, 128, 2048 // scale
    out = {}
    for name in ("float32", "bfloat16"):
        dtype, points = DTYPES[name], []
        for group, kv_heads in ((1, 16), (4, 4)):
            parts = []
            for _ in "kv":
                if device.host_is_separate:  # beside a GPU: position-major host RAM
                    parts.append(qa.position_major(torch.randn(long + 1, rows, kv_heads, hd), config))
                else:
                    x = quantize(torch.randn(rows, kv_heads, long + 1, hd), config)
                    parts.append((x.data.view(rows, kv_heads, long + 1, -1), x.scale, x.minimum))
            q = torch.randn(rows, kv_heads * group, 1, hd).to(dtype)
            new = torch.randn(rows, kv_heads, 1, hd).to(dtype)
            times = []
            for length in (32, long):
                k, v = ([p[:, :, :length] for p in part] for part in parts)
                mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
                times.append(timed(lambda k=k, v=v, mask=mask, n=length, q=q, new=new: qa.attend(
                    q, k, v, config, mask, n - 1, new, new), lambda: None))
            per_position = 2 * sum(p[:, :, :1].numel() * p.element_size() for p in parts[0])
            rate, fixed = fit(per_position * 32, times[0], per_position * long, times[1])
            points.append((group, fixed, rate))
        out[name] = points
    out["float16"] = out["bfloat16"]  # a float16 cache is attended in bfloat16 on a CPU
    return {"cpu_attention_codes": out, "attention_codes": _device_codes_rates(device, config, scale)}


def _device_codes_rates(device: ComputeDevice, config, scale: int) -> dict:
    """GPU decode attention over a 4-bit cache in its memory read as stored (quantized_attention_triton), 1 and 4
    query heads per kv head of 128, 64 rows over prefixes of 32 and `long` positions: (group, fixed s, stored K+V
    bytes/s) per compute dtype; {} on a CPU or where the kernel is not used."""
    from ..kernels import quantized_attention_triton as qt
    from ..kernels.quantization import quantize

    if not device.is_cuda:
        return {}
    rows, hd, long, out = max(1, 64 // scale), 128, max(64, 8192 // scale), {}
    for name in compute_dtypes(device):
        dtype, points = DTYPES[name], []
        for group, kv_heads in ((1, 16), (4, 4)):
            if not qt.wanted_on(device.device, dtype, group, hd, config.group_size):
                return {}
            parts = []
            for _ in "kv":
                x = quantize(torch.randn(rows, kv_heads, long, hd, device=device.device, dtype=dtype), config)
                parts.append((x.data.view(rows, kv_heads, long, -1), x.scale, x.minimum))
            q = torch.randn(rows, kv_heads * group, 1, hd, device=device.device, dtype=dtype)
            new = torch.randn(rows, kv_heads, 1, hd, device=device.device, dtype=dtype)
            times = []
            for length in (32, long):
                k, v = ([p[:, :, :length] for p in part] for part in parts)
                times.append(timed(lambda k=k, v=v, n=length, q=q, new=new: qt.attend(q, k, v, None, n - 1, new, new),
                                   device.synchronize))
            per_position = 2 * sum(p[:, :, :1].numel() * p.element_size() for p in parts[0])
            rate, fixed = fit(per_position * 32, times[0], per_position * long, times[1])
            points.append((group, fixed, rate))
        out[name] = points
    return out


def _shared_speedup(dtype: torch.dtype, long: int, position_major: bool) -> float:
    """How many times faster per byte CPU decode attention goes over a shared prompt prefix's positions (read from
    one row) than over each row's own: both measured back to back, twice in turn, over 32 rows (their own cache,
    67 MB in bf16 at scale 1, past a last-level cache as a decode batch's is); at least 1 (the same work, its bytes
    from cache rather than memory), so that a noisy pair does not cost sharing more than not."""
    ratios = []
    for first_shared in (False, True):
        rates = {s: _decode_attention_rate(torch.device("cpu"), dtype, 32, 16, 4, 64, long, position_major,
                                           shared=s)[1] for s in (first_shared, not first_shared)}
        ratios.append(rates[True] / rates[False])
    return max(1.0, sum(ratios) / len(ratios))


def _decode_attention_rate(where: torch.device, dtype: torch.dtype, b: int, heads: int, kv_heads: int, hd: int,
                           long: int, position_major: bool, shared: bool = False) -> tuple[float, float]:
    """(fixed s per call, K+V bytes/s) of one new token's attention over cache prefixes of 32 and `long`
    positions, k and v apart (larger than a CPU's last-level cache at `long`, as a real cache is): position-major
    as across a link (native.decode_attention on all cores), else head-major as in compute memory. shared: every
    row's positions a prompt prefix read from row 0 (shared_prefix.shared_rows); bytes counted as the rows'."""
    if position_major:
        k, v = (torch.randn(long + 64, b, kv_heads, hd).to(dtype).permute(1, 2, 0, 3) for _ in range(2))
    else:
        k, v = (torch.randn(b, kv_heads, long + 64, hd, device=where).to(dtype) for _ in range(2))
    q1 = torch.randn(b, heads, 1, hd, device=where).to(dtype)
    times = []
    for length in (32, long):  # over a cache prefix, as the engine attends
        kl, vl = k[:, :, :length], v[:, :, :length]
        m1 = torch.ones(b, 1, 1, length, dtype=torch.bool, device=where)
        here = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)
        rows = shared_rows(torch.zeros(b, dtype=torch.long), length) if shared else None
        times.append(timed(lambda kl=kl, vl=vl, m1=m1, rows=rows: attend_named(q1, kl, vl, m1, shared=rows), here))
    per_position = 2 * b * kv_heads * hd * dtype.itemsize
    rate, fixed = fit(per_position * 32, times[0], per_position * long, times[1])
    return fixed, rate


def host_contention(device: ComputeDevice, scale: int) -> dict:
    """How much CPU decode attention (bf16, position-major, all cores) and page-locked copies to the GPU slow each
    other, both reading host RAM (CPU attention beside copies of the cache or weights across the link): each one's
    rate while the other runs, over its rate alone. (1, 1) without CUDA."""
    if not device.is_cuda:
        return {"host_contention": (1.0, 1.0)}
    try:
        return {"host_contention": _host_contention(device, scale)}
    except (RuntimeError, OSError) as e:  # a probe of a refinement: the profile does without it, and says so
        warnings.warn(f"CPU attention beside the link not measured ({type(e).__name__}: {e}): taken as unslowed",
                      stacklevel=2)
        return {"host_contention": (1.0, 1.0)}


def _host_contention(device: ComputeDevice, scale: int) -> tuple[float, float]:
    b, heads, hd, long = 8, 16, 128, 4096 // scale
    k, v = (torch.randn(long, b, heads, hd).to(torch.bfloat16).permute(1, 2, 0, 3) for _ in range(2))
    q, mask = torch.randn(b, heads, 1, hd).to(torch.bfloat16), torch.ones(b, 1, 1, long, dtype=torch.bool)
    pinned = torch.empty(256 * MiB // scale, dtype=torch.uint8).pin_memory()
    on_dev, stream = torch.empty(pinned.numel(), dtype=torch.uint8, device=device.device), torch.cuda.Stream()

    def attend() -> None:
        attend_named(q, k, v, mask)

    def copy() -> None:
        with torch.cuda.stream(stream):
            on_dev.copy_(pinned, non_blocking=True)

    return slowdowns(attend, copy, stream.synchronize)


def slowdowns(first: Callable[[], object], second: Callable[[], object],
              sync_second: Callable[[], None]) -> tuple[float, float]:
    """(first's rate while second runs over its rate alone, second's while first runs over its own): second is
    asynchronous (done at `sync_second`), so copies of it are queued past first's timed calls; first runs on a
    thread of its own while second is timed."""
    first_alone, second_alone = timed(first, lambda: None), timed(second, sync_second)
    for _ in range(min(64, int(4 * first_alone / second_alone) + 2)):
        second()
    first_beside = timed(first, lambda: None, min_time=first_alone, max_reps=3)
    sync_second()
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [first() for _ in iter(stop.is_set, True)], daemon=True)
    worker.start()
    second_beside = timed(second, sync_second)
    stop.set()
    worker.join()
    return min(1.0, first_alone / first_beside), min(1.0, second_alone / second_beside)


def link_rates(device: ComputeDevice, scale: int) -> dict:
    """Host<->device copies (pinned, pageable), copies within each memory, and the cache's transposing copy."""
    dev, sync = device.device, device.synchronize
    size = (256 if device.is_cuda else 128) * MiB // scale
    host, host2 = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    out = {"host_copy": size / timed(lambda: host2.copy_(host), lambda: None)}
    if device.is_cuda:
        pinned, on_dev = host.pin_memory(), torch.empty(size, dtype=torch.uint8, device=dev)
        on_dev2 = torch.empty_like(on_dev)
        out.update(h2d_pinned=size / timed(lambda: on_dev.copy_(pinned, non_blocking=True), sync),
                   h2d_pageable=size / timed(lambda: on_dev.copy_(host), sync),
                   d2h_pinned=size / timed(lambda: pinned.copy_(on_dev, non_blocking=True), sync),
                   d2h_pageable=size / timed(lambda: host.copy_(on_dev), sync),
                   device_copy=size / timed(lambda: on_dev2.copy_(on_dev), sync))
    else:  # the "link" is host memory itself
        out.update(dict.fromkeys(("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "device_copy"),
                                 out["host_copy"]))
    rows, heads, length, hd = 8, 12, 1024 // scale, 64
    pos_major = torch.randn(length, rows, heads, hd).to(torch.bfloat16)
    row_major = torch.empty(rows, heads, length, hd, dtype=torch.bfloat16)
    out["strided_copy"] = pos_major.numel() * 2 / timed(lambda: row_major.copy_(pos_major.permute(1, 2, 0, 3)),
                                                         lambda: None)
    return out


def compression_rates(device: ComputeDevice, scale: int) -> dict:
    """4-bit dequantization of weights (the engine's path: on CUDA the fused kernel where it passed its check, on
    a matrix the size of a large model's, 8192 x 8192, where launches no longer count) and quantization,
    elements per second."""
    dq, qz = {}, {}
    rows = (8192 if device.is_cuda else 2048) // scale
    for name in compute_dtypes(device):
        dtype = DTYPES[name]
        x = torch.randn(rows, rows if device.is_cuda else 2048, device=device.device).to(dtype)
        qt = quantize(x, CompressionConfig(4, 64, 1))
        out = torch.empty_like(x)
        dq[name] = x.numel() / timed(lambda qt=qt, out=out, dtype=dtype: dequantize(qt, dtype, out=out),
                                     device.synchronize)
        x = x[:2048 // scale] if device.is_cuda else x
        qz[name] = x.numel() / timed(lambda x=x: quantize(x, CompressionConfig(4, 64, -1)), device.synchronize)
    for table in (dq, qz):
        table.setdefault("float16", table["bfloat16"])
    return {"dequantize": dq, "quantize": qz}


def contention(device: ComputeDevice, scale: int, io: Callable[[], object] | None = None) -> float:
    """(time of matmuls with `io` in a thread beside them - matmuls alone) / io alone: 1 when they share the
    cores perfectly, more when threads oversubscribe them. `io` defaults to dequantization (torch work in an
    I/O thread). 1 with CUDA (separate devices)."""
    if device.is_cuda:
        return 1.0
    x = torch.randn(16, 768).to(torch.bfloat16)
    weights = [torch.randn(3072, 768).to(torch.bfloat16) for _ in range(24 // scale)]
    codes = quantize(torch.randn(3072, 768).to(torch.bfloat16), CompressionConfig(4, 64, 1))
    out = torch.empty(3072, 768, dtype=torch.bfloat16)

    def compute() -> None:
        for _ in range(5):
            for w in weights:
                F.linear(x, w)

    def dequantizing() -> None:
        for _ in range(15 // scale or 1):
            dequantize(codes, torch.bfloat16, out=out)

    io = io or dequantizing
    nothing = lambda: None  # noqa: E731
    alone_compute, alone_io = timed(compute, nothing), timed(io, nothing)

    def both() -> None:
        thread = threading.Thread(target=io)
        thread.start()
        compute()
        thread.join()

    return max(1.0, (timed(both, nothing) - alone_compute) / alone_io)


def measure_disk(offload_dir: str, size: int, device: ComputeDevice | None = None) -> dict:
    """Write and read back `size` bytes in the offload file system, cold and from the page cache, into a
    buffer as large as the file (as the engine reads into weight slots, not into a cache-sized buffer);
    and how much dearer page-cache reads get beside compute."""
    parent = offload_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    fd_, path = tempfile.mkstemp(prefix="flexgen-lite-profile-", dir=parent)
    os.close(fd_)
    chunk = 8 * MiB
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 16) * (size >> 16))
    view = memoryview(buf)
    chunks = [(off, view[off:off + chunk]) for off in range(0, size, chunk)]
    try:
        method, fd = "O_DIRECT", None
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
            os.pwrite(fd, chunks[0][1], 0)  # file systems without O_DIRECT (tmpfs) fail here
        except OSError:
            if fd is not None:
                os.close(fd)
            method, fd = "buffered + fadvise(DONTNEED)", os.open(path, os.O_RDWR)
        if not hasattr(os, "O_DIRECT"):
            method = "buffered + fadvise(DONTNEED)"

        def drop() -> None:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        def each(io) -> float:
            tic = time.perf_counter()
            for off, part in chunks:
                io(fd, part, off)
            return size / (time.perf_counter() - tic)

        def read(fd, part, off):
            os.preadv(fd, [part], off)

        tic = time.perf_counter()
        each(os.pwrite)
        os.fsync(fd)
        write = size / (time.perf_counter() - tic)
        drop()
        cold = each(read)
        os.close(fd)

        fd = os.open(path, os.O_RDWR)  # buffered: fill the page cache, then time reads from it
        each(read)
        cached_read = each(read)
        cached_write = each(os.pwrite)
        reads = contention(device, 1, lambda: each(read)) if device is not None else 1.0
        drop()
        os.close(fd)
    finally:
        view.release()
        for _, part in chunks:
            part.release()
        buf.close()
        os.unlink(path)
    return {"disk_read": cold, "disk_write": write, "cached_read": cached_read, "cached_write": cached_write,
            "disk_method": method, "contention_read": reads}
