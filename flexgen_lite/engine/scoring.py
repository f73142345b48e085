"""Prefill-only scoring through the block engine: the log-likelihood of chosen continuations, no generation.

Requests are grouped into blocks by length as generation's prompts are; each block runs one prefill under the
model's policy (placement, compression, CPU attention, budgets), and at the head the logits of each row's scored
positions become log-probabilities there, in chunks (vocab x positions x rows in fp32 can be large)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..kernels.sampling import SamplingConfig
from .block import MIN_SHARED, Block

# bytes of fp32 logits (and their log-softmax) computed at once at the head
CHUNK_BYTES = 256 * 2**20


@dataclass
class ScoreStats:
    """What the last scoring call did: rows scored, tokens through the prefill (padding excluded), seconds."""
    rows: int = 0
    tokens: int = 0  # context + continuation less one, per request (what a batch of rows each would feed)
    seconds: float = 0.0
    fed: int = 0  # tokens through the prefill: fewer where requests share a context
    blocks: list[float] = field(default_factory=list)  # seconds per block
    shared: list[int] = field(default_factory=list)  # per block, its rows' first positions computed once

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   progress: Callable[[str], None] | None = None, max_len: int | None = None
                   ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
    (context ids, continuation ids), in the order given. As lm-eval's hf model: context + continuation is cut
    from the left to `max_len` (default: the model's context) plus one, its last token is not fed."""
    max_len = context_length(model, max_len)
    inputs, targets, contexts = [], [], {}
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError(f"request {i} has an empty {'context' if not context else 'continuation'}: "
                             "give a context of at least one token (a bos or eos token) and a continuation")
        if len(continuation) > max_len:  # cut, it would be scored in part (helper-43); lm-eval's hf model refuses it
            raise ValueError(f"request {i}'s continuation has {len(continuation)} tokens, more than the "
                             f"{max_len} a request can score (max_length): shorten it")
        full = (context + continuation)[-(max_len + 1):]
        ids = full[:-1]
        if max(full) >= model.config.vocab_size or min(full) < 0:
            raise ValueError(f"request {i} has token ids outside the vocabulary (0..{model.config.vocab_size - 1})")
        inputs.append(ids)
        targets.append(full[-min(len(continuation), len(ids)):])
        if len(context) + len(continuation) <= max_len + 1:  # not cut: may share its context's row
            contexts.setdefault(tuple(context), []).append((i, continuation))
    rows = _rows(inputs, targets, contexts, max_len)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    rows.sort(key=lambda r: -len(r.tokens))  # similar lengths share a block
    stats = model.score_stats = ScoreStats(rows=len(inputs), tokens=sum(len(i) for i in inputs),
                                           fed=sum(len(r.tokens) for r in rows))
    blocks = -(-len(rows) // model.policy.block_size)
    tic = time.perf_counter()
    def sums(head, h: torch.Tensor, index: torch.Tensor, keys: list[int], chunk: int) -> None:
        requests = sorted(set(keys))
        which = {q: n for n, q in enumerate(requests)}
        index = torch.cat([index, torch.tensor([which[q] for q in keys], device=index.device)[:, None]], 1)
        logprob, greedy = _logprobs(head, h, index, len(requests), chunk)
        for q, lp, g in zip(requests, logprob.tolist(), greedy.tolist(), strict=True):
            results[q] = (lp, g)

    done = 0
    for number, block in enumerate(_blocks(model, rows), start=1):
        started = time.perf_counter()
        stats.shared.append(_score_block(model, block, sums))
        stats.blocks.append(time.perf_counter() - started)
        done += len(block)
        blocks = number + -(-(len(rows) - done) // model.shapes.planned.block_size)
        report = progress or model.progress
        if report is not None:
            rate = sum(len(r.tokens) for r in rows[:done]) / (time.perf_counter() - tic)
            report(f"scoring: block {number}/{blocks} done, {done}/{len(rows)} rows, {rate:.0f} tok/s")
    stats.seconds = time.perf_counter() - tic
    return results


@dataclass
class _Row:
    """One prefill row: its tokens, their positions and segments (None: 0, 1, ... and one segment), and the
    scored places: (index in the row, target token, request)."""
    tokens: list[int]
    scored: list[tuple[int, int, int]]
    positions: list[int] | None = None
    segments: list[int] | None = None


def _rows(inputs, targets, contexts: dict, max_len: int) -> list[_Row]:
    """A row per request, except that requests sharing a context (multiple choice) share a row: the context
    once (segment 0), then each continuation but its last token (segment s, positions after the context), each
    segment attending to the context and itself only; the context's last position scores every first token."""
    rows, packed = [], set()
    for context, members in contexts.items():
        if len(members) < 2:
            continue
        row = None
        for i, cont in members:
            if row is None or len(row.tokens) + len(cont) - 1 > max_len:
                row = _Row(list(context), [], list(range(len(context))), [0] * len(context))
                rows.append(row)
            seg, at = row.segments[-1] + 1, len(row.tokens)
            row.scored.append((len(context) - 1, cont[0], i))
            row.scored += [(at + m, cont[m + 1], i) for m in range(len(cont) - 1)]
            row.tokens += cont[:-1]
            row.positions += range(len(context), len(context) + len(cont) - 1)
            row.segments += [seg] * (len(cont) - 1)
            packed.add(i)
    for i, (ids, t) in enumerate(zip(inputs, targets, strict=True)):
        if i not in packed:
            rows.append(_Row(ids, [(len(ids) - len(t) + n, token, i) for n, token in enumerate(t)]))
    return rows


class _PackedBlock(Block):
    """A block whose rows carry their own positions and segments (Block's masks and positions otherwise)."""
    seg: torch.Tensor  # (N, prompt_len): segment of each token, -1 for padding
    pos: torch.Tensor  # (N, prompt_len)

    def positions(self, batch: int, start: int, t: int) -> torch.Tensor:
        return self.pos[self.rows(batch), start:start + t]

    def mask(self, batch: int, start: int, t: int) -> torch.Tensor:
        seg = self.seg[self.rows(batch)]
        q, k = seg[:, start:start + t, None], seg[:, None, :start + t]
        i = torch.arange(start, start + t, device=seg.device)[:, None]
        j = torch.arange(start + t, device=seg.device)[None]
        seen = (j <= i)[None] & (k >= 0) & ((k == 0) | (k == q))
        return (seen | (j == i)[None])[:, None]

    def padded(self, batch: int, active: torch.Tensor | None) -> bool:
        return True


def _blocks(model, rows: list[_Row]):
    """The rows (longest first) a block at a time: the policy's block, or fewer where a block of it at their length
    would pass the budgets (FlexGenLite.block_rows)."""
    first = 0
    while first < len(rows):
        ahead = rows[first:first + model.shapes.planned.block_size]
        size = model.block_rows([len(r.tokens) for r in ahead], 1)
        yield ahead[:size]
        first += size


def _score_block(model, rows: list[_Row], measure: Callable) -> int:
    """Run a block of rows' prefill; measure(head, h, index, keys, chunk) gets each GPU batch's scored places
    (`index`: row of h, column, target; `keys`: each place's key from _Row.scored) and how many of them to make
    logits for at once. Returns block.shared."""
    cfg, policy, device = model.config, model.policy, model.device.device
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or [0])[0]
    block = _PackedBlock.from_prompts([r.tokens for r in rows], policy.block_size, policy.gpu_batch_size, 1,
                                      pad_id, (), device, share_prefix=policy.share_prefix)
    n, width = block.tokens.shape[0], block.prompt_len
    _scored_after_prefix(block, rows)
    seg, pos = torch.full((n, width), -1, dtype=torch.long), torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pad = width - len(row.tokens)
        seg[r, pad:] = torch.tensor(row.segments) if row.segments else 0
        pos[r, pad:] = torch.tensor(row.positions) if row.positions else torch.arange(len(row.tokens))
    block.seg, block.pos = seg.to(device), pos.to(device)
    model._check_cache_fits(block)
    chunk = _chunk_places(model, block.prompt_len)

    def score(b: int, active: torch.Tensor | None, head, h: torch.Tensor) -> None:
        span = block.rows(b)
        local = range(span.stop - span.start) if active is None else active.tolist()
        places = [(j, col + width - len(rows[span.start + r].tokens) - block.shared, target, request)
                  for j, r in enumerate(local) if span.start + r < len(rows)
                  for col, target, request in rows[span.start + r].scored]
        if not places:
            return
        index = torch.tensor([[j, col, t] for j, col, t, _ in places]).to(h.device)
        measure(head, h, index, [p[3] for p in places], chunk)

    model.engine.run(block, SamplingConfig(max_new_tokens=1, stop_at_eos=False), score=score)
    return block.shared


def _scored_after_prefix(block: Block, rows: list[_Row]) -> None:
    """A shared prefix (Block.shared_columns: a few-shot set or instruction before every question) only up to each
    row's first scored column: the prefill gives the head the columns after it. Its tokens are then all of
    segment 0 (a context), which attends causally, as the prefix's one row does."""
    first = min(block.prompt_len - len(r.tokens) + min(col for col, _, _ in r.scored) for r in rows)
    if block.shared > first:
        block.shared = first if first >= MIN_SHARED else 0
        block.prefix = block.prefix[:, :block.shared] if block.shared else None


def _chunk_places(model, prompt_len: int) -> int:
    """Scored places whose logits (and their log-softmax: fp32, ~3 copies) are made at once: CHUNK_BYTES' worth,
    or what the budgets leave beside the block's planned peak (which counts a GPU batch's logits) where less."""
    vocab = model.config.vocab_size
    room = model.room_beside(prompt_len, 1)
    counted = model.policy.gpu_batch_size * vocab * (model.dtype.itemsize + 8)
    room = CHUNK_BYTES if room is None else min(CHUNK_BYTES, room + counted)
    return max(1, int(room) // (vocab * 4 * 3))


def _logprobs(head, h: torch.Tensor, index: torch.Tensor, requests: int, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For scored places `index` (row of h, position, target, request): per request the fp32 sum of the
    targets' log-softmax, and whether the argmax is the target at each of its places; the logits made for
    `chunk` places at a time."""
    sums = torch.zeros(requests, device=h.device)
    misses = torch.zeros(requests, dtype=torch.long, device=h.device)
    for c in range(0, len(index), chunk):
        rows, cols, t, q = index[c:c + chunk].unbind(1)
        logits = head(h[rows, cols])
        lp = torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1)
        sums.index_add_(0, q, lp)
        misses.index_add_(0, q, (logits.argmax(-1) != t).long())
    return sums.cpu(), (misses == 0).cpu()


def prompt_logprobs(model, prompts: Sequence[Sequence[int]], top: int = 0
                    ) -> list[list[tuple[float, list[tuple[int, float]]] | None]]:
    """Per prompt (token ids), per token: None for the first (nothing predicts it), then (log p(token | the
    tokens before it), the `top` likeliest tokens there as (id, log-probability)): one prefill per block of
    prompts, no generation, under the model's policy. Identical prompts are computed once."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be a whole number of alternatives, 0 or more, got {top!r}")
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i} is empty")
        if len(p) > model.config.max_positions:
            raise ValueError(f"prompt {i} has {len(p)} tokens, past the model's context of "
                             f"{model.config.max_positions} positions: shorten it")
    top = min(top, model.config.vocab_size)
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    found: dict = {}
    rows = [_Row(list(p[:-1]), [(n, p[n + 1], (u, n + 1)) for n in range(len(p) - 1)])
            for u, p in enumerate(unique) if len(p) > 1]
    rows.sort(key=lambda r: -len(r.tokens))
    vocab = model.config.vocab_size
    if any(min(p) < 0 or max(p) >= vocab for p in unique if p):
        raise ValueError(f"a prompt has token ids outside the vocabulary (0..{vocab - 1})")

    def each(head, h: torch.Tensor, index: torch.Tensor, keys: list, chunk: int) -> None:
        for c in range(0, len(index), chunk):
            rows_, cols, t = index[c:c + chunk].unbind(1)
            lp = torch.log_softmax(head(h[rows_, cols]).float(), dim=-1)
            chosen = lp.gather(-1, t[:, None]).squeeze(-1).tolist()
            best = lp.topk(top, dim=-1) if top else None
            for n, key in enumerate(keys[c:c + chunk]):
                found[key] = (chosen[n], [] if best is None else
                              list(zip(best.indices[n].tolist(), best.values[n].tolist(), strict=True)))

    for block in _blocks(model, rows):
        _score_block(model, block, each)
    by_prompt = [[None] + [found[(u, n)] for n in range(1, len(p))] if p else [] for u, p in enumerate(unique)]
    where = {p: u for u, p in enumerate(unique)}
    return [by_prompt[where[tuple(p)]] for p in prompts]


def context_length(model, max_len: int | None) -> int:
    """Positions a scored row may hold: `max_len` (at most the model's context), default the model's context."""
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a whole number >= 1 (or None: the model's context), got {max_len!r}")
    return min(max_len or model.config.max_positions, model.config.max_positions)


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
    max_len = context_length(model, max_len)
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
