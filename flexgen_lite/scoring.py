"""Prefill-only scoring through the block engine: the log-likelihood of chosen continuations, no generation.

Requests are grouped into blocks by length as generation's prompts are; each block runs one prefill under the
model's policy (placement, compression, CPU attention, budgets), and at the head the logits of each row's scored
positions become log-probabilities there, in chunks (vocab x positions x rows in fp32 can be large)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .block import Block
from .sampling import SamplingConfig

# bytes of fp32 logits (and their log-softmax) computed at once at the head
CHUNK_BYTES = 256 * 2**20


@dataclass
class ScoreStats:
    """What the last scoring call did: rows scored, tokens through the prefill (padding excluded), seconds."""
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    blocks: list[float] = field(default_factory=list)  # seconds per block

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   progress: Callable[[str], None] | None = None, max_len: int | None = None
                   ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
    (context ids, continuation ids), in the order given. As lm-eval's hf model: context + continuation is cut
    from the left to `max_len` (default: the model's context) plus one, its last token is not fed."""
    max_len = min(max_len or model.config.max_positions, model.config.max_positions)
    inputs, targets = [], []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError(f"request {i} has an empty {'context' if not context else 'continuation'}: "
                             "give a context of at least one token (a bos or eos token) and a continuation")
        full = (context + continuation)[-(max_len + 1):]
        ids = full[:-1]
        if max(full) >= model.config.vocab_size or min(full) < 0:
            raise ValueError(f"request {i} has token ids outside the vocabulary (0..{model.config.vocab_size - 1})")
        inputs.append(ids)
        targets.append(full[-min(len(continuation), len(ids)):])
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths share a block
    size = model.policy.block_size
    stats = model.score_stats = ScoreStats(rows=len(inputs), tokens=sum(len(i) for i in inputs))
    blocks = -(-len(order) // size)
    tic = time.perf_counter()
    for first in range(0, len(order), size):
        chosen = order[first:first + size]
        started = time.perf_counter()
        _score_block(model, [inputs[i] for i in chosen], [targets[i] for i in chosen], chosen, results)
        stats.blocks.append(time.perf_counter() - started)
        report = progress or model.progress
        if report is not None:
            done = min(first + size, len(order))
            rate = sum(len(inputs[i]) for i in order[:done]) / (time.perf_counter() - tic)
            report(f"scoring: block {first // size + 1}/{blocks} done, {done}/{len(order)} requests, "
                   f"{rate:.0f} tok/s")
    stats.seconds = time.perf_counter() - tic
    return results


def _score_block(model, inputs: list[list[int]], targets: list[list[int]], places: list[int],
                 results: list) -> None:
    cfg, policy, device = model.config, model.policy, model.device.device
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or [0])[0]
    block = Block.from_prompts(inputs, policy.block_size, policy.gpu_batch_size, 1, pad_id, (), device)
    model._check_cache_fits(block)

    def score(b: int, active: torch.Tensor | None, head, h: torch.Tensor) -> None:
        rows = block.rows(b)
        local = range(rows.stop - rows.start) if active is None else active.tolist()
        rows_of_h = [(j, rows.start + r) for j, r in enumerate(local) if rows.start + r < len(inputs)]
        if not rows_of_h:
            return
        k = max(len(targets[row]) for _, row in rows_of_h)
        tgt = torch.zeros((len(rows_of_h), k), dtype=torch.long)
        valid = torch.zeros((len(rows_of_h), k), dtype=torch.bool)
        for n, (_, row) in enumerate(rows_of_h):  # right-aligned: the scored positions end the row
            t = targets[row]
            tgt[n, k - len(t):] = torch.tensor(t)
            valid[n, k - len(t):] = True
        tgt, valid = tgt.to(h.device), valid.to(h.device)
        picked = torch.tensor([j for j, _ in rows_of_h], device=h.device)
        logprob, greedy = _logprobs(head, h, picked, k, tgt, valid, cfg.vocab_size)
        for n, (_, row) in enumerate(rows_of_h):
            results[places[row]] = (float(logprob[n]), bool(greedy[n]))

    model.engine.run(block, SamplingConfig(max_new_tokens=1, stop_at_eos=False), score=score)


def _logprobs(head, h: torch.Tensor, picked: torch.Tensor, k: int, tgt: torch.Tensor, valid: torch.Tensor,
              vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of h[picked]: the fp32 sum of log-softmax at its last k positions taken at `tgt` where `valid`,
    and whether the argmax is `tgt` at every valid position; the logits made a chunk of rows x positions at a
    time."""
    positions = max(1, CHUNK_BYTES // (vocab * 4 * 3))
    span = min(k, positions)
    rows_at_once = max(1, positions // span)
    sums = torch.zeros(len(picked), device=h.device)
    greedy = torch.ones(len(picked), dtype=torch.bool, device=h.device)
    for r in range(0, len(picked), rows_at_once):
        sel = picked[r:r + rows_at_once]
        for p in range(0, k, span):
            end = min(k, p + span)
            x = h[sel, h.shape[1] - k + p:h.shape[1] - k + end]
            logits = head(x)
            t, ok = tgt[r:r + len(sel), p:end], valid[r:r + len(sel), p:end]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, t[..., None]).squeeze(-1)
            sums[r:r + len(sel)] += torch.where(ok, lp, 0).sum(-1)
            greedy[r:r + len(sel)] &= ((logits.argmax(-1) == t) | ~ok).all(-1)
    return sums.cpu(), greedy.cpu()


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token of `tokens` once, each with as much preceding
    text as fits in `max_len` positions (the first after `prefix_token`): lm-eval's rolling windows with a
    context of one token, made disjoint."""
    tokens = list(tokens)
    windows = []
    first = min(max_len, len(tokens))
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[end - max_len - 1:end - 1], tokens[end - n:end]))
        done += n
    return [(context[:len(context) - (len(cont) - 1)], cont) for context, cont in windows]


def loglikelihood_rolling(model, documents: Sequence[Sequence[int]], prefix_token: int | None = None,
                          progress: Callable[[str], None] | None = None, max_len: int | None = None) -> list[float]:
    """The log-likelihood of each whole document (token ids), in windows of up to `max_len` tokens (default: the
    model's context); the first token is predicted after `prefix_token` (default: the model's bos, else its
    eos)."""
    max_len = min(max_len or model.config.max_positions, model.config.max_positions)
    if prefix_token is None:
        cfg = model.config
        prefix_token = cfg.bos_token_id if getattr(cfg, "bos_token_id", None) is not None else \
            (cfg.eos_token_id or [0])[0]
    requests, owner = [], []
    for d, doc in enumerate(documents):
        if not doc:
            raise ValueError(f"document {d} is empty")
        for window in rolling_windows(doc, prefix_token, max_len):
            requests.append(window)
            owner.append(d)
    sums = [0.0] * len(documents)
    for d, (logprob, _) in zip(owner, score_requests(model, requests, progress, max_len), strict=True):
        sums[d] += logprob
    return sums
