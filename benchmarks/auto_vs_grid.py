"""`--policy auto` against a small grid of hand-picked policies, on one workload and memory budget.

Each policy runs as `flexgen-lite bench` in its own subprocess (one block of random prompts, dummy weights,
FlexGen's total tok/s); hand-picked policies run with the same --cpu-mem/--gpu-mem/--disk-mem, so one
that needs more than the budget is refused (and listed as such) instead of run. Prints a markdown table
and whether auto reached the best of the grid.

    .venv/bin/python benchmarks/auto_vs_grid.py --model facebook/opt-1.3b --prompt-len 32 --gen-len 8 \\
        --cpu-mem 2GiB --num-prompts 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# hand-picked the way a user would: all in memory, weights streamed from disk, cache on disk, mixes; batch 8-64
GRID = [
    ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "16"],
    ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "32"],
    ["--percent", "50", "0", "100", "0", "100", "0", "--gpu-batch-size", "32"],
    ["--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "32", "--num-gpu-batches", "2"],
    ["--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "16", "--num-gpu-batches", "4"],
    ["--percent", "30", "0", "50", "0", "100", "0", "--gpu-batch-size", "32", "--num-gpu-batches", "2"],
    ["--percent", "0", "0", "0", "0", "100", "0", "--gpu-batch-size", "64"],
]


def bench(args, flags: list[str]) -> tuple[dict | None, str]:
    cmd = [sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", args.model, "--prompt-len",
           str(args.prompt_len), "--gen-len", str(args.gen_len), "--predict", *flags]
    for name in ("gpu_mem", "cpu_mem", "disk_mem", "dtype", "offload_dir"):
        if getattr(args, name):
            cmd += ["--" + name.replace("_", "-"), getattr(args, name)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1][:160]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/opt-1.3b")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=64, help="auto plans for this many prompts (caps its block)")
    p.add_argument("--gpu-mem")
    p.add_argument("--cpu-mem", default="2GiB", help="the budget of every run (default 2GiB; \"\" for none)")
    p.add_argument("--disk-mem")
    p.add_argument("--dtype")
    p.add_argument("--offload-dir")
    p.add_argument("--repeat", type=int, default=1, help="runs per policy; the median (upper one of two) is compared")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    print(f"model {args.model}, prompt {args.prompt_len}, gen {args.gen_len}, budgets gpu {args.gpu_mem or '-'} "
          f"cpu {args.cpu_mem or '-'} disk {args.disk_mem or '-'}; one block each, dummy weights")
    print(f"| policy | block | predicted tok/s | measured tok/s ({args.repeat} runs) | decode ms/step | peak RSS GB "
          "| peak disk GB |")
    print("|---|---|---|---|---|---|---|")
    rows = [("auto", ["--policy", "auto", "--num-prompts", str(args.num_prompts)])] + [("grid", f) for f in GRID]
    runs: list[list[tuple[dict | None, str]]] = [[] for _ in rows]
    for _ in range(args.repeat):  # round robin: a slow spell of the machine hits every policy alike
        for i, (_, flags) in enumerate(rows):
            if not runs[i] or runs[i][0][0] is not None:  # a refused policy is not retried
                runs[i].append(bench(args, flags))
    results = {}
    for (kind, flags), tries in zip(rows, runs, strict=True):
        label = "auto: " if kind == "auto" else ""
        if tries[0][0] is None:
            print(f"| {' '.join(flags)} | - | - | refused or failed: {tries[0][1]} | - | - | - |", flush=True)
            continue
        done = sorted((r for r, _ in tries if r is not None), key=lambda r: r["total_tok_s"])
        r = done[len(done) // 2]
        measured = f"{r['total_tok_s']}" + (f" ({done[0]['total_tok_s']}-{done[-1]['total_tok_s']})"
                                              if len(done) > 1 else "")
        results.setdefault(kind, []).append(r["total_tok_s"])
        print(f"| {label}{r['policy']} | {r['batch']} | {r.get('predicted_total_tok_s', '-')} | {measured} | "
              f"{r['decode_step_ms']} | {r['peak_rss_gb']} | {r['peak_disk_gb']} |", flush=True)
    auto, grid = max(results.get("auto", [0])), max(results.get("grid", [0]))
    verdict = "yes" if auto >= grid else "no"
    print(f"\nauto {auto} tok/s, best of grid {grid} tok/s: auto >= best of grid: {verdict} "
          f"(ratio {auto / grid if grid else float('inf'):.2f})")


if __name__ == "__main__":
    main()
