"""Timing the machine's kernels, copies and disk: each probe returns rates for the profile (hardware.py).

Here the timing helpers the other probes share, matmul rates per dtype over a range of batch rows, host<->device
links, 4-bit (de)quantization, how much dearer work gets beside I/O; attention in attention_probes.py, 4-bit weights
as stored in int4_probes.py, the offload directory's file system in disk_probes.py. `measure.py` runs them (and the
engine-level ones) in order.
"""

from __future__ import annotations

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
from ..kernels import native
from ..kernels.attention import attend_named
from ..kernels.compression import CompressionConfig, dequantize, quantize
from ..kernels.int8_weight import GROUP as INT8_GROUP
from ..kernels.int8_weight import Int8Weight
from ..kernels.int8_weight import fits as int8_fits
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


ROTATED_ROWS = 64
MATMUL_MIN_TIME = 0.05  # seconds of calls a point at least times (after a warm-up, at least 3)


def matmul_rates(device: ComputeDevice, scale: int, names: tuple[str, ...] = tuple(DTYPES),
                 rows: tuple[int, ...] | None = None, linear: Callable = F.linear, weight: Callable | None = None
                 ) -> dict:
    """(rows, K) @ (K, N) per dtype of `names` over rows from 1 (weight-read bound) up to compute bound, for a
    large and a small weight: per row count, a rate and a fixed cost per call that fit both. `linear`: the
    product measured (torch's by default); `weight(n, k, dtype)`: a weight it takes (random dense ones)."""
    dev, sync = device.device, device.synchronize
    shapes = matmul_shapes(device, scale)
    rows = rows or ((1, 8, 32, 128, 512, 2048, 8192) if device.is_cuda else (1, 4, 8, 16, 32, 64, 128, 256, 1024))
    out = {}
    for name in names:
        dtype, points = DTYPES[name], []
        # as in a model, each matmul reads a weight no cache holds: rotate over 128 MiB of them
        room = 128 * MiB if scale == 1 else 2 * MiB
        make = weight or (lambda n, k, dtype: torch.randn(n, k, device=dev).to(dtype))
        weights = []
        for k, n in shapes:
            first = make(n, k, dtype)
            weights.append([first] + [make(n, k, dtype) for _ in range(max(1, room // first.nbytes) - 1)])
        for i, m in enumerate(rows):
            flops, times = [], []
            for (k, n), ws in zip(shapes, weights, strict=True):
                x = torch.randn(m, k, device=dev).to(dtype)
                ws = ws if m <= ROTATED_ROWS else ws[:1]
                s = timed(lambda x=x, ws=ws: [linear(x, w) for w in ws], sync, min_time=MATMUL_MIN_TIME / scale)
                flops.append(2 * m * k * n)
                times.append(s / len(ws))
            rate, fixed = fit(flops[1], times[1], flops[0], times[0])
            points.append((m, rate, fixed))
            further = rows[i + 1] / m if i + 1 < len(rows) else 0
            if times[0] * further > 0.25 and scale == 1:  # a slow dtype (float16 on most CPUs): the next point's
                break  # product would take over 0.25 s
        out[name] = points
    return {"matmul": out, "matmul_shape": shapes[0]}


COARSE_ROWS = (1, 16, 128)  # a dtype the device computes in only when forced (float16 on a CPU)


def every_matmul_rate(device: ComputeDevice, scale: int) -> dict:
    """`matmul_rates` in the dtypes the device computes in, and at COARSE_ROWS in the others (float16 on a CPU,
    whose rates only predict a forced --dtype: ~1 s there instead of ~4 on this VM)."""
    found = matmul_rates(device, scale, tuple(compute_dtypes(device)))
    others = tuple(name for name in DTYPES if name not in compute_dtypes(device))
    if others:
        found["matmul"].update(matmul_rates(device, scale, others, COARSE_ROWS)["matmul"])
    return found


# where the C kernel for a few rows may beat torch's matmul (hardware.gemv_rows); to 64 since profile v20 (a
# head of SmolLM2's 49,152 x 576 at 32 rows: 6.6 ms against torch's 9.9 on the AVX-512 VM)
GEMV_ROWS = (1, 2, 4, 8, 16, 32, 64)


def gemv_rates(device: ComputeDevice, scale: int) -> dict:
    """native.dense_gemv as `matmul_rates` measures torch's matmul, in the dtypes the CPU computes in (none with
    CUDA or without the kernel). ~1-2 s on this VM."""
    probe = torch.ones(2, 64)
    if device.is_cuda or native.dense_gemv(probe, probe) is None:
        return {"gemv": {}}
    found = matmul_rates(device, scale, tuple(compute_dtypes(device)), GEMV_ROWS, native.dense_gemv)
    return {"gemv": found["matmul"]}


INT8_ROWS = (1, 2, 4, 8, 16, 32)  # a decode step's rows times an 8-bit head (int8_weight.head_wins)


def int8_rates(device: ComputeDevice, scale: int) -> dict:
    """native.int8_gemv (an 8-bit embedding/head, a few rows) as `gemv_rates` measures the dense kernel, in the
    dtypes the CPU computes in; {} with CUDA or without the kernel. ~4 s on this VM."""
    if device.is_cuda or not int8_fits((32, 32)):
        return {"int8_gemv": {}}

    codes, taken = torch.randint(-127, 128, (128 * MiB // scale,), dtype=torch.int8), [0]

    def weight(n: int, k: int, dtype: torch.dtype) -> Int8Weight:  # the next n * k random codes (made once)
        at = taken[0] if taken[0] + n * k <= codes.numel() else 0
        taken[0] = at + n * k
        return Int8Weight(codes[at:at + n * k].view(n, k), torch.rand(n, k // INT8_GROUP).mul_(0.01).half(), dtype)

    found = matmul_rates(device, scale, tuple(compute_dtypes(device)), INT8_ROWS,
                         lambda x, w: native.int8_gemv(w.codes, w.scale, x), weight)
    return {"int8_gemv": found["matmul"]}


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


def compute_dtypes(device: ComputeDevice) -> list[str]:
    return ["float32", "bfloat16"] + (["float16"] if device.is_cuda else [])


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


def host_touch(device: ComputeDevice, scale: int) -> dict:
    """Bytes/s of the first write to fresh host memory (page faults and the kernel's zeroing: 0.4-2 GB/s seen on
    VMs, where a KV cache of tens of GB in host RAM takes that long to be first written); the faster of two fresh
    mappings."""
    size, best = 256 * MiB // scale, 0.0
    for _ in range(2):
        region = mmap.mmap(-1, size)
        buf = torch.frombuffer(region, dtype=torch.uint8)
        tic = time.perf_counter()
        buf.fill_(1)
        best = max(best, size / (time.perf_counter() - tic))
        del buf
        region.close()
    return {"host_touch": best}


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
    cores perfectly, more when threads oversubscribe them. `io` defaults to dequantization (the engine's path, in
    an I/O thread). 1 with CUDA (separate devices)."""
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
