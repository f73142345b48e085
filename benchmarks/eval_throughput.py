"""lm-eval's `loglikelihood` over N requests: FlexGen-Lite's model (prefill-only blocks) against lm-eval's `hf`
model at its best batch size, in one run, on SmolLM2-135M-Instruct (the shipped GGUF; transformers loads the same
weights, as tests/conftest.py does).

    .venv/bin/python benchmarks/eval_throughput.py --requests 1000 --hf-batch 8 32 64 --hf-dtype float32 bfloat16

Requests: multiple-choice style (a context cut from the repository's docs, the true next words and three
others), the shape of hellaswag/arc. Each system scores all of them; hf's batch sizes and dtypes are each timed
on the full set and its best is the peer. Also reported: how often both systems rank the choices alike, and the
largest difference of a log-likelihood. Results JSON in benchmarks/results/."""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_requests(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (context, continuation) pairs, four per context."""
    text = " ".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    words = re.sub(r"[`|#*\[\]()<>]", " ", text).split()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        start = rng.randrange(0, len(words) - 80)
        ctx_len, cont_len = rng.randrange(15, 60), rng.randrange(1, 6)
        context = " ".join(words[start:start + ctx_len])
        true = words[start + ctx_len:start + ctx_len + cont_len]
        choices = [true] + [words[(s := rng.randrange(len(words) - 6)):s + rng.randrange(1, 6)] for _ in range(3)]
        out += [(context, " " + " ".join(c)) for c in choices]
    return out[:n]


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def hf_model(path: str, dtype: torch.dtype):
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(Path(path).parent), Path(path).name
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.to(dtype)


def timed(lm, requests) -> tuple[list[tuple[float, bool]], float]:
    tic = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return out, time.perf_counter() - tic


def ranks_alike(a, b) -> float:
    """Share of four-choice groups whose best choice is the same under both systems."""
    groups = range(0, len(a) - len(a) % 4, 4)
    best = [(max(range(4), key=lambda j: a[g + j][0]), max(range(4), key=lambda j: b[g + j][0])) for g in groups]
    return sum(x == y for x, y in best) / len(best)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--hf-batch", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--hf-dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--model-args", default="percent=100/0/100/0/100/0,gpu_batch_size=32,num_gpu_batches=4",
                   help="FlexGen-Lite's model_args (policy flags; default: 32 x 4 rows per block, all in RAM)")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/eval-throughput-smollm2.json"))
    args = p.parse_args()

    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    from flexgen_lite import default_model_path
    from flexgen_lite.eval.lm_eval_model import FlexGenLiteLM
    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer

    path = default_model_path()
    requests = instances(make_requests(args.requests))
    ours_lm = FlexGenLiteLM(path, progress=False, **simple_parse_args_string(args.model_args))
    timed(ours_lm, requests[:16])  # warm-up: first-use costs (profile, kernels)
    ours, ours_s = timed(ours_lm, requests)
    tokens = ours_lm.model.score_stats.tokens
    row = {"system": "flexgen-lite", "model_args": args.model_args, "policy": ours_lm.model.policy.flags(),
           "seconds": ours_s, "requests_per_s": len(requests) / ours_s, "tokens_per_s": tokens / ours_s,
           "tokens_fed": ours_lm.model.score_stats.fed}
    print(json.dumps(row), flush=True)
    rows = [row]
    ours_lm.model.close()
    del ours_lm
    tokenizer = gguf_tokenizer(path)
    best = None
    for dtype in args.hf_dtype:
        model = hf_model(path, getattr(torch, dtype))
        for batch in args.hf_batch:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, device="cpu")
            timed(lm, requests[:16])
            theirs, seconds = timed(lm, requests)
            row = {"system": "lm-eval hf", "dtype": dtype, "batch_size": batch, "seconds": seconds,
                   "requests_per_s": len(requests) / seconds, "tokens_per_s": tokens / seconds,
                   "same_best_choice": ranks_alike(ours, theirs),
                   "max_abs_logprob_difference": max(abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True))}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if best is None or seconds < best["seconds"]:
                best = row
            save(args.output, requests, tokens, rows, best)
        del model
    result = save(args.output, requests, tokens, rows, best)
    print(f"flexgen-lite {rows[0]['requests_per_s']:.1f} req/s; best hf ({best['dtype']}, batch {best['batch_size']}) "
          f"{best['requests_per_s']:.1f} req/s: {result['ratio_to_best_hf']:.2f}x", file=sys.stderr)


def save(output: str, requests, tokens: int, rows: list[dict], best: dict) -> dict:
    """The results so far (after each hf row: a long run interrupted keeps what it measured)."""
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "model": "SmolLM2-135M-Instruct (GGUF)",
              "requests": len(requests), "prefill_tokens": tokens, "rows": rows,
              "ratio_to_best_hf": best["seconds"] / rows[0]["seconds"]}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
