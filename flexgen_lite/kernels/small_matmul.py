"""Dense products of a few rows on a CPU (decode steps of small batches): native.dense_gemv reads each weight
once at the memory's speed, where torch's matmul reads a cold weight at about half of it (its blocking is for
many rows). Where the kernel wins (rows, shape, dtype) is read from the profile, which measures both; without one,
both are timed on the shape once (per power of two of rows) and the verdict kept beside where the profile would be."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..system.profile_store import cpu_profile, profile_dependent
from . import native


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           sums_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by native.dense_gemv where it is faster for this product here (its fp32 sums
    handed out in `sums_dtype` where given; torch's product is in x's dtype)."""
    return linears(x, [(weight, bias)], sums_dtype)[0]


def linears(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
            sums_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """F.linear(x, w, b) for each (w, b) of `weights` (dense; sharing x: q, k and v), in one call to the kernel
    where it is faster for every one of them here, else by torch."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if x.device.type == "cpu" and rows and all(w.dim() == 2 and gemv_wins(x.dtype, rows, *w.shape) for w, _ in weights):
        outs = native.dense_gemv_many(x.reshape(rows, k).contiguous(), weights, sums_dtype)
        if outs is not None:
            return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs]
    return [F.linear(x, w, b) for w, b in weights]


@profile_dependent
def gemv_wins(dtype: torch.dtype, rows: int, n: int, k: int) -> bool:
    """Whether the C kernel multiplies `rows` rows by a weight (n, k) in `dtype` faster than torch here, as this
    machine's stored profile measured both (the cost model reads the same); without a profile, at one row (a
    read of the weight, which the kernel makes at the memory's speed), and up to UNPROFILED_ROWS rows as both
    were timed on random data of the shape (helper-31: at 4 rows the kernel took 96 us, torch 142 on an AMX Xeon,
    where the eager path's torch products left batch 4 at 0.81x llama.cpp; at 16 rows torch won there)."""
    hw = cpu_profile()
    if hw is not None:
        return hw.gemv_wins(str(dtype).removeprefix("torch."), rows, k, n)
    if rows == 1 or rows > UNPROFILED_ROWS:
        return rows == 1
    bucket = 1 << (rows - 1).bit_length()
    n_timed = min(n, max(256, TIMED_BYTES // (k * dtype.itemsize)))  # a big weight's first rows stand for it

    def operands() -> tuple[torch.Tensor, torch.Tensor]:  # rows, weight
        return torch.randn(bucket, k).to(dtype), torch.randn(n_timed, k).to(dtype)

    return _verdict(f"{str(dtype).removeprefix('torch.')} {bucket} {n}x{k}", operands)


UNPROFILED_ROWS = 64  # past this many rows torch's blocking is the product's way without a profile
TIMED_BYTES = 32 << 20  # a weight timed without a profile: at most this much of it


# the head at a decode step: one product over a weight of vocab x hidden, whose shape the profile's two do not
# stand for (at SmolLM2's 49,152 x 576 and 32 rows the C kernel took 5.7 ms, torch 7.9; at 2048 x 4096 they
# are even): above TIMED_ROWS both are timed on it once per power of two of rows and the faster kept, for good,
# beside the machine's profile (the two round differently: a seeded sample must not depend on a race)
TIMED_ROWS = 16
_timed: dict[str, bool] = {}


def head_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (rows, K) @ weight.T for a model's head on a CPU: fp32 logits where the C kernel computes them (its
    sums as they are), else torch's product in x's dtype."""
    rows, (n, k) = x.shape[0], weight.shape
    if x.device.type != "cpu" or rows <= TIMED_ROWS:
        return linear(x, weight, sums_dtype=torch.float32)
    key = f"{str(x.dtype).removeprefix('torch.')} {1 << (rows - 1).bit_length()} {n}x{k}"
    if _verdict(key, lambda: (x.contiguous(), weight)):
        out = native.dense_gemv(x.contiguous(), weight, out_dtype=torch.float32)
        if out is not None:
            return out
    return F.linear(x, weight)


def _verdict(key: str, operands) -> bool:
    """Whether the C kernel won the product `key` ("dtype rows NxK") here: as stored, else timed now on
    `operands()` (x, weight) and stored for good (the two round differently: a seeded sample must not depend on a
    race run again)."""
    if not _timed:
        _timed.update(_stored())
    if key not in _timed:
        _timed[key] = _kernel_faster(*operands())
        _store(_timed)
    return _timed[key]


def _kernel_faster(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether native.dense_gemv multiplied x by this weight faster than torch here: the better of two calls
    each, taken in turn, each after a read of more bytes than a CPU's caches hold (a step reads the head after
    its layers' weights: cold; warm, torch's blocking looked as fast at 64 rows, and was 1.6x the kernel's)."""
    import time

    if native.dense_gemv(x, weight, out_dtype=torch.float32) is None:
        return False
    flush = torch.ones(FLUSH_BYTES // 4)
    products = {"kernel": lambda: native.dense_gemv(x, weight, out_dtype=torch.float32),
                "torch": lambda: F.linear(x, weight)}
    best = dict.fromkeys(products, float("inf"))
    for _ in range(2):
        for name, product in products.items():
            flush.sum()
            tic = time.perf_counter()
            product()
            best[name] = min(best[name], time.perf_counter() - tic)
    return best["kernel"] < best["torch"]


FLUSH_BYTES = 48 << 20  # read before each timed call: past most CPUs' last-level cache, within the plan's reserve


def _verdicts_path():
    from ..system.devices import ComputeDevice
    from ..system.profile_store import profile_path

    return profile_path(ComputeDevice("cpu")).with_suffix(".heads.json")


def _stored() -> dict[str, bool]:
    import json

    try:
        found = json.loads(_verdicts_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, bool)} if isinstance(found, dict) else {}


def _store(verdicts: dict[str, bool]) -> None:
    import json
    import os

    path = _verdicts_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_stored(), **verdicts}, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: timed again by the next process
