"""What a 4-bit weight stored for the CPU's int4 kernel (int4_matmul) costs a step, for the cost model.

The engine multiplies such a weight as it is stored, by tiles (a cache-sized slice dequantized and multiplied
dense at a time), or dequantizes it whole into its slot in the compute thread and runs dense matmuls, whichever
`int4_way` finds fastest for the block's GPU batches (which share one whole dequantization) from the profile's
rates: the kernel's (`HardwareProfile.int4_matmul`), the tiles' (`int4_tiles`), and dequantizing the layout
(`int4_dequantize`) plus the dense matmuls. The engine (`int4_matmul.int4_path`) and the cost model make the
same choice from the same stored profile, never from a timing in the run: identical runs multiply alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import HardwareProfile
from .int4_matmul import layout_fits
from .layout import Setup
from .weights import DECODER_KINDS


@dataclass(frozen=True)
class Int4Cost:
    """Seconds of one layer's weight in one step: dequantized once (0 on the kernel's path), and multiplied."""

    dequantize: float
    matmul: float


def kernel_weight(s: Setup, kind: str, shape: tuple[int, ...]) -> bool:
    """Whether the engine stores a weight of `shape` in a layer of `kind` for the kernel (place_tensor's
    rule: a compressed decoder matrix the layout fits, a bf16/fp16 compute dtype, a CPU), and the profile has
    the kernel's rates in that dtype."""
    return (not s.cuda and kind in DECODER_KINDS and s.dname != "float32" and layout_fits(shape, s.wcomp)
            and s.hw is not None and bool((s.hw.int4_matmul or {}).get(s.dname)))


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
