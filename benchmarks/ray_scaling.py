"""Throughput of flexgen_lite.ray with 1 and 2 replicas against the plain process, on this machine.

The same chat prompts (greedy, exactly --gen-len new tokens each) through:
- plain: one fresh Python process opening the model and generating (torch threads = --threads), timed from its
  start to its exit (interpreter, imports, model opening and generation);
- ray-N: the Ray Data processor with N replicas of --threads threads each on a local Ray started beforehand (a
  cluster that already runs), timed from applying the processor to the last row (actor start, imports, model
  opening in each replica, generation, results back).
Every replica's rows are checked equal to the plain process's ids. Overhead of Ray = ray-1 time / plain time - 1.

    .venv/bin/python benchmarks/ray_scaling.py --prompts 96 --gen-len 32 --json-out benchmarks/results/ray_scaling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

PLAIN = """
import json, sys, time, torch
torch.set_num_threads({threads})
from flexgen_lite import FlexGenLite, Policy, SamplingConfig
m = FlexGenLite({model!r}, policy=Policy(gpu_batch_size={batch}, dtype={dtype!r}))
tic = time.perf_counter()
ids = m.generate_ids(m.encode({prompts!r}, chat=True), SamplingConfig({gen}, stop_at_eos=False))
json.dump({{"ids": ids, "generate_s": time.perf_counter() - tic}}, sys.stdout)
"""


def prompts(n: int) -> list[str]:
    topics = ["the sea", "a clock", "bread", "the moon", "rain", "a library", "bees", "mountains"]
    return [f"Write one sentence about {topics[i % len(topics)]} and the number {i}." for i in range(n)]


def run_plain(args, texts: list[str]) -> dict:
    code = PLAIN.format(threads=args.threads, model=args.model, batch=args.gpu_batch_size, dtype=args.dtype,
                        prompts=texts, gen=args.gen_len)
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - tic
    out = json.loads(done.stdout)
    return {"wall_s": wall, "generate_s": out["generate_s"], "ids": out["ids"]}


def run_ray(args, texts: list[str], replicas: int) -> dict:
    import ray.data

    from flexgen_lite.engine.policy import Policy
    from flexgen_lite.ray import ProcessorConfig, Sampling, build_processor

    config = ProcessorConfig(args.model, Policy(gpu_batch_size=args.gpu_batch_size, dtype=args.dtype),
                             threads=args.threads, concurrency=replicas, batch_size=args.gpu_batch_size,
                             sampling=Sampling(max_tokens=args.gen_len, ignore_eos=True))
    rows = [{"row": i, "messages": [{"role": "user", "content": t}]} for i, t in enumerate(texts)]
    tic = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // args.gpu_batch_size))
    out = build_processor(config)(ds).take_all()
    wall = time.perf_counter() - tic
    ids = [None] * len(texts)
    for r in out:
        ids[r["row"]] = [int(t) for t in r["generated_tokens"]]
    return {"wall_s": wall, "ids": ids}


def main() -> None:
    from flexgen_lite.models.gguf_file import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=16, help="block size; also rows per replica call")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the plain process and of each replica")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting (median reported)")
    p.add_argument("--json-out")
    args = p.parse_args()
    args.model = args.model or default_model_path()
    texts = prompts(args.prompts)
    tokens = args.prompts * args.gen_len

    import ray

    tic = time.perf_counter()
    ray.init(num_cpus=max(args.replicas) * args.threads, object_store_memory=256 * 2**20, include_dashboard=False,
             logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_init_s = time.perf_counter() - tic
    runs: dict[str, list[dict]] = {"plain": [], **{f"ray-{n}": [] for n in args.replicas}}
    reference = None
    for _ in range(args.repeat):
        plain = run_plain(args, texts)
        reference = reference or plain["ids"]
        assert plain["ids"] == reference, "the plain process is not deterministic"
        runs["plain"].append(plain)
        print(f"plain: {plain['wall_s']:.1f} s ({tokens / plain['wall_s']:.1f} tok/s; generate alone "
              f"{plain['generate_s']:.1f} s)", flush=True)
        for n in args.replicas:
            run = run_ray(args, texts, n)
            same = sum(a == b for a, b in zip(run["ids"], reference, strict=True))
            assert same == len(texts), f"ray-{n}: {len(texts) - same} rows differ from the plain process"
            runs[f"ray-{n}"].append(run)
            print(f"ray-{n}: {run['wall_s']:.1f} s ({tokens / run['wall_s']:.1f} tok/s), all rows equal", flush=True)
    ray.shutdown()

    median = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    result = {
        "setting": {"model": os.path.basename(args.model), "prompts": args.prompts, "gen_len": args.gen_len,
                    "gpu_batch_size": args.gpu_batch_size, "dtype": args.dtype, "threads_each": args.threads,
                    "repeat": args.repeat, "cpus": os.cpu_count(), "ray_init_s": round(ray_init_s, 2)},
        "wall_s": {k: [round(r["wall_s"], 2) for r in v] for k, v in runs.items()},
        "tok_s": {k: round(tokens / v, 2) for k, v in median.items()},
        "plain_generate_s": [round(r["generate_s"], 2) for r in runs["plain"]],
        "ray_1_overhead": round(median["ray-1"] / median["plain"] - 1, 3) if "ray-1" in median else None,
        "speedup_2_over_1": round(median["ray-1"] / median["ray-2"], 3) if {"ray-1", "ray-2"} <= set(median) else None,
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
