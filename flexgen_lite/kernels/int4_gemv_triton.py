"""A few rows times a 4-bit weight in GPU memory, reading its codes as stored, in Triton.

With `--compress-weight` and the weights in GPU memory, every decode step dequantized each matrix into a dense
slot (a read of 4 bits and a write of 16 a value) and multiplied the slot (a read of 16): ~4.6 bytes of memory
traffic a weight where the codes are ~0.56. Here each program reads a block of the weight's output rows and a
range of its input columns as codes (each row's bytes contiguous, nibbles interleaved: element 2j is byte j's low one),
scales them per group of the input dimension in fp32, rounds them to x's dtype as the slot held them, and
multiplies them into the rows of x on tensor cores; the ranges of columns are summed after. Prefill-sized
products (more than GEMV_ROWS rows) keep the slot: they are bound by compute, not by the weight's bytes.

The weight is a QuantizedTensor of a matrix (N, K), groups along K (Policy.weight_group_dim 1, the default).
CodesMatrix serves a CPU too: matrices grouped along N (FlexGen's grouping, which a CPU cannot keep in its int4
layout) multiplied as stored by the C kernel (native.int4_gemv_row_groups), chosen against the slot by measurement.
`refusal` checks the kernel once per (device, dtype, group) against dequantize-then-matmul; TRITON_INTERPRET=1
runs it on a CPU (tests); FLEXGEN_LITE_TRITON=0 turns it off."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from .compression import dequantize
from .decode_attention_triton import _interpreter, _sm_count  # one interpreter lock for every kernel
from .dequant_triton import interpreting, unavailable
from .quantization import CompressionConfig, QuantizedTensor, dequantize_reference

GEMV_ROWS = 64  # at most this many rows go through the kernel (padded to 16, tl.dot's least)
WARPS = 8  # on sm90 76-116 registers a thread at these blocks, no spills (tests/test_triton_sm90.py)
BLOCK_N, BLOCK_K = 64, 128  # a program's output rows; columns a tile (at least a group)
ENV = "FLEXGEN_LITE_CODES_MATMUL"  # "triton": also where a CPU computes (Triton's interpreter; tests)
_lock = threading.Lock()


@functools.cache
def _kernel(interpret: bool):
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])
    def gemv_kernel(x, codes, scale, minimum, out, rows, n_out, k_in, split_len, sx_m, sc_n, ss_n, so_s, so_m,
                    MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
                    PRECISION: tl.constexpr):
        n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        split = tl.program_id(1)
        m, c, g = tl.arange(0, MP), tl.arange(0, BK // 2), tl.arange(0, BK // GS)
        n_ok, m_ok = (n < n_out)[:, None], (m < rows)[:, None]
        acc = tl.zeros([MP, BN], tl.float32)
        begin = split * split_len
        for k0 in range(begin, begin + split_len, BK):
            k = k0 + tl.arange(0, BK)
            # masked by whole groups (stored whole: a group begun is there to read), so that a group's bytes
            # load together, pipelined (16 at a time, ahead into shared memory); masked byte by byte, each was a
            # load of its own. fp32 keeps byte loads: staged its way it spills on sm90 (tests/test_triton_sm90.py)
            if x.dtype.element_ty == tl.float32:
                k_ok = k0 + 2 * c < k_in
            else:
                k_ok = k0 + c // (GS // 2) * GS < k_in
            byte = tl.load(codes + n[:, None] * sc_n + (k0 // 2 + c)[None, :], mask=n_ok & k_ok[None, :], other=0)
            w = tl.interleave(byte & 15, byte >> 4).to(tl.float32)
            at = n[:, None] * ss_n + (k0 // GS + g)[None, :]
            g_ok = n_ok & (k0 + g * GS < k_in)[None, :]
            s = tl.load(scale + at, mask=g_ok, other=0.0).to(tl.float32)
            lo = tl.load(minimum + at, mask=g_ok, other=0.0).to(tl.float32)
            w = tl.reshape(tl.reshape(w, [BN, BK // GS, GS]) * s[:, :, None] + lo[:, :, None], [BN, BK])
            xv = tl.load(x + m[:, None] * sx_m + k[None, :], mask=m_ok & (k < k_in)[None, :], other=0.0)
            w = w.to(x.dtype.element_ty)  # as the dequantized slot held it
            if x.dtype.element_ty == tl.bfloat16:  # multiplied as tf32, which holds bf16 values exactly
                xv, w = xv.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(xv, tl.trans(w), input_precision=PRECISION)
        tl.store(out + split * so_s + m[:, None] * so_m + n[None, :], acc, mask=m_ok & (n < n_out)[None, :])

    return gemv_kernel


@dataclass
class CodesMatrix:
    """A 4-bit matrix in compute memory for a decode step's few rows (WeightSlots.complete): multiplied as stored
    by the kernel, or dequantized into its slot and multiplied dense, whichever ran faster for this kind of product
    on this GPU or CPU (attention.faster, measured once per kind); the slot path where the kernel is not used.

    The two are timed as a step runs them: the step's `uses` products (one per GPU batch) by the kernel, against
    one dequantization into the slot and `uses` dense products (WeightSlots fills a slot once a step, and every
    batch reads it). Timing a dequantization per product (sessions 27-28) charged the slot `uses` times over."""

    q: QuantizedTensor
    slot: torch.Tensor | None  # the weight's slot (its dtype the compute dtype); None: the kernel alone (a CUDA
    # graph's step, decode_graph.py, which has no slot to fill and chose the kernel before capturing)
    uses: int = 1  # the step's products by this matrix
    prepared: Callable | None = None  # a CPU's product of FlexGen's grouping, checked once a weight (row_groups_of)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot is None:
            return matmul(x, self.q)
        product = codes_product(self.q, x, self.prepared)
        if product is None:
            return self.dense(x)
        if not by_measurement(x):  # asked for (tests; a CPU: the interpreter)
            return product(x)
        from .attention import faster

        kind = choice_kind(self.q.shape, x.numel() // x.shape[-1], x.dtype, self.q.config.group_size, self.uses)
        chosen = faster(kind, {"codes": lambda: [product(x) for _ in range(self.uses)],
                               "slot": lambda: self._slot_step(x)}, x.device)
        return product(x) if chosen == "codes" else self.dense(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.q, self.slot.dtype, out=self.slot))

    def _slot_step(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A step's products through the slot: filled once, read by each of its `uses` products."""
        weight = dequantize(self.q, self.slot.dtype, out=self.slot)
        return [F.linear(x, weight) for _ in range(self.uses)]


