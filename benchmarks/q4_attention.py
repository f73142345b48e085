"""CPU decode attention over a 4-bit KV cache: read as stored (kernels/quantized_attention.py) against the path it
replaced (the part dequantized into a dense slot, then the C decode kernel), and against the dense bf16 cache
alone, on the same random cache, in one process. Prints one JSON line per shape. `--march x86-64-v3` times the
kernels as built for another CPU (there: AVX2 without AVX-512), on this one.

    .venv/bin/python benchmarks/q4_attention.py [--rows 32] [--length 544] [--march x86-64-v3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time

import torch

from flexgen_lite.kernels import native
from flexgen_lite.kernels import quantized_attention as qa
from flexgen_lite.kernels.quantization import CompressionConfig, QuantizedTensor, dequantize_reference

CONFIG = CompressionConfig(4, 64, -1)
SHAPES = {"opt-30b (56 heads)": (56, 56, 128), "llama-3-8b (32 over 8)": (32, 8, 128),
          "smollm2-135m (9 over 3)": (9, 3, 64)}


def timed(fn, repeat: int = 5) -> float:
    fn()
    tic = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - tic) / repeat


def one(name: str, heads: int, kv_heads: int, d: int, rows: int, length: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(length, rows, kv_heads, d, generator=g) for _ in "kv"]  # position-major, as in host RAM
    stored = [qa.position_major(t, CONFIG) for t in x]
    q = torch.randn(rows, heads, 1, d, generator=g).bfloat16()
    new = torch.randn(rows, kv_heads, 1, d, generator=g).bfloat16()
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    slots = [torch.empty(rows, kv_heads, length, d, dtype=torch.bfloat16) for _ in "kv"]
    dense = [t.bfloat16().permute(1, 2, 0, 3) for t in x]

    def dequantized() -> None:  # KVCache.load into slots, then the dense kernel (the path before)
        for (codes, scale, minimum), slot in zip(stored, slots, strict=True):
            qt = QuantizedTensor(codes.reshape(-1), scale, minimum, (rows, kv_heads, length, d), CONFIG)
            dequantize_reference(qt, torch.bfloat16, slot)
        native.decode_attention(q, *slots, mask)

    codes_s = timed(lambda: qa.attend(q, *stored, CONFIG, mask, length - 1, new, new))
    dequantized_s = timed(dequantized)
    dense_s = timed(lambda: native.decode_attention(q, *dense, mask))
    stored_bytes = sum(p.numel() * p.element_size() for part in stored for p in part)
    return {"shape": name, "rows": rows, "positions": length, "threads": native.threads(),
            "as_stored_ms": round(codes_s * 1e3, 2), "dequantized_ms": round(dequantized_s * 1e3, 2),
            "dense_bf16_ms": round(dense_s * 1e3, 2), "speedup_over_dequantized": round(dequantized_s / codes_s, 2),
            "stored_gb_s": round(stored_bytes / codes_s / 1e9, 2),
            "dense_gb_s": round(sum(t.nbytes for t in dense) / dense_s / 1e9, 2)}


def use_build(march: str) -> None:
    """The C kernels built with -march=`march` (and OpenMP) in place of this machine's own build."""
    b = native.build
    path = f"{tempfile.mkdtemp()}/kernels-{march}.so"
    flags = [f for f in b.FLAGS if f != "-march=native"] + [f"-march={march}", *b.OPENMP]
    subprocess.run([b.compiler(), *flags, *map(str, b.SOURCES), "-o", path, "-lm"], check=True)
    lib = qa.declared(b.declared(ctypes.CDLL(path)))
    native.library = qa._library = lambda: lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=544)
    parser.add_argument("--march", help="time the kernels built for this -march (default: this machine's build)")
    args = parser.parse_args()
    if args.march:
        use_build(args.march)
    if not qa.checked():
        raise SystemExit("the 4-bit attention kernel is not built here (no C compiler?)")
    for name, (heads, kv_heads, d) in SHAPES.items():
        print(json.dumps({"build": args.march or "native", **one(name, heads, kv_heads, d, args.rows, args.length)}),
              flush=True)


if __name__ == "__main__":
    main()
