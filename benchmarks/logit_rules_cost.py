"""What a row's penalties and bias cost a decode step (kernels/logit_rules.py): the same prompts generated with and
without them, alternated, in one process (greedy, every row generating all its tokens).

    .venv/bin/python benchmarks/logit_rules_cost.py --batch 64 --gen-len 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig, default_model_path

RULES = dict(repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.3, logit_bias={13: -2.0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the shipped SmolLM2-135M-Instruct GGUF")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    policy = Policy(gpu_batch_size=args.batch, dtype=args.dtype)
    with FlexGenLite(str(args.model or default_model_path()), policy=policy) as m:
        prompts = torch.randint(100, m.config.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        configs = {"plain": SamplingConfig(args.gen_len, stop_at_eos=False),
                   "rules": SamplingConfig(args.gen_len, stop_at_eos=False, **RULES)}
        m.generate_ids(prompts, configs["plain"])  # warm-up
        steps: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, config in configs.items():
                tic = time.perf_counter()
                m.generate_ids(prompts, config)
                steps[name].append(statistics.median(m.engine.times.decode) * 1e3)
                _ = time.perf_counter() - tic
    result = {name: round(statistics.median(v), 2) for name, v in steps.items()}
    result.update(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, settings=str(RULES),
                  ratio=round(result["rules"] / result["plain"], 3), dtype=str(m.dtype).replace("torch.", ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
