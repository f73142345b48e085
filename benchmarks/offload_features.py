"""Bytes moved per decode step and throughput with and without each offloading feature.

Runs `flexgen-lite bench` in a subprocess per setting (so each has its own peak RSS) and prints one
markdown table. Weights and cache are put off the compute tier; on a CPU-only machine that means
the disk (host RAM is the compute memory), on a GPU machine CPU RAM or disk as --percent says.

    .venv/bin/python benchmarks/offload_features.py --model facebook/opt-1.3b --prompt-len 32 --gen-len 8 \
        --gpu-batch-size 16 --percent 0 0 0 100 100 0
"""

from __future__ import annotations

import argparse

from bench_subprocess import run_bench

FEATURES = {
    "baseline": [],
    "compress-weight": ["--compress-weight"],
    "compress-cache": ["--compress-cache"],
    "cpu-cache-compute": ["--cpu-cache-compute"],
    "all-three": ["--compress-weight", "--compress-cache", "--cpu-cache-compute"],
}


def run(args, extra: list[str]) -> dict:
    flags = ["--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
             "--percent", *map(str, args.percent), *extra]
    return run_bench(args.model, args.prompt_len, args.gen_len, flags, args.cold_disk, args.timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/opt-1.3b")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--gpu-batch-size", type=int, default=16)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--percent", nargs=6, type=float, default=[0, 0, 0, 0, 100, 0])
    p.add_argument("--features", nargs="*", default=list(FEATURES), choices=list(FEATURES))
    p.add_argument("--cold-disk", action="store_true", help="drop offload files from the page cache after reads")
    p.add_argument("--timeout", type=int, default=3600)
    args = p.parse_args()
    print(f"model {args.model}, prompt {args.prompt_len}, gen {args.gen_len}, batch "
          f"{args.gpu_batch_size}x{args.num_gpu_batches}, --percent {' '.join(f'{x:g}' for x in args.percent)}"
          f"{', cold disk' if args.cold_disk else ''}")
    print("| feature | weights GB moved/step | cache GB moved/step | decode ms/step | moved GB/s | decode tok/s "
          "| total tok/s | peak RSS GB | peak disk GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.features:
        r = run(args, FEATURES[name])
        moved = r["weights_moved_per_step_gb"] + r["cache_moved_per_step_gb"]
        rate = moved / (r["decode_step_ms"] / 1000) if r["decode_step_ms"] else 0
        print(f"| {name} | {r['weights_moved_per_step_gb']} | {r['cache_moved_per_step_gb']} | "
              f"{r['decode_step_ms']} | {rate:.2f} | {r['decode_tok_s']} | {r['total_tok_s']} | "
              f"{r['peak_rss_gb']} | {r['peak_disk_gb']} |", flush=True)


if __name__ == "__main__":
    main()
