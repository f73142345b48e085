"""Jobs through the engine: grouped by sampling settings (one `generate_ids` call per group, which sorts its
prompts by length into the engine's blocks), decoded into texts with finish reasons."""

from __future__ import annotations

from collections import defaultdict

from .requests import Job, Output


def group_by_sampling(jobs: list[Job]) -> dict:
    """{sampling settings: indices of the jobs that share them}, in first-seen order."""
    groups: dict = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.sampling].append(i)
    return groups


def run_jobs(model, jobs: list[Job]) -> list[Output]:
    """Generate every job on `model` (a FlexGenLite); outputs in the order of `jobs`."""
    outputs: list[Output | None] = [None] * len(jobs)
    for sampling, members in group_by_sampling(jobs).items():
        generated = model.generate_ids([list(jobs[i].ids) for i in members], sampling,
                                       indices=[jobs[i].index for i in members])
        for i, gen in zip(members, generated, strict=True):
            outputs[i] = output_of(model, gen, sampling)
    return outputs


def output_of(model, gen: list[int], sampling) -> Output:
    text = model.decode(gen, sampling.stop)
    eos = set(model.config.eos_token_id or ()) if sampling.stop_at_eos else set()
    if sampling.stop and len(text) < len(model.decode(gen)):
        reason = "stop"  # cut at a stop string
    elif gen and gen[-1] in eos:
        reason = "stop"
    else:
        reason = "length" if len(gen) >= sampling.max_new_tokens else "stop"
    return Output(gen, text, reason)


def text_pieces(model, gen: list[int], sampling, text: str) -> list[str]:
    """`text` cut where each token ends (for streaming): the pieces join to `text`."""
    pieces, done = [], 0
    for k in range(1, len(gen) + 1):
        upto = min(len(model.decode(gen[:k])), len(text))
        if upto > done:
            pieces.append(text[done:upto])
            done = upto
    if done < len(text):
        pieces.append(text[done:])
    return pieces
