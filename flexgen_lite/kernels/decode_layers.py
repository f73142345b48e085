"""The structs native/decode_layer.c reads (a decode step's decoder layers in one C call), and its SiLU made
torch's: the one op of a layer whose bits depend on a function the C code does not own (exp)."""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import torch.nn.functional as F

from . import native

i64, ptr = ctypes.c_int64, ctypes.c_void_p
MATRIX_NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # decode_layer.c's order
TORCH_GRAIN = 32768  # ATen's elementwise grain: a tensor this long is split over threads, each part its own loop
SLEEF = {"AVX512": ("Sleef_expf16_u10", 16, 32), "AVX2": ("Sleef_expf8_u10", 8, 16)}  # capability: exp, lanes,
# values per iteration of ATen's vector loop (two fp32 vectors)


class Matrix(ctypes.Structure):
    _fields_ = [("w", ptr), ("bias", ptr), ("scale", ptr), ("minimum", ptr), ("n", i64), ("k", i64), ("group", i64)]


class Layer(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("norm_width", ctypes.c_int), ("exp_lanes", ctypes.c_int),
                ("rows", i64), ("hidden", i64), ("heads", i64), ("kv_heads", i64), ("dim", i64), ("ffn", i64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("attn_norm", ptr), ("mlp_norm", ptr),
                ("q_norm", ptr), ("k_norm", ptr),
                ("m", Matrix * len(MATRIX_NAMES)), ("k_cache", ptr), ("v_cache", ptr), ("k_strides", i64 * 3),
                ("v_strides", i64 * 3), ("block", i64), ("exp_fn", ptr), ("exp_step", i64), ("work", ptr)]


class Step(ctypes.Structure):
    _fields_ = [("h", ptr), ("cos", ptr), ("sin", ptr), ("mask", ptr), ("mask_stride", i64), ("start", i64),
                ("source", ptr), ("shift", ptr), ("shared", i64), ("threads", i64), ("silu_chunk", i64),
                ("rows", i64), ("row_map", ptr)]


def matrix(weight, bias: torch.Tensor | None) -> Matrix:
    """A dense weight (n, k) or an Int4Weight (int4_matmul), and its bias or None."""
    b = 0 if bias is None else bias.data_ptr()
    if isinstance(weight, torch.Tensor):
        return Matrix(weight.data_ptr(), b, 0, 0, *weight.shape, 0)
    n, k = weight.shape
    return Matrix(weight.packed.data_ptr(), b, weight.scale.data_ptr(), weight.minimum.data_ptr(), n, k,
                  weight.group_size)


@functools.cache
def torch_exp() -> tuple[int, int, int]:
    """(address of torch's vector exp, its lanes, values per vector iteration) for fp32 SiLU as torch's kernel
    computes it here: (0, 0, 0) where torch's loops take libm's expf (no vector capability)."""
    name, lanes, step = SLEEF.get(torch.backends.cpu.get_cpu_capability(), (None, 0, 0))
    lib = native.library()
    if name is None or lib is None or lib.decode_layer_exp_lanes() < lanes:
        return 0, 0, 0
    try:
        torch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(getattr(torch_cpu, name), ctypes.c_void_p).value or 0, lanes, step
    except (OSError, AttributeError):
        return 0, 0, 0


def silu_chunk(values: int, threads: int) -> int:
    """Values per thread of torch's elementwise loop over `values` (at::parallel_for's split)."""
    if values < TORCH_GRAIN or threads <= 1:
        return max(values, 1)
    tasks = min(threads, -(-values // TORCH_GRAIN))
    return -(-values // tasks)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    """gate = silu(gate) * up in place by decode_layer.c's loop (tests; the self-check below)."""
    fn, lanes, step = torch_exp()
    n = gate.numel()
    threads = torch.get_num_threads()
    native.library().decode_silu_mul(gate.data_ptr(), up.data_ptr(), native.OUT_KIND[gate.dtype], n, fn, lanes,
                                     step or 1, silu_chunk(n, threads), threads)


@functools.cache
def silu_exact(dtype: torch.dtype) -> bool:
    """Whether decode_layer.c's SiLU * up gives torch's bits in `dtype` here (checked once per process on
    random values, split over threads as torch splits them or not)."""
    if native.library() is None or dtype not in native.OUT_KIND:
        return False
    if dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() in SLEEF and not torch_exp()[0]:
        return False  # torch's vector exp not found: fp32 values would differ
    g = torch.Generator().manual_seed(11)
    for n in (1536, 1536 * 3 + 7, 4 * 11008, 70001):
        gate, up = 4 * torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
        expected = F.silu(gate.clone(), inplace=True).mul_(up)
        silu_mul(gate, up)
        if not torch.equal(gate, expected):
            return False
    return True
