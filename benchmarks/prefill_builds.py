"""CPU prefill attention in fp32: the C kernel (native/prefill.c) against torch's SDPA, causal with left padding
as the engine masks it, one JSON line per shape. `--march x86-64-v3` times the kernel as built for an AVX2 CPU
without AVX-512, on this one (run it with ATEN_CPU_CAPABILITY=avx2 for torch's AVX2 kernels beside it).

    .venv/bin/python benchmarks/prefill_builds.py [--march x86-64-v3] [--batch 2] [--tokens 512 2048]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

from flexgen_lite.kernels import native
from flexgen_lite.kernels import prefill_attention as prefill

SHAPES = {"smollm2-135m (9 over 3 of 64)": (9, 3, 64), "llama-3-8b (32 over 8 of 128)": (32, 8, 128)}


def use_build(march: str) -> None:
    """The C kernels built with -march=`march` (and OpenMP) in place of this machine's own build."""
    b = native.build
    path = f"{tempfile.mkdtemp()}/kernels-{march}.so"
    flags = [f for f in b.FLAGS if f != "-march=native"] + [f"-march={march}", *b.OPENMP]
    subprocess.run([b.compiler(), *flags, *map(str, b.SOURCES), "-o", path, "-lm"], check=True)
    lib = b.declared(ctypes.CDLL(path))
    native.library = lambda: lib


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def one(name: str, heads: int, kv_heads: int, d: int, batch: int, t: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, t, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, t, d, generator=g) for _ in "kv")
    rows, keys = torch.arange(t)[:, None], torch.arange(t)[None]
    pad = torch.tensor([7 * i for i in range(batch)])[:, None, None]
    mask = ((keys <= rows)[None] & ((keys >= pad) | (keys == rows)[None]))[:, None]
    kernel = timed(lambda: prefill.prefill_attention(q, k, v, mask))
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads))
    flop = 4 * batch * heads * t * t * d / 2  # causal: half the square
    return {"shape": name, "batch": batch, "tokens": t, "threads": native.threads(),
            "kernel_ms": round(kernel * 1e3, 2), "sdpa_ms": round(sdpa * 1e3, 2),
            "kernel_gflop_s": round(flop / kernel / 1e9, 1), "sdpa_gflop_s": round(flop / sdpa / 1e9, 1),
            "speedup": round(sdpa / kernel, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--march", help="time the kernel built for this -march (default: this machine's build)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    args = parser.parse_args()
    if args.march:
        use_build(args.march)
    lib = native.library()
    if lib is None or not lib.prefill_available(native.OUT_KIND[torch.float32]):
        raise SystemExit("the fp32 prefill kernel is not built here (no C compiler, or neither AVX-512 nor AVX2)")
    for t in args.tokens:
        for name, (heads, kv_heads, d) in SHAPES.items():
            row = one(name, heads, kv_heads, d, args.batch, t)
            print(json.dumps({"build": args.march or "native", "torch_cpu": torch.backends.cpu.get_cpu_capability(),
                              **row}), flush=True)


if __name__ == "__main__":
    main()
