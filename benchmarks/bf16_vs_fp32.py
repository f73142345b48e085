"""How far the engine's bf16 first-token logits are from its fp32 ones on the same checkpoint (the tests hold fp32
to transformers' tokens), with the C prefill attention and with torch's; the argmax agreement of each.

    .venv/bin/python benchmarks/bf16_vs_fp32.py --model /tmp/flexgen_lite_compare/gpt-oss-20b-2layers-bfloat16-seed0

Prompts as compare_hf.py makes them (random ids from --seed), so its checkpoints and rows compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import flexgen_lite.kernels.attention as attention
from flexgen_lite import FlexGenLite, SamplingConfig
from flexgen_lite.engine.policy import Policy


def first_logits(model: str, prompts: list[list[int]], dtype: str, native_prefill: bool) -> torch.Tensor:
    real = attention.prefill_wins
    attention.prefill_wins = lambda dt: native_prefill
    try:
        policy = Policy(gpu_batch_size=len(prompts), num_gpu_batches=1, share_prefix=False, dtype=dtype)
        with FlexGenLite(model, policy=policy) as m:
            _, logits = m.generate_ids(prompts, SamplingConfig(max_new_tokens=1, stop_at_eos=False),
                                       return_logits=True)
    finally:
        attention.prefill_wins = real
    return torch.stack([row[0].float() for row in logits])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint directory")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    exact = first_logits(args.model, prompts, "float32", True)
    report = {}
    for name, native in (("C prefill attention", True), ("torch's prefill attention", False)):
        error = first_logits(args.model, prompts, "bfloat16", native) - exact
        report[name] = {"rms": error.pow(2).mean().sqrt().item(), "max": error.abs().max().item(),
                        "argmax_agree": int((error + exact).argmax(-1).eq(exact.argmax(-1)).sum()),
                        "rows": len(prompts)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
