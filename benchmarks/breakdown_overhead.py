"""What --breakdown costs: the same `flexgen-lite bench` with and without it, alternately, each in its own
process; median decode ms/step of each and their ratio.

    .venv/bin/python benchmarks/breakdown_overhead.py [--repeats 5] [--out benchmarks/results/breakdown_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from bench_subprocess import run_bench

CASES = {  # name: (model, prompt, gen, flags)
    "opt-125m all in RAM, batch 8": ("facebook/opt-125m", 32, 16,
                                     ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "8"]),
    "opt-125m weights on disk, 2x4": ("facebook/opt-125m", 32, 16,
                                      ["--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "4",
                                       "--num-gpu-batches", "2"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "breakdown_overhead.json"))
    args = p.parse_args()
    rows = []
    for name, (model, prompt, gen, flags) in CASES.items():
        flags = [*flags, "--dtype", args.dtype]
        plain, traced, spans = [], [], None
        for _ in range(args.repeats):  # alternately: the VM's load drifts
            plain.append(run_bench(model, prompt, gen, flags)["decode_step_ms"])
            r = run_bench(model, prompt, gen, [*flags, "--breakdown"])
            traced.append(r["decode_step_ms"])
            spans = r["breakdown"]
        row = {"case": name, "model": model, "prompt_len": prompt, "gen_len": gen, "flags": " ".join(flags),
               "plain_ms": plain, "breakdown_ms": traced, "plain_median_ms": statistics.median(plain),
               "breakdown_median_ms": statistics.median(traced),
               "ratio": round(statistics.median(traced) / statistics.median(plain), 4), "last_breakdown": spans}
        rows.append(row)
        print(f"{name}: {row['plain_median_ms']:.1f} ms/step plain, {row['breakdown_median_ms']:.1f} with "
              f"--breakdown: x{row['ratio']:.3f} (runs: {plain} / {traced})", flush=True)
    Path(args.out).write_text(json.dumps({"machine": platform.node(), "when": time.strftime("%Y-%m-%d %H:%M"),
                                          "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
