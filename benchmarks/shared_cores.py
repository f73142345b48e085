"""Good neighbours on shared cores: each engine alone, then two copies of it started together on the same
cores, and the ratio of their times (about 2 on a machine whose cores they share fairly; threads that spin
while they wait make it far worse). FlexGen-Lite's decode (OPT-125m shapes, random bf16 weights), the same
through transformers, and the `flexgen-lite generate --chat` command of issue 24 (5 prompts, the shipped
SmolLM2 GGUF), whole processes. The result goes to benchmarks/results/shared_cores.json.

    .venv/bin/python benchmarks/shared_cores.py [--batch 32] [--new-tokens 32] [--engines flexgen,hf,cli]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name three colors.", "What is 2+2?",
           "Say hello."]
PROMPT_LEN = 32


def worker(engine: str, batch: int, new_tokens: int) -> dict:
    """One timed decode in this process: generated tokens and seconds (the model's load not counted)."""
    if engine == "flexgen":
        from flexgen_lite import FlexGenLite, Policy, SamplingConfig  # first: sets the thread settings

        # isort: split
        import torch

        ids = torch.randint(4, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()
        sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False)
        with FlexGenLite("opt-125m", policy=Policy(gpu_batch_size=batch, dtype="bfloat16")) as m:
            m.generate_ids(ids[:1], SamplingConfig(max_new_tokens=2, stop_at_eos=False))  # warm up
            tic = time.perf_counter()
            m.generate_ids(ids, sampling)
            seconds = time.perf_counter() - tic
    else:
        import torch
        from transformers import OPTConfig, OPTForCausalLM

        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig()).to(torch.bfloat16).eval()
        ids = torch.randint(4, 50000, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
        kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 1}
        with torch.inference_mode():
            model.generate(ids[:1], **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
            tic = time.perf_counter()
            model.generate(ids, **kwargs)
            seconds = time.perf_counter() - tic
    return {"tokens": batch * new_tokens, "seconds": seconds}


def command(engine: str, args) -> list[str]:
    if engine == "cli":
        return [str(Path(sys.executable).with_name("flexgen-lite")), "generate", "--chat", "--no-progress",
                "--max-new-tokens", str(args.new_tokens), *PROMPTS]
    return [sys.executable, __file__, "--worker", engine, "--batch", str(args.batch), "--new-tokens",
            str(args.new_tokens)]


def run_together(engine: str, copies: int, args) -> list[float]:
    """Seconds of each of `copies` processes started at once: the decode's own time for the workers, the
    whole process for the CLI."""
    started = time.perf_counter()
    procs = [subprocess.Popen(command(engine, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(copies)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise SystemExit(f"{engine} failed:\n{stderr[-2000:]}")
        out.append(time.perf_counter() - started if engine == "cli" else
                   json.loads(stdout.strip().splitlines()[-1])["seconds"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["flexgen", "hf"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engines", default="flexgen,hf,cli")
    parser.add_argument("--output", default=str(Path(__file__).with_name("results") / "shared_cores.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.new_tokens)))
        return
    rows, load = {}, os.getloadavg()[0]  # other jobs on the machine: the ratios hold beside them too
    for engine in args.engines.split(","):
        solo = min(run_together(engine, 1, args)[0] for _ in range(2))
        pair = run_together(engine, 2, args)
        rows[engine] = {"solo_s": round(solo, 3), "pair_s": [round(s, 3) for s in pair],
                        "ratio": round(max(pair) / solo, 2)}
        if engine != "cli":
            rows[engine]["solo_tok_s"] = round(args.batch * args.new_tokens / solo, 1)
        print(f"{engine:8s} solo {solo:6.2f} s, two at once {max(pair):6.2f} s: {max(pair) / solo:.2f}x", flush=True)
    from flexgen_lite.system import threads  # what its processes set (unless user_env chose)

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "cpus": len(os.sched_getaffinity(0)), "load_before": round(load, 2), "batch": args.batch,
              "new_tokens": args.new_tokens, "user_env": {k: v for k, v in os.environ.items() if k.startswith(
                  ("OMP_", "GOMP_", "KMP_"))}, "flexgen_lite_sets": threads.BOUNDED_SPIN, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
