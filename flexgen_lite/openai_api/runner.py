"""Jobs through the engine (one `generate_ids` call, which sorts their prompts by length into the engine's blocks;
their sampling settings and stop conditions may differ row by row), decoded into texts with finish reasons."""

from __future__ import annotations

from ..completion_text import CONTEXT_TOKENS, context_tail
from .requests import Job, Output


def _prompt_logprobs(model, jobs: list[Job], cancelled, deferred) -> tuple[dict[int, list], set[int]]:
    """({job: its prompt's tokens as (text, log-probability, top alternatives)} for the jobs that ask (echo with
    logprobs) and are still wanted, the jobs deferred): prefill-only passes of a block of them at a time,
    `deferred` asked before each."""
    asking = [j for j, job in enumerate(jobs) if job.prompt_logprobs is not None
              and not (cancelled is not None and cancelled(j))]
    found, size = [], model.policy.block_size
    for first in range(0, len(asking), size):
        part = asking[first:first + size]
        if deferred is not None and deferred(part[0]):
            asking, later = asking[:first], set(asking[first:])
            break
        found += model.prompt_logprobs([list(jobs[j].ids) for j in part], max(jobs[j].prompt_logprobs for j in part))
    else:
        later = set()
    out = {}
    for j, places in zip(asking, found, strict=True):
        want = jobs[j].prompt_logprobs
        texts = _texts_in_context(model, list(jobs[j].ids))
        out[j] = [(text, None, None) if place is None else
                  (text, place[0], [(_text_after(model, context, a), lp) for a, lp in place[1][:want]])
                  for (text, context), place in zip(texts, places, strict=True)]
    return out, later


def token_texts(model, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text of `ids`, so that the texts join into it: what it adds to the text
    of the tokens before it (a few, for a word's leading space); a character whose bytes span tokens is the last
    one's (the others ""), a special token "" (the text skips it)."""
    return [text for text, _ in _texts_in_context(model, ids)]


def _texts_in_context(model, ids: list[int], context: list[int] = ()) -> list[tuple[str, list[int]]]:
    """token_texts, each with the tokens before it that its text was read after (for its alternatives); the first
    ones read after `context` (their prompt's last tokens: completion_text.py), unless its text ends mid-character."""
    context = context_tail(model.tokenizer, list(context)) if context else []
    if context and model.decode(context).endswith("\ufffd"):
        context = []
    seq, out, given = context + list(ids), [], len(context)  # tokens whose text is given out
    for k in range(len(context), len(seq)):
        first = max(0, given - CONTEXT_TOKENS)
        head, whole = model.decode(seq[first:given]), model.decode(seq[first:k + 1])
        if whole.endswith("\ufffd") or not whole.startswith(head):  # a character not complete yet
            out.append(("", seq[first:k]))
            continue
        out.append((whole[len(head):], seq[first:k]))
        given = k + 1
    return out


def _text_after(model, context: list[int], token: int) -> str:
    """What `token` adds to the text of `context` (an alternative's text, as the chosen token's is read)."""
    head, whole = model.decode(context), model.decode(context + [token])
    return whole[len(head):] if whole.startswith(head) else model.decode([token])


def run_jobs(model, jobs: list[Job], on_tokens=None, on_output=None, cancelled=None,
             deferred=None) -> list[Output | None]:
    """Generate every job on `model` (a FlexGenLite); outputs in the order of `jobs`.

    on_tokens(j, ids): after each engine step, job j's tokens so far (for streaming).
    on_output(j, output): job j's output, as soon as the engine's block that held it ends.
    cancelled(j): job j is no longer wanted; it stops at the next step and its output is None.
    deferred(j): asked before each engine block for the jobs yet to start: those it holds for are not run (their
    outputs None)."""
    outputs: list[Output | None] = [None] * len(jobs)
    prompt_logprobs, later = _prompt_logprobs(model, jobs, cancelled, deferred)
    for j, job in enumerate(jobs):
        if not job.generates and j not in later and not (cancelled is not None and cancelled(j)):
            outputs[j] = Output([], "", "length", None if job.logprobs is None else [], prompt_logprobs.get(j))
            if on_output is not None:
                on_output(j, outputs[j])
    members = [i for i, j in enumerate(jobs) if j.generates and i not in later]  # deferred: output None
    if not members:
        return outputs
    report = None
    if on_tokens is not None:
        def report(i: int, ids: list[int]) -> None:
            on_tokens(members[i], ids)

    def finished(block: dict) -> None:
        for i, (gen, kept) in block.items():
            j, top = members[i], jobs[members[i]].logprobs
            prompt = list(jobs[j].ids)
            outputs[j] = output_of(model, gen, jobs[j].sampling,
                                   None if top is None else token_logprobs(model, gen, kept, prompt),
                                   prompt_logprobs.get(j), prompt)
            if on_output is not None:
                on_output(j, outputs[j])

    asked = [jobs[i].logprobs for i in members]
    model.generate_ids([list(jobs[i].ids) for i in members], [jobs[i].sampling for i in members],
                       logprobs=asked if any(k is not None for k in asked) else None,
                       indices=[jobs[i].index for i in members], on_tokens=report, on_block=finished,
                       cancelled=None if cancelled is None else (lambda i: cancelled(members[i])),
                       deferred=None if deferred is None else (lambda i: deferred(members[i])))
    return outputs


def token_logprobs(model, gen: list[int], kept: list, prompt: list[int] = ()) -> list:
    """(text, log-probability, top alternatives as (text, log-probability)) of each generated token, from what
    the engine kept of the logits that chose it (generate_ids' logprobs); texts read after the prompt's."""
    return [(text, chosen, [(_text_after(model, context, t), lp) for t, lp in best])
            for (text, context), (chosen, best) in zip(_texts_in_context(model, gen, prompt), kept, strict=True)]


def output_of(model, gen: list[int], sampling, logprobs=None, prompt_logprobs=None, prompt: list[int] = ()
              ) -> Output:
    """gen's text after its prompt's (cut at a stop string), why it ended, and the log-probabilities of the tokens
    that made that text (those of a stop string that began at a token's start are not in it)."""
    text = model.decode(gen, sampling.stop, prompt)
    eos = (set(model.config.eos_token_id or ()) if sampling.stop_at_eos else set()) | set(sampling.stop_token_ids)
    if sampling.stop and len(text) < len(model.decode(gen, (), prompt)):
        reason = "stop"  # cut at a stop string
        if logprobs is not None:
            kept = next(k for k in range(len(gen) + 1) if len(model.decode(gen[:k], (), prompt)) >= len(text))
            logprobs = logprobs[:kept]
    elif gen and gen[-1] in eos:
        reason = "stop"
    else:
        reason = "length" if len(gen) >= sampling.max_new_tokens else "stop"
    return Output(gen, text, reason, logprobs, prompt_logprobs)


def settled_text(model, ids: list[int], sampling, prompt: list[int] = ()) -> str:
    """The text of a sequence still being generated (after its prompt's) that later tokens cannot change: cut at a
    stop string, less a tail that may be the start of one, or a character whose bytes are not all there yet."""
    # the split character first: a stop's start may precede it
    text = model.decode(ids, sampling.stop, prompt).rstrip("\ufffd")
    held = 0
    for stop in sampling.stop:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return text[:len(text) - held]
