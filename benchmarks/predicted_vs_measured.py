"""The cost model's predicted throughput against `flexgen-lite bench`, policy by policy.

Each row runs `flexgen-lite bench --predict` in its own subprocess (dummy weights, or a GGUF file for a
real Llama-family model) and prints predicted and measured total tok/s, prefill s and decode ms/step, and
the error of each (predicted / measured - 1). The prediction uses this machine's cached profile
(`flexgen-lite profile`).

    .venv/bin/python benchmarks/predicted_vs_measured.py            # the rows of docs/policy.md
    .venv/bin/python benchmarks/predicted_vs_measured.py --only 0 3  # some of them
"""

from __future__ import annotations

import argparse

from bench_subprocess import run_bench

# (model, flags): small models, short prompts, placements over memory and disk, switches on and off
ROWS = [
    ("facebook/opt-125m", "--percent 100 0 100 0 100 0 --gpu-batch-size 8"),
    ("facebook/opt-125m", "--percent 100 0 100 0 100 0 --gpu-batch-size 64"),
    ("facebook/opt-125m", "--percent 100 0 100 0 100 0 --gpu-batch-size 16 --compress-weight"),
    ("facebook/opt-125m", "--percent 100 0 0 0 100 0 --gpu-batch-size 16 --num-gpu-batches 2"),
    ("facebook/opt-125m", "--percent 100 0 100 0 100 0 --gpu-batch-size 32 --compress-cache"),
    ("facebook/opt-350m", "--percent 0 0 100 0 100 0 --gpu-batch-size 16 --num-gpu-batches 2"),
    ("facebook/opt-350m", "--percent 50 0 100 0 100 0 --gpu-batch-size 16 --dtype float32"),
    ("facebook/opt-1.3b", "--percent 100 0 100 0 100 0 --gpu-batch-size 16"),
    ("facebook/opt-1.3b", "--percent 0 0 100 0 100 0 --gpu-batch-size 32"),
    ("facebook/opt-1.3b", "--percent 0 0 100 0 100 0 --gpu-batch-size 32 --no-overlap"),
    ("SMOLLM", "--percent 100 0 100 0 100 0 --gpu-batch-size 16"),
    ("SMOLLM", "--percent 0 0 50 0 100 0 --gpu-batch-size 16"),
]


def run(model: str, flags: str, args) -> dict:
    return run_bench(model, args.prompt_len, args.gen_len, ["--predict", *flags.split()], args.cold_disk, args.timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--only", type=int, nargs="*", help="row numbers to run (default all)")
    p.add_argument("--cold-disk", action="store_true", help="offload files read from the disk, not the page cache")
    p.add_argument("--repeat", type=int, default=1, help="runs per row; the median (and the range) is shown")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    smollm = None
    print(f"prompt {args.prompt_len}, gen {args.gen_len}, one block each, {args.repeat} run(s) per row "
          "(median, range); error = predicted / measured - 1")
    print("| # | model | policy | predicted tok/s | measured tok/s | error | prefill s pred / meas "
          "| decode ms/step pred / meas | decode error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (model, flags) in enumerate(ROWS):
        if args.only and i not in args.only:
            continue
        if model == "SMOLLM":
            if smollm is None:
                from flexgen_lite.models.gguf_file import default_model_path

                smollm = default_model_path()
            model = smollm
        runs = sorted((run(model, flags, args) for _ in range(args.repeat)), key=lambda r: r["total_tok_s"])
        r = runs[len(runs) // 2]  # the median run by total tok/s
        spread = f" ({runs[0]['total_tok_s']}-{runs[-1]['total_tok_s']})" if len(runs) > 1 else ""
        step_err = r["predicted_decode_step_ms"] / r["decode_step_ms"] - 1
        print(f"| {i} | {model.rsplit('/', 1)[-1]} | `{flags}` | {r['predicted_total_tok_s']} | {r['total_tok_s']}"
              f"{spread} | {100 * r['prediction_error']:+.0f}% | {r['predicted_prefill_s']} / {r['prefill_s']} | "
              f"{r['predicted_decode_step_ms']} / {r['decode_step_ms']} | {100 * step_err:+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