def codes_product(q: QuantizedTensor, x: torch.Tensor, prepared: Callable | None = None):
    """The product x @ W.T reading q's codes as stored here, or None: Triton's kernel (`wanted`), or on a CPU the
    C kernel for matrices grouped along their output dimension (FlexGen's grouping: `prepared`, else
    row_groups_of)."""
    if wanted(q, x):
        return lambda x: matmul(x, q)
    if x.device.type == "cpu" and x.numel() // max(1, x.shape[-1]) <= native.ROW_GROUP_ROWS \
            and x.dtype in native.OUT_KIND:
        prepared = prepared or row_groups_of(q)
        if prepared is not None:
            return lambda x: row_groups_matmul(x, q, prepared)
    return None


def row_groups_fit(q: QuantizedTensor) -> bool:
    """A CPU's 4-bit matrix (N, K) in groups along N that native.int4_gemv_row_groups reads: whole groups, K even,
    the C kernels built here (and not FLEXGEN_LITE_CODES_MATMUL=triton: Triton's kernel alone, tests)."""
    n, k = q.shape if len(q.shape) == 2 else (0, 1)
    return (q.data.device.type == "cpu" and os.environ.get(ENV) != "triton" and q.config.bits == 4
            and q.config.group_dim in (0, -2) and n > 0 and n % q.config.group_size == 0 and k % 2 == 0
            and q.scale.dtype == torch.float16 and all(t.is_contiguous() for t in (q.data, q.scale, q.minimum))
            and native.library() is not None)


