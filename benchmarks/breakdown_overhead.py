"""What --breakdown costs, measured two ways:

- in one process (the default): one model, blocks generated alternately with the recorder on and off (the
  engine's `trace`), decode step times of each compared by median and minimum (robust to a busy VM), and
  the recorder's own cost: spans per decode step x the measured cost of one span;
- `--subprocess`: the same `flexgen-lite bench` with and without --breakdown, alternately, each in its own
  process; median decode ms/step of each and their ratio (on a shared 2-core VM, noise of +-30% hides 3%).

    .venv/bin/python benchmarks/breakdown_overhead.py [--rounds 12] [--subprocess --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_subprocess import run_bench

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.trace import NULL, Recorder

CASES = {  # name: (model, prompt, gen, flags)
    "opt-125m all in RAM, batch 8": ("facebook/opt-125m", 32, 16,
                                     ["--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "8"]),
    "opt-125m weights on disk, 2x4": ("facebook/opt-125m", 32, 16,
                                      ["--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "4",
                                       "--num-gpu-batches", "2"]),
}


def span_cost(n: int = 50_000) -> float:
    """Seconds one recorded span costs (enter, two perf_counter reads, exit, append)."""
    rec = Recorder()
    with rec.step(0):
        tic = time.perf_counter()
        for _ in range(n):
            with rec.span("compute", 1, stream="compute"):
                pass
        return (time.perf_counter() - tic) / n


def in_process(name: str, model: str, prompt: int, gen: int, flags: list[str], rounds: int, dtype: str) -> dict:
    pct = [float(x) for x in flags[flags.index("--percent") + 1:flags.index("--percent") + 7]]
    gbs = int(flags[flags.index("--gpu-batch-size") + 1])
    nb = int(flags[flags.index("--num-gpu-batches") + 1]) if "--num-gpu-batches" in flags else 1
    policy = Policy(gpu_batch_size=gbs, num_gpu_batches=nb, weight_gpu_percent=pct[0], weight_cpu_percent=pct[1],
                    cache_gpu_percent=pct[2], cache_cpu_percent=pct[3], act_gpu_percent=pct[4],
                    act_cpu_percent=pct[5], dtype=dtype)
    steps = {"off": [], "on": []}
    spans_per_step = []
    with FlexGenLite(model, policy=policy) as m:
        prompts = torch.randint(3, m.config.vocab_size, (policy.block_size, prompt),
                                generator=torch.Generator().manual_seed(0)).tolist()
        sampling = SamplingConfig(max_new_tokens=gen, stop_at_eos=False)
        m.generate_ids(prompts, sampling)  # warm up
        for _ in range(rounds):
            for mode in ("off", "on"):
                rec = Recorder() if mode == "on" else NULL
                m.engine.trace = rec
                m.generate_ids(prompts, sampling)
                steps[mode] += m.engine.times.decode
                if mode == "on":
                    first = min(s.start for s in rec.steps if s.index > 0)
                    spans_per_step.append(sum(sp.start >= first for sp in rec.spans) / (len(rec.steps) - 1))
    cost = span_cost()
    med = {k: statistics.median(v) for k, v in steps.items()}
    low = {k: min(v) for k, v in steps.items()}
    per_step = statistics.mean(spans_per_step)
    row = {"case": name, "method": "in-process, alternating blocks", "rounds": rounds,
           "decode_steps_each": len(steps["on"]), "off_median_ms": 1e3 * med["off"], "on_median_ms": 1e3 * med["on"],
           "ratio_median": med["on"] / med["off"], "off_min_ms": 1e3 * low["off"], "on_min_ms": 1e3 * low["on"],
           "ratio_min": low["on"] / low["off"], "spans_per_step": per_step, "span_cost_us": 1e6 * cost,
           "recorder_share_of_min_step": per_step * cost / low["off"]}
    print(f"{name} (in process, {rounds} rounds): decode median {row['off_median_ms']:.1f} -> "
          f"{row['on_median_ms']:.1f} ms/step (x{row['ratio_median']:.3f}), min {row['off_min_ms']:.1f} -> "
          f"{row['on_min_ms']:.1f} (x{row['ratio_min']:.3f}); {per_step:.0f} spans/step x {1e6 * cost:.2f} us = "
          f"{100 * row['recorder_share_of_min_step']:.2f}% of the fastest step", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=12, help="in-process rounds (one block off, one on)")
    p.add_argument("--subprocess", action="store_true", help="also: bench with and without --breakdown")
    p.add_argument("--repeats", type=int, default=5, help="--subprocess: runs of each")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "breakdown_overhead.json"))
    args = p.parse_args()
    rows = [in_process(name, *case, args.rounds, args.dtype) for name, case in CASES.items()]
    for name, (model, prompt, gen, flags) in CASES.items() if args.subprocess else ():
        flags = [*flags, "--dtype", args.dtype]
        plain, traced, spans = [], [], None
        for _ in range(args.repeats):  # alternately: the VM's load drifts
            plain.append(run_bench(model, prompt, gen, flags)["decode_step_ms"])
            r = run_bench(model, prompt, gen, [*flags, "--breakdown"])
            traced.append(r["decode_step_ms"])
            spans = r["breakdown"]
        row = {"case": name, "method": "bench subprocesses, alternating", "model": model, "prompt_len": prompt,
               "gen_len": gen, "flags": " ".join(flags),
               "plain_ms": plain, "breakdown_ms": traced, "plain_median_ms": statistics.median(plain),
               "breakdown_median_ms": statistics.median(traced),
               "ratio": round(statistics.median(traced) / statistics.median(plain), 4), "last_breakdown": spans}
        rows.append(row)
        print(f"{name}: {row['plain_median_ms']:.1f} ms/step plain, {row['breakdown_median_ms']:.1f} with "
              f"--breakdown: x{row['ratio']:.3f} (runs: {plain} / {traced})", flush=True)
    Path(args.out).write_text(json.dumps({"machine": platform.node(), "when": time.strftime("%Y-%m-%d %H:%M"),
                                          "load_average": list(os.getloadavg()), "rows": rows}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
