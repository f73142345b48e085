"""What a 4-bit weight stored for the CPU's int4 kernel (int4_matmul) costs a step, for the cost model.

The engine multiplies such a weight as it is stored, by tiles (a cache-sized slice dequantized and multiplied
dense at a time), or dequantizes it whole into its slot in the compute thread and runs dense matmuls, whichever
`int4_way` finds fastest for the block's GPU batches (which share one whole dequantization) from the profile's
rates: the kernel's (`HardwareProfile.int4_matmul`), the tiles' (`int4_tiles`), and dequantizing the layout
(`int4_dequantize`) plus the dense matmuls. The engine (`int4_path`) and the cost model make the
same choice from the same stored profile, never from a timing in the run: identical runs multiply alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..system.hardware import HardwareProfile
from ..system.profile_store import cpu_profile, profile_dependent
from .int4_matmul import GEMV_ROWS, Int4Weight, native_agrees


@dataclass(frozen=True)
class Int4Cost:
    """Seconds of one layer's weight in one step: dequantized once (0 on the kernel's path), and multiplied."""

    dequantize: float
    matmul: float


def int4_ways(hw: HardwareProfile, dtype: str, rows: float, batches: int, k: int, n: int) -> dict[str, Int4Cost]:
    """What a weight (n, k) multiplied by `batches` batches of `rows` rows costs each of int4_path's ways the
    profile has rates for: "dense" (dequantized once, dense matmuls), "kernel" (as stored), "tiles"."""
    dequantize = k * n / (hw.int4_dequantize or {}).get(dtype, hw.dequantize[dtype])
    ways = {"dense": Int4Cost(dequantize, batches * hw.matmul_time(dtype, rows, k, n))}
    for way, per_batch in (("kernel", hw.int4_matmul_time(dtype, rows, k, n)),
                           ("tiles", hw.int4_tiles_time(dtype, rows, k, n))):
        if per_batch is not None:
            ways[way] = Int4Cost(0.0, batches * per_batch)
    return ways


def int4_way(ways: dict[str, Int4Cost]) -> str:
    """The cheapest of `int4_ways` (ties: the first, so the choice is the same every time)."""
    return min(ways, key=lambda way: ways[way].dequantize + ways[way].matmul)


def int4_cost(hw: HardwareProfile, dtype: str, rows: float, batches: int, k: int, n: int) -> Int4Cost:
    """A weight (n, k) multiplied by `batches` batches of `rows` rows the fastest of int4_path's three ways."""
    ways = int4_ways(hw, dtype, rows, batches, k, n)
    return ways[int4_way(ways)]


def int4_path(weight: Int4Weight, rows: int, dtype: torch.dtype, slot: torch.Tensor, uses: int = 1) -> str:
    """The fastest way here to make `uses` products of `rows` rows (the GPU batches of a block, sharing one fetch
    of the weight): "kernel" (multiplied as stored), "tiles" (dequantized a tile at a time into `slot` and
    multiplied dense, in cache; needs the C kernel) or "dense" (dequantized once into `slot`, then dense
    matmuls). Chosen from this machine's stored profile (its int4 rates, as the cost model does), never by
    timing in the run: the ways round differently, and a timing on a busy machine would pick differently from
    run to run. Without a profile that has the rates, a fixed rule."""
    return _choose(dtype, rows, weight.shape, uses)


@profile_dependent
def _choose(dtype: torch.dtype, rows: int, shape: tuple[int, int], uses: int) -> str:
    n, k = shape
    hw, name = cpu_profile(), str(dtype).removeprefix("torch.")
    if hw is not None and hw.multiplies_int4_layout(name):
        ways = int4_ways(hw, name, rows, uses, k, n)
        if not native_agrees():
            ways.pop("tiles", None)
        return int4_way(ways)
    return "kernel" if rows <= GEMV_ROWS else "dense"