def row_groups_of(q: QuantizedTensor) -> Callable | None:
    """native.row_groups_product of q where it fits (`row_groups_fit`), else None."""
    if not row_groups_fit(q):
        return None
    stats = (q.shape[0] // q.config.group_size, q.shape[1])
    return native.row_groups_product(q.data, q.scale.view(stats), q.minimum.view(stats), q.config.group_size)


def row_groups_matmul(x: torch.Tensor, q: QuantizedTensor, prepared: Callable) -> torch.Tensor:
    """x (..., K) @ W.T by the C kernel (`prepared`: row_groups_of(q)), in x's dtype."""
    n, k = q.shape
    out = prepared(x.reshape(-1, k).contiguous())
    if out is None:  # a row count or dtype the kernel refuses: the dequantized product
        return F.linear(x, dequantize(q, x.dtype))
    return out.view(*x.shape[:-1], n)


def choice_kind(shape: tuple[int, ...], rows: int, dtype: torch.dtype, group_size: int, uses: int = 1) -> tuple:
    """The kind of product CodesMatrix measures its two paths for once: rows by powers of two (rows that finish
    do not measure again), and the products a step makes by the matrix."""
    return ("int4-gemv", *shape, 1 << (max(1, rows) - 1).bit_length(), dtype, group_size, uses)


def slot_chosen(shape: tuple[int, ...], rows: int, dtype: torch.dtype, group_size: int, uses: int = 1) -> bool:
    """Whether this kind of product measured faster through its slot here: its weight is then dequantized into
    the slot beside compute again, as without the kernel (WeightSlots)."""
    from .attention import _measured

    return _measured.get(choice_kind(shape, rows, dtype, group_size, uses)) == "slot"


def by_measurement(x: torch.Tensor) -> bool:
    """Whether CodesMatrix chooses between the kernel and the slot by measuring them (a GPU, a CPU's C kernel; not
    when asked for the Triton kernel alone)."""
    return x.device.type in ("cuda", "cpu") and os.environ.get(ENV) != "triton"


def enabled_on(device) -> bool:
    """Whether weights in `device`'s memory may be kept as codes for decode steps: a GPU's where Triton is (each
    product then checked and measured), any with FLEXGEN_LITE_CODES_MATMUL=triton (tests); FLEXGEN_LITE_TRITON=0
    turns it off."""
    if os.environ.get(ENV) == "triton":
        return True
    return torch.device(device).type == "cuda" and unavailable(_kernel) is None


def supported(q: QuantizedTensor, dtype: torch.dtype) -> bool:
    """A matrix the kernel reads (`layout_fits`)."""
    return len(q.shape) == 2 and layout_fits(q.config, dtype)


def layout_fits(config: CompressionConfig, dtype: torch.dtype) -> bool:
    """Matrices compressed by `config` the kernel reads: 4 bits, groups of a power of two (16 to BLOCK_K) along
    the input dimension, multiplied in a dtype tl.dot takes."""
    gs = config.group_size
    return (config.bits == 4 and config.group_dim in (1, -1) and 16 <= gs <= BLOCK_K and gs & (gs - 1) == 0
            and dtype in (torch.float16, torch.bfloat16, torch.float32))


def planned() -> bool:
    """Whether a plan for a GPU counts on decode steps keeping its 4-bit matrices as codes (enabled_on): made on a
    GPU machine where Triton is, or anywhere with FLEXGEN_LITE_CODES_MATMUL=triton. A plan made elsewhere prices
    their dequantization beside compute, as an engine without Triton runs it."""
    return os.environ.get(ENV) == "triton" or (torch.cuda.is_available() and unavailable(_kernel) is None)


def wanted(q: QuantizedTensor, x: torch.Tensor) -> bool:
    """Whether x's rows go through the kernel: a GPU's weight (or a CPU's with FLEXGEN_LITE_CODES_MATMUL=triton),
    at most GEMV_ROWS rows, a layout it reads, and its check passed here for this kind."""
    rows = x.numel() // max(1, x.shape[-1])
    if not (q.data.device == x.device and 0 < rows <= max(GEMV_ROWS, 64) and supported(q, x.dtype)):
        return False
    if x.device.type != "cuda" and os.environ.get(ENV) != "triton":
        return False
    why = refusal(x.device, x.dtype, q.config.group_size)
    if why is not None and x.device.type == "cuda":
        _say_once(why)
    return why is None


@functools.cache
def _say_once(why: str) -> None:
    warnings.warn(f"the Triton 4-bit matmul is not used here ({why}): dequantizing into slots instead", stacklevel=3)


def matmul(x: torch.Tensor, q: QuantizedTensor, splits: int | None = None) -> torch.Tensor:
    """x (..., K) @ W.T for W the 4-bit matrix `q` (N, K), in x's dtype (fp32 sums)."""
    n, k = q.shape
    x2 = x.reshape(-1, k).contiguous()
    rows, gs = x2.shape[0], q.config.group_size
    kp = -(-k // gs) * gs  # the padded row: codes and statistics are stored for whole groups
    codes, scale, minimum = q.data.view(n, kp // 2), q.scale.view(n, kp // gs), q.minimum.view(n, kp // gs)
    programs = -(-n // BLOCK_N)
    tiles = -(-k // BLOCK_K)
    splits = splits or max(1, min(tiles, -(-4 * _sm_count(x.device) // programs)))
    split_len = -(-tiles // splits) * BLOCK_K
    splits = -(-k // split_len)
    out = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    mp = max(16, 1 << (rows - 1).bit_length())
    with torch.cuda.device(x.device) if x.device.type == "cuda" else _interpreter if interpreting() else \
            contextlib.nullcontext():
        _kernel(interpreting())[(programs, splits)](
            x2, codes, scale, minimum, out, rows, n, k, split_len, x2.stride(0), codes.stride(0), scale.stride(0),
            out.stride(0), out.stride(1), MP=mp, BN=BLOCK_N, BK=BLOCK_K, GS=gs,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=WARPS)
    return out.sum(0).to(x.dtype).view(*x.shape[:-1], n)


def refusal(device, dtype: torch.dtype, group_size: int) -> str | None:
    """Why the kernel is not used for this kind here (None: it is)."""
    with _lock:
        return _refusal(torch.device(device), dtype, group_size)


@functools.cache
def _refusal(device: torch.device, dtype: torch.dtype, group_size: int) -> str | None:
    why = unavailable(_kernel)
    if why is not None:
        return why
    from .quantization import quantize

    g = torch.Generator().manual_seed(group_size)
    w = torch.randn(200, 3 * BLOCK_K + group_size, generator=g)  # a ragged last block of rows, columns past tiles
    q = quantize(w, CompressionConfig(4, group_size, 1))
    x = torch.randn(5, w.shape[1], generator=g).to(dtype)
    want = x.float() @ dequantize_reference(q, dtype, None).float().T
    try:
        got = matmul(x.to(device), q.to(device), splits=2).float().cpu()
    except Exception as e:  # a kernel that fails to compile or launch here
        return f"self-check failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    error = float((got - want).abs().max() / want.abs().max())
    if not error <= (1e-5 if dtype == torch.float32 else 1e-2):
        return f"self-check mismatch ({dtype}, groups of {group_size}: {error:.3g} of the largest output)"
    return None


def reset() -> None:
    """Forget the checks (tests)."""
    _refusal.cache_clear()
