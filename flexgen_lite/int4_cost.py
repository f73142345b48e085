"""What a 4-bit weight stored for the CPU's int4 kernel (int4_matmul) costs a step, for the cost model.

The engine multiplies such a weight as it is stored, or dequantizes it into its slot in the compute thread
and runs dense matmuls, whichever `int4_matmul.use_kernel` timed faster for the block's GPU batches (which
share one dequantization). The cost model makes the same choice from the profile's rates: the kernel's
(`HardwareProfile.int4_matmul`) against dequantizing the layout (`int4_dequantize`) plus the dense matmuls.
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


def int4_cost(hw: HardwareProfile, dtype: str, rows: float, batches: int, k: int, n: int) -> Int4Cost:
    """A weight (n, k) multiplied by `batches` batches of `rows` rows: by the kernel when that is faster than
    dequantizing once and dense matmuls (use_kernel's choice), else dequantized once and dense."""
    kernel = hw.int4_matmul_time(dtype, rows, k, n)
    dequantize = k * n / (hw.int4_dequantize or {}).get(dtype, hw.dequantize[dtype])
    dense = hw.matmul_time(dtype, rows, k, n)
    if kernel is not None and batches * kernel <= dequantize + batches * dense:
        return Int4Cost(0.0, batches * kernel)
    return Int4Cost(dequantize, batches * dense)
