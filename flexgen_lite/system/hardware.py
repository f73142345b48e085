"""A machine's measured speeds (`HardwareProfile`): what the cost model turns into predicted times.

Measuring one is profiling/measure.py's concern, storing and finding one profile_store.py's; this module imports
neither, so the cost model and the profiler can both use it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

PROFILE_VERSION = 20  # measured anew when the code measured changes; 20: the dense few-row kernel to 64 rows;
# 19: a CPU's decode attention per row and kv head; 18: a CPU's mapped files (mapped_read, _write);
# 17: the 8-bit head's kernel (int8_gemv), AVX2 CPUs' attention over a 4-bit cache, FlexGen-grouped products and
# fp32 prefill attention;
# 16: AVX2 CPUs' kernels (few-row products, 4-bit weights in the layout, grouped fp32 decode attention);
# 15: FlexGen-grouped 4-bit products on a CPU; 14: a CPU dequantizes 4 bits by the C kernel;
# 13: 4-bit weights multiplied as stored in float32 too (torch's int4 kernel, the C kernel for a few rows, tiles); 12:
# the 4-bit attention kernel 2-6x faster (a lone head from the codes, grouped heads by tiles, position-major
# prefetch); 11: CPU attention over a 4-bit cache as stored, a compressed part's load measured over a prefix of its
# slot (the engine's); 10: CPU decode attention over a shared prompt prefix, grouped heads of dim 64 scored 16
# positions at a time; 9: the CPU's 4-bit codes converted as read, measured up to 64 rows; 8: the C prefill attention
# in fp32 too, bf16 few-row products by tiles of 4 weight rows, int4 dequantization 2.5x, the eager schedule's
# overhead with the fused CPU decode step off; 7: CPU attention beside a GPU over the position-major cache, its rows
# prefetched into L2 (1.6x), and the C prefill attention apart from torch's; 6: the CPU's products of a few rows by
# the C kernels apart from torch's, grouped head decode attention; 5: the CPU's int4 products of one or two rows by
# the C kernel; 4: CUDA 4-bit dequantization by the fused kernel, CPU attention beside a GPU on all cores
CUDA_PROFILE_SINCE = 12  # a GPU machine's profile of this version or later is current (13-17 changed CPUs' probes)


@dataclass
class HardwareProfile:
    """Measured rates (FLOP/s, bytes/s, elements/s) and fixed costs (seconds) of what the engine does."""

    device: str
    is_cuda: bool
    matmul: dict[str, list[tuple[int, float, float]]]  # dtype -> [(rows, FLOP/s, fixed seconds per call)]
    matmul_shape: tuple[int, int]  # (K, N) of the large measured weight
    sdpa_prefill: dict[str, float]  # FLOP/s of masked prefill attention, 4 * B * heads * T^2 * hd per call
    attention: dict[str, tuple[float, float]]  # decode attention on the compute device: (s per call, K+V bytes/s)
    cpu_attention: dict[str, tuple[float, float]]  # the same on the CPU (cpu_cache_compute)
    h2d_pinned: float
    h2d_pageable: float
    d2h_pinned: float
    d2h_pageable: float
    device_copy: float  # a copy within compute-device memory
    host_copy: float  # memcpy in host RAM
    strided_copy: float  # the cache's (len, rows, heads, d) -> (rows, heads, len, d) copy, host
    disk_read: float  # cold: O_DIRECT, or buffered after posix_fadvise(DONTNEED)
    disk_write: float  # written and synced
    cached_read: float  # buffered read of a file in the page cache
    cached_write: float  # buffered write, not synced
    disk_method: str
    dequantize: dict[str, float]  # elements/s of 4-bit dequantization into dtype, compute device
    quantize: dict[str, float]  # elements/s of 4-bit quantization from dtype, compute device
    cache_disk_load: dict[str, tuple[float, float]]  # KVCache.load of a disk part (page cache): (s, bytes/s)
    cache_dequantize: dict[str, tuple[float, float]]  # KVCache.load of a compressed part: (s, elements/s)
    cache_store: float  # seconds of writing one token's k, v into a compressed part (KVCache.store)
    op_overhead: float  # seconds of one small torch op (dispatch, Python)
    handoff: float  # seconds to hand a task to an I/O thread and wait for it (IOPool)
    layer_overhead: dict[str, tuple[float, float]]  # family -> (s per layer, s per layer and batch) not otherwise
    # counted in a decode step
    contention: float  # torch work of an I/O thread beside compute costs this times its own time (CPU only)
    contention_read: float  # the same for page-cache reads
    offload_dir: str
    threads: int
    host_memory: int
    torch_version: str = torch.__version__
    measured_at: str = ""
    seconds: float = 0.0
    version: int = PROFILE_VERSION
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # what each stage of `measure` took
    stage_compiles: dict[str, tuple[int, float]] = field(default_factory=dict)  # Triton compiles a stage made, and
    # their seconds (where any)
    # dtype -> [(rows, FLOP/s, fixed s)] of 4-bit weights multiplied as stored (int4_matmul's kernel, CPU);
    # {} where there is none (CUDA, this torch lacks it, or it does not read the layout: AVX2); None: not measured
    int4_matmul: dict[str, list[tuple[int, float, float]]] | None = None
    # dtype -> elements/s of dequantizing the kernel's layout for a dense matmul (Int4Weight.dequantize_t: the C
    # kernel where it is built); None: not measured (an older profile)
    int4_dequantize: dict[str, float] | None = None
    # dtype -> [(rows, FLOP/s, fixed s)] of the same weights multiplied by tiles (Int4Weight._tiled: the C
    # kernel); {} without it; None: not measured
    int4_tiles: dict[str, list[tuple[int, float, float]]] | None = None
    # dtype -> [(head dim, s per call, K+V bytes/s)]: decode attention on a CPU compute device over grouped-query
    # heads (4 query heads per kv head), as `attention` (which is measured ungrouped); {} on CUDA
    attention_grouped: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # the same for CPU attention over the position-major cache (`cpu_attention`, beside a GPU)
    cpu_attention_grouped: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # dtype -> how many times faster per byte CPU decode attention goes over a shared prompt prefix's positions,
    # read from one row (attention.c's rows_t), than over each row's own (grouped heads of dim 64, the two measured
    # back to back: in compute memory on a CPU, else beside the GPU)
    attention_shared: dict[str, float] = field(default_factory=dict)
    # dtype -> [(rows, FLOP/s, fixed s)] of 4-bit weights multiplied as stored for a few rows: on a CPU by the C
    # kernel (native.int4_gemv; int4_matmul then holds torch's kernel alone), on a GPU by Triton's
    # (int4_gemv_triton, a decode step's products: products_cost.codes_win); {} without it
    int4_gemv: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # dtype -> [(rows, FLOP/s, fixed s)] of 4-bit weights in FlexGen's grouping (along the output dimension)
    # multiplied as stored by a CPU's C kernel (native.int4_gemv_row_groups; products_cost.codes_win); {} without it
    row_groups_gemv: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # dtype -> [(rows, FLOP/s, fixed s)] of dense weights multiplied by the C kernel for a few rows
    # (native.dense_gemv, CPU); {} without it (CUDA, no compiler)
    gemv: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # dtype -> [(rows, FLOP/s, fixed s)] of an 8-bit embedding/head multiplied by its C kernel for a few rows
    # (native.int8_gemv, CPU: int8_weight.head_wins); {} without it; None: not measured (an older profile)
    int8_gemv: dict[str, list[tuple[int, float, float]]] | None = None
    # dtype -> FLOP/s of prefill attention by the C kernel (native/prefill.c, CPU, bf16), counted as
    # `sdpa_prefill` (which then holds torch's alone); {} without it
    prefill_native: dict[str, float] = field(default_factory=dict)
    # dtype -> [(query heads per kv head, s per call, stored K+V bytes/s)] of CPU decode attention over a 4-bit
    # cache read as stored (quantized_attention), laid out as the engine keeps the parts a CPU attends (beside a GPU
    # position-major in host RAM, else head-major); {} without the kernel
    cpu_attention_codes: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # dtype -> [(query heads per kv head, s per call, stored K+V bytes/s)] of decode attention on a GPU over a 4-bit
    # cache in its memory read as stored (quantized_attention_triton); {} on a CPU, without Triton, or not measured
    attention_codes: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    # beside a GPU, CPU decode attention and page-locked copies to the GPU both read host RAM: (CPU attention's
    # rate while copies run over its rate alone, the copies' rate while it runs over theirs alone); (1, 1) where
    # not measured (a CPU, an older profile)
    host_contention: tuple[float, float] = (1.0, 1.0)
    # bytes/s of the first write to fresh host memory (page faults, zeroing): what a plan's host RAM costs before
    # its job runs; 0: not measured (an older profile)
    host_touch: float = 0.0
    # a CPU computing on offload files memory-mapped in place: bytes/s of faulting pages written through a map (a
    # cache part's) in and out of the process (DiskFile.prefetch, release), seconds per mapped page first written
    # (a cache part's new token, a page per row and head), and the engine's seconds beyond what the cost model
    # counts per layer whose weights it maps and per cache part it maps (decode steps of a small model with either
    # on disk against all in memory), with overlap (the I/O thread's) and without (`_inline`: in the compute
    # thread); 0: not measured (CUDA, an older profile)
    mapped_read: float = 0.0
    mapped_write: float = 0.0
    mapped_fetch: float = 0.0
    mapped_part: float = 0.0
    mapped_fetch_inline: float = 0.0
    mapped_part_inline: float = 0.0

    def mapped_overheads(self, overlap: bool) -> tuple[float, float]:
        """(per layer mapped, per cache part mapped) of the engine with overlap on or off."""
        return (self.mapped_fetch, self.mapped_part) if overlap else (self.mapped_fetch_inline,
                                                                     self.mapped_part_inline)

    def codes_attention(self, dtype: str, group: int) -> tuple[float, float] | None:
        """(s per call, stored bytes/s) of CPU attention over a 4-bit cache as stored, for `group` query heads per
        kv head (the measured group nearest), or None where not measured. The kernel reads codes whatever the query's
        dtype: float16 takes bfloat16's points where it has none of its own (profiles measure the two alike)."""
        points = self.cpu_attention_codes.get(dtype) or (self.cpu_attention_codes.get("bfloat16")
                                                         if dtype == "float16" else None)
        if not points:
            return None
        _, fixed, rate = min(points, key=lambda p: abs(p[0] - group))
        return fixed, rate

    def device_codes_attention(self, dtype: str, group: int) -> tuple[float, float] | None:
        """(s per call, stored bytes/s) of GPU attention over a 4-bit cache as stored (the measured group nearest
        `group`), or None where not measured."""
        points = self.attention_codes.get(dtype)
        return min(points, key=lambda p: abs(p[0] - group))[1:] if points else None

    def prefill_attention_rate(self, dtype: str) -> float:
        """FLOP/s (4 * B * heads * T^2 * hd per call) of prefill attention as the engine runs it in `dtype`."""
        return max(self.sdpa_prefill[dtype], self.prefill_native.get(dtype, 0.0))

    def prefill_native_wins(self, dtype: str) -> bool:
        return self.prefill_native.get(dtype, 0.0) > self.sdpa_prefill.get(dtype, float("inf"))

    def matmul_time(self, dtype: str, rows: float, k: int, n: int) -> float:
        """Seconds of (rows, k) @ (k, n): per measured row count a fixed cost per call plus FLOPs at that
        count's rate, interpolated linearly in rows between measured counts (time is about affine there); the
        C kernel's where it wins (`gemv_wins`: the engine runs it there)."""
        if self.gemv_wins(dtype, rows, k, n):
            return interpolated_time(self.gemv[dtype], rows, k, n)
        return interpolated_time(self.matmul.get(dtype) or self.matmul["float32"], rows, k, n)

    def decode_attention(self, dtype: str, group: int, head_dim: int,
                         on_cpu: bool = False) -> tuple[float, float, float]:
        """(s per call, K+V bytes/s, s per row and kv head) of decode attention on the compute device (on_cpu: the
        CPU beside it) for `group` query heads per kv head of `head_dim`: grouped heads cost a CPU more per byte
        (each head's sums are its own work), at the measured head dim nearest this one. The last: a CPU's work per
        (row, kv head) besides its bytes (0 where not measured: a GPU, an older profile)."""
        grouped = (self.cpu_attention_grouped if on_cpu else self.attention_grouped).get(dtype)
        if group > 1 and grouped:
            _, fixed, rate, *pair = min(grouped, key=lambda p: abs(p[0] - head_dim))
        else:
            fixed, rate, *pair = (self.cpu_attention if on_cpu else self.attention)[dtype]
        return fixed, rate, pair[0] if pair else 0.0

    def shared_attention_rate(self, dtype: str, rate: float) -> float:
        """K+V bytes/s at which CPU decode attention goes over a shared prefix's positions, given `rate` over each
        row's own (the same where not measured)."""
        return rate * self.attention_shared.get(dtype, 1.0)

    def gemv_wins(self, dtype: str, rows: float, k: int, n: int) -> bool:
        """Whether the C kernel for a few rows (native.dense_gemv) is faster than torch's matmul for (rows, k) @
        (k, n) in `dtype` by this profile's fits of both; never beyond the row counts it was measured at."""
        dense = self.matmul.get(dtype)
        return bool(dense) and _few_rows_win(self.gemv.get(dtype), dense, rows, k, n)

    def int8_head_time(self, dtype: str, rows: float, k: int, n: int) -> float | None:
        """Seconds of (rows, k) @ W.T for an 8-bit W (n, k) by its C kernel; None where this profile did not
        measure it or beyond the rows it was measured at."""
        points = (self.int8_gemv or {}).get(dtype)
        return interpolated_time(points, rows, k, n) if points and rows <= points[-1][0] else None

    def int8_head_wins(self, dtype: str, rows: float, k: int, n: int) -> bool | None:
        """Whether the 8-bit kernel multiplies (rows, k) by W (n, k) faster than W in `dtype` (matmul_time: the
        dense C kernel or torch's, as the engine runs it); None where the profile did not measure it."""
        if self.int8_gemv is None:
            return None
        seconds = self.int8_head_time(dtype, rows, k, n)
        return seconds is not None and seconds < self.matmul_time(dtype, rows, k, n)

    def multiplies_int4_layout(self, dtype: str) -> bool:
        """Whether this profile measured a kernel multiplying 4-bit weights in int4_matmul's layout in `dtype`: torch's
        or the C kernel for a few rows (AVX2 CPUs have only the latter)."""
        return bool((self.int4_matmul or {}).get(dtype) or (self.int4_gemv or {}).get(dtype)) and not self.is_cuda

    def int4_matmul_time(self, dtype: str, rows: float, k: int, n: int) -> float | None:
        """Seconds of (rows, k) @ W.T for a 4-bit W (n, k) multiplied as stored, interpolated as `matmul_time`:
        by the C kernel where it wins (`int4_gemv_wins`), else by torch's int4 kernel; None where the profile
        has neither for `dtype`."""
        if self.int4_gemv_wins(dtype, rows, k, n):
            return interpolated_time(self.int4_gemv[dtype], rows, k, n)
        points = (self.int4_matmul or {}).get(dtype)
        return interpolated_time(points, rows, k, n) if points else None

    def int4_gemv_wins(self, dtype: str, rows: float, k: int, n: int) -> bool:
        """Whether the C kernel for a few rows of 4-bit weights (native.int4_gemv) beats torch's int4 kernel
        for (rows, k) @ W.T in `dtype` by this profile's fits; never beyond the rows it was measured at."""
        return _few_rows_win(self.int4_gemv.get(dtype), (self.int4_matmul or {}).get(dtype), rows, k, n)

    def int4_tiles_time(self, dtype: str, rows: float, k: int, n: int) -> float | None:
        """Seconds of the same product by tiles (Int4Weight._tiled); None where the profile has none."""
        points = (self.int4_tiles or {}).get(dtype)
        return interpolated_time(points, rows, k, n) if points else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        raw = json.loads(text)
        current = PROFILE_VERSION if not raw.get("is_cuda") else CUDA_PROFILE_SINCE
        if not current <= raw.get("version", 0) <= PROFILE_VERSION:
            raise ValueError(f"profile version {raw.get('version')} is not {PROFILE_VERSION}")
        for name in ("matmul", "int4_matmul", "int4_tiles", "gemv", "int4_gemv", "row_groups_gemv", "int8_gemv",
                     "attention_grouped", "cpu_attention_grouped", "cpu_attention_codes", "attention_codes"):
            if raw.get(name) is not None:
                raw[name] = {k: [tuple(p) for p in v] for k, v in raw[name].items()}
        raw["matmul_shape"] = tuple(raw["matmul_shape"])
        if "host_contention" in raw:
            raw["host_contention"] = tuple(raw["host_contention"])
        for name in ("cache_disk_load", "cache_dequantize", "layer_overhead", "attention", "cpu_attention"):
            raw[name] = {k: tuple(v) for k, v in raw[name].items()}
        return cls(**raw)

    def summary(self) -> str:
        g = 1e9
        lines = [f"device {self.device}, {self.threads} threads, torch {self.torch_version}, "
                 f"measured {self.measured_at} in {self.seconds:.1f} s"]
        for dtype, points in self.matmul.items():
            rates = ", ".join(f"{m}:{r / g:.0f}+{f * 1e6:.0f}us" for m, r, f in points)
            lines.append(f"matmul {dtype} GFLOP/s + fixed per call, by rows: {rates}")
        for label, found in (("int4 weight kernel", self.int4_matmul), ("int4 by tiles", self.int4_tiles),
                             ("int4 few-row kernel", self.int4_gemv), ("dense few-row kernel", self.gemv),
                             ("int4 FlexGen-grouped few-row kernel", self.row_groups_gemv)):
            for dtype, points in (found or {}).items():
                rates = ", ".join(f"{m}:{r / g:.0f}+{f * 1e6:.0f}us" for m, r, f in points)
                lines.append(f"{label} {dtype} GFLOP/s + fixed per call, by rows: {rates}")
        if self.int4_dequantize:
            lines.append("int4 layout dequantize Gelem/s: "
                         + ", ".join(f"{k} {v / g:.2f}" for k, v in self.int4_dequantize.items()))
        lines.append("prefill attention GFLOP/s: "
                     + ", ".join(f"{k} {v / g:.0f}" for k, v in self.sdpa_prefill.items())
                     + "".join(f"; C kernel {k} {v / g:.0f}" for k, v in self.prefill_native.items()))
        lines.append("decode attention (fixed ms + GB/s [+ us per row and kv head]): device " + ", ".join(
            f"{k} {_attention_rate(*p)}" for k, p in self.attention.items()) + "; cpu " + ", ".join(
            f"{k} {_attention_rate(*p)}" for k, p in self.cpu_attention.items())
            + "".join(f"; {where}, grouped heads " + ", ".join(f"{k} (head dim {d}) {_attention_rate(*p)}"
                                                                for k, points in table.items() for d, *p in points)
                      for where, table in (("device", self.attention_grouped), ("cpu", self.cpu_attention_grouped))
                      if table)
            + ("; over a shared prefix on the CPU, times faster: " + ", ".join(
                f"{k} {v:.2f}" for k, v in self.attention_shared.items()) if self.attention_shared else ""))
        lines.append(f"host->device GB/s pinned {self.h2d_pinned / g:.1f} pageable {self.h2d_pageable / g:.1f}; "
                     f"device->host pinned {self.d2h_pinned / g:.1f} pageable {self.d2h_pageable / g:.1f}")
        lines.append(f"copy GB/s: device {self.device_copy / g:.1f}, host {self.host_copy / g:.1f}, "
                     f"cache transpose {self.strided_copy / g:.1f}"
                     + (f"; first writes to fresh host memory {self.host_touch / g:.1f}" if self.host_touch else ""))
        lines.append(f"disk GB/s ({self.offload_dir}, {self.disk_method}): read {self.disk_read / g:.2f}, "
                     f"write {self.disk_write / g:.2f}; page cache read {self.cached_read / g:.1f}, "
                     f"write {self.cached_write / g:.1f}"
                     + (f"; mapped in and out {self.mapped_read / g:.1f}, a page's first write "
                        f"{self.mapped_write * 1e6:.2f} us, per layer mapped {self.mapped_fetch * 1e6:.0f} us "
                        f"({self.mapped_fetch_inline * 1e6:.0f} without overlap), per cache part "
                        f"{self.mapped_part * 1e6:.0f} us ({self.mapped_part_inline * 1e6:.0f})"
                        if self.mapped_read else ""))
        lines.append("4-bit Gelem/s: dequantize " + ", ".join(f"{k} {v / g:.2f}" for k, v in self.dequantize.items())
                     + "; quantize " + ", ".join(f"{k} {v / g:.2f}" for k, v in self.quantize.items()))
        lines.append("KV cache part loads (fixed ms + rate): disk " + ", ".join(
            f"{k} {v[0] * 1e3:.2f} + {v[1] / g:.1f} GB/s" for k, v in self.cache_disk_load.items())
            + "; compressed " + ", ".join(f"{k} {v[0] * 1e3:.2f} + {v[1] / g:.2f} Gelem/s"
                                          for k, v in self.cache_dequantize.items())
            + f"; one-token compressed store {self.cache_store * 1e3:.2f} ms")
        lines.append(f"small op {self.op_overhead * 1e6:.1f} us, I/O thread hand-off {self.handoff * 1e6:.0f} us, "
                     f"beside compute: I/O thread dequantization x{self.contention:.2f}, "
                     f"page-cache reads x{self.contention_read:.2f}")
        if self.is_cuda:
            cpu, link = self.host_contention
            lines.append(f"CPU attention and H2D copies at once: CPU attention at {cpu:.2f} of its rate, copies at "
                         f"{link:.2f}")
        lines.append("engine overhead per layer + per layer and batch (us): " + ", ".join(
            f"{k} {a * 1e6:.0f} + {b * 1e6:.0f}" for k, (a, b) in self.layer_overhead.items()))
        return "\n".join(lines + self.notes)


