"""The compute floor of a workload on this machine: the time the model's matmuls alone take, dense, at the
measured speed of this CPU's (or GPU's) matmul, with the weights already in memory and nothing else done.

No system that computes the model's real outputs here can be faster than this, whatever it does with the
disk: it is the ceiling a disk-offloading system approaches as its batch grows and its reads hide behind
compute. `docs/disk_tier.md` uses it to say how far a ratio against a peer can go on a given machine.

    .venv/bin/python benchmarks/compute_floor.py --model facebook/opt-13b --dtype bfloat16 \\
        --prompt-len 16 --gen-len 32 --batch 64 128 256 384 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexgen_lite.cli.breakdown import step_linears  # noqa: E402
from flexgen_lite.models.presets import preset_config  # noqa: E402


def matmul_seconds(m: int, k: int, n: int, dtype: torch.dtype, device: str, runs: int) -> float:
    """Best of `runs` of one dense (m, k) x (k, n) product (F.linear's layout), after a warm-up."""
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(runs + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        F.linear(x, w)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best


def step_floor(config, rows: int, tokens: int, dtype: torch.dtype, device: str, runs: int,
               seen: dict) -> float:
    """Seconds of one step's matmuls (`rows` sequences, `tokens` new tokens each), each shape timed once."""
    total = 0.0
    for m, k, n, times in step_linears(config, rows, tokens):
        key = (int(m), k, n)
        if key not in seen:
            seen[key] = matmul_seconds(int(m), k, n, dtype, device, runs)
        total += times * seen[key]
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="facebook/opt-13b", help="a preset name (shapes only; no weights)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--runs", type=int, default=3, help="timed runs per shape; the fastest counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    config, dtype = preset_config(args.model), getattr(torch, args.dtype)
    seen: dict = {}
    rows = []
    print(f"{args.model} {args.dtype} on {args.device} ({torch.get_num_threads()} threads), prompt "
          f"{args.prompt_len}, gen {args.gen_len}: the model's matmuls alone, dense, weights in memory")
    print("| batch | prefill floor s | decode floor s/step | ms per sequence and step | ceiling total tok/s "
          "| ceiling decode tok/s |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        prefill = step_floor(config, b, args.prompt_len, dtype, args.device, args.runs, seen)
        decode = step_floor(config, b, 1, dtype, args.device, args.runs, seen)
        total = b * args.gen_len / (prefill + (args.gen_len - 1) * decode)
        row = {"batch": b, "prefill_floor_s": round(prefill, 3), "decode_floor_s": round(decode, 3),
               "ms_per_sequence_step": round(1e3 * decode / b, 2), "ceiling_total_tok_s": round(total, 2),
               "ceiling_decode_tok_s": round(b / decode, 2)}
        rows.append(row)
        print(f"| {b} | {prefill:.1f} | {decode:.2f} | {row['ms_per_sequence_step']} | {total:.2f} "
              f"| {b / decode:.2f} |", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
