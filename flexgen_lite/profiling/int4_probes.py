"""Timing 4-bit weights multiplied as they are stored (probes.py's helpers): on a CPU by torch's int4 kernel, the
C kernel for a few rows and by tiles, and the rate of dequantizing the layout; on a GPU by the Triton kernel
(int4_gemv_triton). For the profile's `int4_*` tables (hardware.py), which int4_cost and the cost model read."""

from __future__ import annotations

import math
import time

import torch

from ..engine.policy import DTYPES
from ..kernels import native
from ..kernels.int4_matmul import Int4Weight, native_agrees
from ..kernels.int4_matmul import available as int4_available
from ..system.devices import ComputeDevice
from .probes import MiB, compute_dtypes, fit, timed

INT4_ROWS = (1, 2, 4, 16, 64)  # decode batches: beyond them a dense matmul after dequantizing wins (int4_path)
CODES_ROWS = (1, 2, 4, 8, 16, 64)  # the C kernel multiplying the codes (bf16 pairs: near dense speed up to 64 rows)
INT4_ROTATION = 40 * MiB  # large weights rotated over up to 16 rows, so that none comes from the 32 MiB L3


def int4_rates(device: ComputeDevice, scale: int) -> dict:
    """4-bit weights multiplied as stored, on a CPU (none with CUDA, or where neither the C kernels nor torch's int4
    kernel multiply the layout), per dtype it runs in: by torch's kernel (`int4_matmul`; none where it does not
    read the layout, as on AVX2 CPUs), by the C kernel for a few rows (`int4_gemv`,
    native.int4_gemv) and by tiles (`int4_tiles`). In float32 and bfloat16, as `matmul_rates`: a rate and a fixed
    cost per row count fitted to a large and a small weight. In float16 (slow on most CPUs, which auto never
    computes in) torch's kernel on the small weight alone, while a call takes under 2 ms. The fastest of a few
    calls: on a busy machine a call waits for a core now and then. And the rate of dequantizing the layout for a
    dense matmul (large batches). ~1 s on this VM."""
    if device.is_cuda or not (int4_available() or native_agrees()):
        return {"int4_matmul": {}, "int4_dequantize": {}, "int4_tiles": {},
                "int4_gemv": gpu_codes_points(device, scale) if device.is_cuda else {}}
    large, small = [(k // scale, n // scale) for k, n in ((2048, 4096), (1024, 1024))]  # (K, N), multiples of 64
    found = {"float32": [], "bfloat16": []}
    if int4_available():
        found = {name: _int4_points(getattr(torch, name), small, large) for name in ("float32", "bfloat16")}
        found["float16"] = _int4_points(torch.float16, small)
    weight = _int4_weights(*large, 1)[0]
    rates = {}
    for name, points in found.items():
        if points or not int4_available():
            out = torch.empty(large, dtype=getattr(torch, name))
            rates[name] = out.numel() / timed(lambda out=out: weight.dequantize_t(out), lambda: None)
    # the C kernels in the dtypes auto computes in on a CPU (float32 where bfloat16 is slow)
    ways = {way: {name: _int4_points(getattr(torch, name), small, large, way) for name in ("float32", "bfloat16")}
            for way in ("tiles", "codes")} if native_agrees() else {"tiles": {}, "codes": {}}
    tiles, codes = ways["tiles"], ways["codes"]
    row_groups = {name: row_groups_points(getattr(torch, name), small, large) for name in ("float32", "bfloat16")}
    return {"int4_matmul": {name: points for name, points in found.items() if points}, "int4_dequantize": rates,
            "int4_tiles": {name: points for name, points in tiles.items() if points},
            "int4_gemv": {name: points for name, points in codes.items() if points},
            "row_groups_gemv": {name: points for name, points in row_groups.items() if points}}


ROW_GROUPS_ROWS = (1, 4, 16)  # decode steps' rows, up to native.ROW_GROUP_ROWS


def row_groups_points(dtype: torch.dtype, small: tuple[int, int], large: tuple[int, int]) -> list:
    """(rows, FLOP/s, fixed s) of 4-bit weights (N, K) in FlexGen's grouping multiplied as stored by the C kernel
    (native.row_groups_product) in `dtype`, fitted to weights (K, N) `small` and `large` (the large rotated past the
    L3, as `_int4_points`); [] where the kernel is not built here."""
    def weights(k: int, n: int, copies: int) -> list:
        stats = torch.full((2, n // 64, k), 0.01, dtype=torch.float16)
        return [native.row_groups_product(torch.full((n * k // 2,), 0x93, dtype=torch.uint8), stats[0], stats[1], 64)
                for _ in range(copies)]

    small_w, large_w = weights(*small, 1), weights(*large, min(16, max(1, INT4_ROTATION // (large[0] * large[1] // 2))))
    if small_w[0] is None:
        return []
    points = []
    for m in ROW_GROUPS_ROWS:
        t_small, t_large = (_seconds(w, torch.randn(m, shape[0]).to(dtype)) for w, shape in
                            ((small_w, small), (large_w, large)))
        points.append((m, *fit(2 * m * small[0] * small[1], t_small, 2 * m * large[0] * large[1], t_large)))
    return points


def _seconds(products: list, x: torch.Tensor, runs: int = 3) -> float:
    """Seconds of one call of `products` (rotated over) on x: the fastest of `runs` after a warm-up."""
    best = float("inf")
    for i in range(runs + 1):
        tic = time.perf_counter()
        for product in products:
            product(x)
        best = best if i == 0 else min(best, time.perf_counter() - tic)
    return best / len(products)


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
            rotated = large_w if m <= 16 else large_w[:1]  # 64: compute bound
            if t_small * large[0] * large[1] / (small[0] * small[1]) * len(rotated) > 0.25:
                break  # a slow way: a call over the rotated weights would take over 0.25 s (tiles where torch's
                # bf16 matmul is emulated, as on AVX2 CPUs: 26 s of the profile measured whole)
            t_large = _int4_seconds(rotated, m, large[0], dtype, way)
        except (RuntimeError, NotImplementedError):
            return []
        points.append((m, *fit(flops, t_small, 2 * m * large[0] * large[1], t_large)))
    return points


def _int4_seconds(weights: list[Int4Weight], rows: int, k: int, dtype: torch.dtype, way: str, runs: int = 3) -> float:
    """Seconds of one product of `rows` rows `way` (`_int4_points`), rotating over `weights`: the fastest of `runs`
    after a warm-up."""
    multiply = {"torch": Int4Weight.torch_kernel, "tiles": Int4Weight.matmul, "codes": _codes_gemv}[way]
    return _seconds([lambda x, w=w: multiply(w, x) for w in weights], torch.randn(rows, k).to(dtype), runs)


def _codes_gemv(weight: Int4Weight, x: torch.Tensor) -> torch.Tensor:
    out = weight.codes_gemv(x)
    if out is None:
        raise RuntimeError("the C kernel for 4-bit weights is not built here")
    return out
