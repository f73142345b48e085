"""Jobs through the engine: grouped by sampling settings (one `generate_ids` call per group, which sorts its
prompts by length into the engine's blocks), decoded into texts with finish reasons."""

from __future__ import annotations

from collections import defaultdict

import torch

from .requests import Job, Output


def group_by_sampling(jobs: list[Job]) -> dict:
    """{sampling settings: indices of the jobs that share them}, in first-seen order."""
    groups: dict = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.sampling].append(i)
    return groups


def run_jobs(model, jobs: list[Job], on_tokens=None, on_output=None, cancelled=None) -> list[Output | None]:
    """Generate every job on `model` (a FlexGenLite); outputs in the order of `jobs`.

    on_tokens(j, ids): after each engine step, job j's tokens so far (for streaming).
    on_output(j, output): job j's output, as soon as the engine's block that held it ends.
    cancelled(j): job j is no longer wanted; it stops at the next step and its output is None."""
    outputs: list[Output | None] = [None] * len(jobs)
    for sampling, members in group_by_sampling(jobs).items():
        want = any(jobs[i].logprobs is not None for i in members)
        report = None
        if on_tokens is not None:
            def report(i: int, ids: list[int], members=members) -> None:
                on_tokens(members[i], ids)

        def finished(block: dict, members=members, sampling=sampling) -> None:
            for i, (gen, rows) in block.items():
                j, top = members[i], jobs[members[i]].logprobs
                outputs[j] = output_of(model, gen, sampling,
                                       None if top is None else token_logprobs(model, gen, rows, top))
                if on_output is not None:
                    on_output(j, outputs[j])

        gone = None if cancelled is None else (lambda i, members=members: cancelled(members[i]))
        model.generate_ids([list(jobs[i].ids) for i in members], sampling, return_logits=want,
                           indices=[jobs[i].index for i in members], on_tokens=report, on_block=finished,
                           cancelled=gone)
    return outputs


def token_logprobs(model, gen: list[int], logits, top: int) -> list:
    """(text, log-probability, top alternatives) of each generated token, from the logits that chose it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs[torch.arange(len(gen)), torch.tensor(gen, dtype=torch.long)].tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    out = []
    for step, token in enumerate(gen):
        alternatives = [] if best is None else [
            (model.decode([t]), lp) for t, lp in zip(best.indices[step].tolist(), best.values[step].tolist(),
                                                     strict=True)]
        out.append((model.decode([token]), chosen[step], alternatives))
    return out


def output_of(model, gen: list[int], sampling, logprobs=None) -> Output:
    text = model.decode(gen, sampling.stop)
    eos = set(model.config.eos_token_id or ()) if sampling.stop_at_eos else set()
    if sampling.stop and len(text) < len(model.decode(gen)):
        reason = "stop"  # cut at a stop string
    elif gen and gen[-1] in eos:
        reason = "stop"
    else:
        reason = "length" if len(gen) >= sampling.max_new_tokens else "stop"
    return Output(gen, text, reason, logprobs)


def settled_text(model, ids: list[int], sampling) -> str:
    """The text of a sequence still being generated that later tokens cannot change: cut at a stop string,
    less a tail that may be the start of one, or a character whose bytes are not all there yet."""
    text = model.decode(ids, sampling.stop)
    held = 0
    for stop in sampling.stop:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    text = text[:len(text) - held]
    return text.rstrip("\ufffd")