def _few_rows_win(points, other, rows: float, k: int, n: int) -> bool:
    """Whether a few-row kernel's measured `points` give (rows, k) @ (k, n) faster than `other`'s (None: there
    is no other); never beyond the rows it was measured at."""
    if not points or rows > points[-1][0]:
        return False
    return not other or interpolated_time(points, rows, k, n) < interpolated_time(other, rows, k, n)


def interpolated_time(points: list[tuple[int, float, float]], rows: float, k: int, n: int) -> float:
    """Seconds of (rows, k) @ (k, n) from measured (rows, FLOP/s, fixed s) points, ascending in rows: each
    point's fixed cost plus FLOPs at its rate, linear in rows between points, proportional to rows outside."""
    rows = max(rows, 1.0)

    def at(point) -> float:
        m, rate, fixed = point
        return fixed + 2 * m * k * n / rate

    if rows <= points[0][0]:
        return at(points[0]) * rows / points[0][0] if rows < points[0][0] else at(points[0])
    if rows >= points[-1][0]:
        return at(points[-1]) * rows / points[-1][0]
    i = next(i for i, p in enumerate(points) if rows <= p[0])
    (m0, *_), (m1, *_) = points[i - 1], points[i]
    return at(points[i - 1]) + (rows - m0) / (m1 - m0) * (at(points[i]) - at(points[i - 1]))


def _attention_rate(fixed: float, rate: float, pair: float = 0.0) -> str:
    return f"{fixed * 1e3:.2f} + {rate / 1e9:.1f}" + (f" + {pair * 1e6:.2f}" if pair else "")
