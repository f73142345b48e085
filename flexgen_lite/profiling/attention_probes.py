"""Timing attention (probes.py's helpers): masked prefill, one new token's decode attention over a cache prefix on
the compute device and on the CPU (dense, over grouped heads, over a shared prompt prefix), and over a 4-bit cache
read as stored (the CPU's kernel and a GPU's). For the profile's attention tables (hardware.py)."""

from __future__ import annotations

import torch

from ..engine.policy import DTYPES
from ..engine.shared_prefix import shared_rows
from ..kernels.attention import attend_named
from ..kernels.prefill_attention import prefill_attention
from ..system.devices import ComputeDevice
from .probes import MiB, compute_dtypes, fit, timed

ROTATED_CACHES = 128 * MiB  # a CPU's decode attention timed over caches this large together (none in a cache)


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
        room = ROTATED_CACHES // scale
        for where, out in ((dev, attention), (torch.device("cpu"), cpu_attention)):
            b, long = (32, 4096 // scale) if where.type == "cuda" else (8, 2048 // scale)
            position_major = out is cpu_attention  # beside a GPU it reads the cache across the link in place
            out[name] = _decode_attention_rate(where, dtype, b, heads, heads, hd, long, position_major, room=room)
        # grouped heads on a CPU, 4 per kv head, at the common head dims: as the compute device, and beside a GPU
        for table, position_major in ((cpu_grouped, True),) + (() if device.is_cuda else ((grouped, False),)):
            table[name] = [(hd, *_decode_attention_rate(torch.device("cpu"), dtype, 8, 16, 4, hd, 2048 // scale,
                                                        position_major, room=room)) for hd in (64, 128)]
        shared[name] = _shared_speedup(dtype, 2048 // scale, device.is_cuda)
    _kept.clear()
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
                           long: int, position_major: bool, shared: bool = False,
                           room: int = 0) -> tuple[float, float, float]:
    """(fixed s per call, K+V bytes/s, s per (row, kv head): a CPU's `_pair_cost`, else 0) of one new token's
    attention over cache prefixes of 32 and `long` positions, k and v apart: position-major as across a link
    (native.decode_attention on all cores), else head-major as in compute memory. shared: every row's positions a
    prompt prefix read from row 0 (shared_prefix.shared_rows); bytes counted as the rows'. `room`: on a CPU, bytes
    of caches rotated over (each call reads one no cache holds, as a decode step reads each layer's once: timed
    over one, a cache of 50 MB was read 1.4-1.8x as fast as the engine's, past a 32 MiB L3 but partly in it)."""
    per_copy = 2 * b * kv_heads * (long + 64) * hd * dtype.itemsize
    copies = max(1, room // per_copy) if where.type == "cpu" else 1
    caches = _caches(where, dtype, b, kv_heads, hd, long, position_major, copies)
    q1 = torch.randn(b, heads, 1, hd, device=where).to(dtype)
    here = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)
    times = []
    for length in (32, long):  # over a cache prefix, as the engine attends
        m1 = torch.ones(b, 1, 1, length, dtype=torch.bool, device=where)
        rows = shared_rows(torch.zeros(b, dtype=torch.long), length) if shared else None
        views = [(k[:, :, :length], v[:, :, :length]) for k, v in caches]
        calls = lambda views=views, m1=m1, rows=rows: [attend_named(q1, k, v, m1, shared=rows)  # noqa: E731
                                                       for k, v in views]
        times.append(timed(calls, here) / copies)
    per_position = 2 * b * kv_heads * hd * dtype.itemsize
    rate, fixed = fit(per_position * 32, times[0], per_position * long, times[1])
    if where.type != "cpu" or shared:
        return fixed, rate, 0.0
    pair = _pair_cost(dtype, b, heads, kv_heads, hd, position_major, room, times[0], per_position * 32 / rate)
    return max(0.0, fixed - b * kv_heads * pair), rate, pair


PAIR_ROWS = 8  # times the probe's rows, over 32 positions: what a CPU spends per (row, kv head) besides the bytes


def _pair_cost(dtype: torch.dtype, b: int, heads: int, kv_heads: int, hd: int, position_major: bool, room: int,
               t_short: float, read_short: float) -> float:
    """Seconds per (row, kv head) of a CPU's decode attention beside its bytes (a work item's set-up, the first
    lines of its rows fetched at memory latency): the same 32 positions over PAIR_ROWS times the rows, less the
    extra bytes at the fitted rate (`read_short`: seconds of the probe's 32-position bytes); at least 0. Short
    caches of many rows (a batch of short prompts) are read at half the long-row rate or less without it."""
    many = b * PAIR_ROWS
    per_copy = 2 * many * kv_heads * (32 + 64) * hd * dtype.itemsize
    copies = max(1, room // per_copy)
    cpu = torch.device("cpu")
    caches = [(k[:, :, :32], v[:, :, :32]) for k, v in _caches(cpu, dtype, many, kv_heads, hd, 32, position_major,
                                                                copies)]
    q = torch.randn(many, heads, 1, hd).to(dtype)
    mask = torch.ones(many, 1, 1, 32, dtype=torch.bool)
    t_many = timed(lambda: [attend_named(q, k, v, mask) for k, v in caches], lambda: None) / copies
    extra_pairs = (many - b) * kv_heads
    return max(0.0, (t_many - t_short - (PAIR_ROWS - 1) * read_short) / extra_pairs)


def _caches(where: torch.device, dtype: torch.dtype, b: int, kv_heads: int, hd: int, long: int,
            position_major: bool, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`copies` (k, v) pairs of (b, kv_heads, long + 64, hd) (views of position-major arrays where asked), filled
    with values in [-2, 2]: views of one buffer kept while the probes run (fresh memory is slow to touch here)."""
    shape = (long + 64, b, kv_heads, hd) if position_major else (b, kv_heads, long + 64, hd)
    n = torch.Size(shape).numel()
    flat = _buffer(where, 2 * copies * n * dtype.itemsize)[:2 * copies * n * dtype.itemsize].view(dtype)
    flat.uniform_(-2, 2)
    arrays = [flat[i * n:(i + 1) * n].view(shape) for i in range(2 * copies)]
    if position_major:
        arrays = [a.permute(1, 2, 0, 3) for a in arrays]
    return [(arrays[2 * i], arrays[2 * i + 1]) for i in range(copies)]


_kept: dict[str, torch.Tensor] = {}  # per device, the probes' cache buffer while attention_rates runs


def _buffer(where: torch.device, nbytes: int) -> torch.Tensor:
    found = _kept.get(str(where))
    if found is None or found.numel() < nbytes:
        found = _kept[str(where)] = torch.empty(nbytes, dtype=torch.uint8, device=where)
    return found
