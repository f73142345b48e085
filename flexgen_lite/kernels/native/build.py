"""Building the C kernels for this machine and loading them: the compiler, the flags, the cache of built
libraries (keyed by a hash of the sources, the flags, the compiler and the CPU's flags; one process builds, others
wait), the argument types of every kernel, and which OpenMP runtime a loaded library's calls bind to."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ...system import paths

SOURCES = [Path(__file__).with_name(name) for name in (
    "int4.c", "int4_quantize.c", "int4_gemv.c", "int4_row_groups.c", "int8.c", "gemv.c", "attention.c",
    "attention_groups.c", "attention_blocks.c", "attention_q4.c", "attention_q4_tiles.c", "prefill.c", "elementwise.c",
    "decode_layer.c")]
# included by the sources: part of what names a build
HEADERS = [Path(__file__).with_name(name) for name in ("kinds.h", "simd.h", "attention_rows.h", "attention_q4_rows.h")]
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]  # no FMA: bit-identical to torch
OPENMP = ["-fopenmp"]  # gemv.c's teams; a compiler without it builds them serial


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def compile_into(cc: str, out: Path) -> bool:
    """Compile SOURCES into `out` (with OpenMP where the compiler has it)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    for extra in (OPENMP, []):
        result = subprocess.run([cc, *FLAGS, *extra, *map(str, SOURCES), "-o", str(tmp), "-lm"], capture_output=True,
                                text=True)
        if result.returncode == 0:
            os.replace(tmp, out)  # atomic: no process finds it half written
            return True
    tmp.unlink(missing_ok=True)
    return False


def built() -> ctypes.CDLL | None:
    """The kernels built for this machine (cached by a hash of what makes them) and loaded, their argument types
    not yet declared; or None (no compiler, disabled, unsupported machine, or a failed build)."""
    if os.environ.get("FLEXGEN_LITE_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    cc = compiler()
    if cc is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    sources = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*sources, *FLAGS, *OPENMP, version, cpu_flags()]).encode()).hexdigest()[:16]
    cache = paths.cache_dir() / "native"
    path = cache / f"kernels-{key}.so"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f".kernels-{key}.lock", "w") as lock:  # one process builds, the others wait for it:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second build replacing the file would unmap it from the first
            if not path.exists() and not compile_into(cc, path):
                return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        try:  # a read-only cache: build into a temporary directory for this process
            tmp = Path(tempfile.mkdtemp(prefix="flexgen_lite_native_")) / path.name
            if not compile_into(cc, tmp):
                return None
            lib = ctypes.CDLL(str(tmp))
        except OSError:
            return None
    return lib


def declared(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the kernels' argument types set (also for other builds of the same sources: tests)."""
    fn = lib.int4_dequantize_t
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 2
    fn = lib.int4_quantize_pack
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    fn = lib.int4_quantize_rows
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
    fn = lib.int4_dequantize_groups
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 2
    row_groups = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                                                 ctypes.c_int, ctypes.c_void_p]  # ... x, kind, rows,
    # bf16, out
    lib.int4_gemv_row_groups.restype, lib.int4_gemv_row_groups.argtypes = None, row_groups + [ctypes.c_int64] * 2
    lib.int4_gemv_row_groups_team.restype, lib.int4_gemv_row_groups_team.argtypes = None, row_groups + [ctypes.c_int]
    fn = lib.int4_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] \
        + [ctypes.c_int64] * 2
    fn = lib.int4_dequantize_t_team
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    fn = lib.int4_gemv_blocks
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64,
                                                                                       ctypes.c_void_p] \
        + [ctypes.c_int64] * 2
    fn = lib.int4_gemv_team
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                                                   ctypes.c_void_p, ctypes.c_int]
    fn = lib.dense_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 \
        + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 2
    fn = lib.dense_gemv_team
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                                              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                              ctypes.c_int]
    fn = lib.int4_gemv_groups
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int] \
        + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    fn = lib.dense_gemv_groups
    fn.restype = None
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_int64] \
        + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    attention = ([ctypes.c_void_p] * 5 + [ctypes.c_int] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3
                 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64] + [ctypes.c_void_p] * 2
                 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p])  # ... block, source, shift, shared, row_map,
    # sinks
    fn = lib.decode_attention
    fn.restype = None
    fn.argtypes = attention + [ctypes.c_int64] * 2
    fn = lib.decode_attention_team
    fn.restype = None
    fn.argtypes = attention + [ctypes.c_int64, ctypes.c_int]
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    prefill = [ptr] * 6 + [i32] + [i64] * 5 + [ptr] * 4 + [f32, ptr, i64]  # q k v lo hi out, kind, shapes,
    # strides, scale, sinks, splits
    for name, types in (("rms_norm_range", [ptr] * 3 + [i32, i64, i64, f32, i32, i64, i64]),
                        ("rms_norm_team", [ptr] * 3 + [i32, i64, i64, i64, f32, i32, i32]),
                        ("rope_range", [ptr] * 4 + [i32] + [i64] * 3 + [ptr] * 2 + [i64] * 2),
                        ("rope_team", [ptr] * 4 + [i32] + [i64] * 3 + [ptr] * 2 + [i64, i32]),
                        ("prefill_attention", prefill + [i64] * 2),
                        ("prefill_attention_team", prefill + [i64, i32]),
                        ("decode_layers", [ptr, i64, ptr]),  # structs: kernels/decode_layers.py
                        ("decode_silu_mul", [ptr, ptr, i32, i64, ptr, i32, i64, i64, i32])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, types
    i8 = [ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.int8_gemv_takes_bf16.restype, lib.int8_gemv_takes_bf16.argtypes = ctypes.c_int, []
    for name, types in (("int8_gemv", i8 + [i64, i64]), ("int8_gemv_team", i8 + [i32]),
                        ("int8_dequantize", [ptr, ptr, i64, ptr, i32, i64, i64]),
                        ("int8_dequantize_team", [ptr, ptr, i64, i64, i64, ptr, i32, i32])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, types
    lib.prefill_available.restype, lib.prefill_available.argtypes = ctypes.c_int, [ctypes.c_int]
    lib.decode_layer_exp_lanes.restype, lib.decode_layer_exp_lanes.argtypes = ctypes.c_int, []
    lib.decode_layer_scratch.restype, lib.decode_layer_scratch.argtypes = ctypes.c_int64, [ptr]
    return lib


def torch_library() -> ctypes.CDLL | None:
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(path))  # loaded already by `import torch`: a handle to it
    except OSError:
        return None


def runtime_file(lib: ctypes.CDLL | None, symbol: str) -> str | None:
    """The file whose code `symbol` resolves to from `lib` (itself or a library it needs), by the process's maps."""
    try:
        address = ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value
        maps = Path("/proc/self/maps").read_text()
    except (AttributeError, OSError, TypeError):
        return None
    for line in maps.splitlines():
        fields = line.split()
        low, high = (int(a, 16) for a in fields[0].split("-"))
        if low <= address < high and len(fields) >= 6:
            return fields[5]
    return None


def links_openmp(lib: ctypes.CDLL | None) -> bool:
    """Whether `lib` links an OpenMP runtime (it was built with -fopenmp)."""
    try:
        return lib is not None and b"GOMP_" in Path(lib._name).read_bytes()
    except OSError:
        return False
