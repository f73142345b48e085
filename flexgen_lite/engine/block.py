"""The state of one block of sequences (gpu_batch_size x num_gpu_batches) during generation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.logit_rules import LogitRules
from ..kernels.sampling import sample_rows


@dataclass
class Block:
    tokens: torch.Tensor  # (N, prompt_len + gen_len) on the compute device, left-padded prompts first
    pad: torch.Tensor  # (N,) left padding of each row
    prompt_len: int
    gen_len: int
    gpu_batch_size: int
    finished: torch.Tensor  # (N,) bool, on the host
    eos: tuple[int, ...]
    length: torch.Tensor  # (N,) tokens each row generated before it finished (its eos included)
    generated: int = 0  # steps taken
    generators: list[torch.Generator] | None = None  # (N,) per-row sampling generators, or None
    samplings: list | None = None  # (N,) each row's SamplingConfig where rows pick their tokens differently
    pad_host: torch.Tensor | None = None  # `pad` on the host: which batches need a mask, without a device read
    shared: int = 0  # leading columns holding only padding or the prompts' common prefix (shared_columns)
    prefix: torch.Tensor | None = None  # (1, shared) the common prefix's ids, computed once for all rows
    limit: torch.Tensor | None = None  # (N,) on the host: tokens each row may generate here, where rows differ
    ends_at_eos: torch.Tensor | None = None  # (N,) bool on the host: rows that end at eos, where rows differ
    logprobs: list[int | None] | None = None  # (N,) alternatives each row's kept logprobs list (None: none kept)
    row_logprobs: list[list] | None = None  # (N,) per row, per token it generated: (its logprob, [(id, logprob)])
    rules: LogitRules | None = None  # the rows' penalties, logit bias and min_tokens, where any row has them
    output_from: torch.Tensor | None = None  # (N,) on the device: each row's first output column (default
    # prompt_len; earlier for rows carried on from another block, whose output so far ends their prompt here)
    ended_by: torch.Tensor | None = None  # (N, E) on the device: each row's ending tokens, where rows have their own
    guides: list | None = None  # (N,) each row's guided.Guide or None, where a row's output has a form
    stopped: bool = False  # set between steps: the block ends there, its unfinished rows left to the caller
    # per batch: (active rows on the host, the same on the compute device), copied when they change
    _device_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _eos_ids: torch.Tensor | None = field(default=None, repr=False)  # eos on the compute device
    _ending: list[tuple[int, bool]] = field(default_factory=list, repr=False)  # guided rows that end after this
    # step, and whether the token they chose is kept

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], rows: int, gpu_batch_size: int, gen_len: int,
                     pad_id: int, eos: tuple[int, ...], device: torch.device,
                     generators: list[torch.Generator] | None = None, share_prefix: bool = False,
                     limits: list[int] | None = None) -> Block:
        """Left-pad `prompts` into a block of `rows`; rows past len(prompts) are filler, finished at once.

        `generators`, one per row, make each row's samples independent of the other rows. `share_prefix`: a
        common prefix worth it (shared_columns) is computed once in the prefill, not once per row. `limits`: the
        tokens each prompt may generate, where they differ (rows carried on from another block; gen_len their
        largest)."""
        prompt_len = max(len(p) for p in prompts)
        tokens = torch.full((rows, prompt_len + gen_len), pad_id, dtype=torch.long)
        pad = torch.full((rows,), prompt_len - 1, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):prompt_len] = torch.tensor(p, dtype=torch.long)
            pad[i] = prompt_len - len(p)
        tokens[len(prompts):, prompt_len - 1] = prompts[0][-1]
        finished = torch.zeros(rows, dtype=torch.bool)
        finished[len(prompts):] = True
        length = torch.zeros(rows, dtype=torch.long)
        if generators is not None and len(generators) != rows:
            raise ValueError(f"{len(generators)} generators for a block of {rows} rows")
        shared = shared_columns(prompts) if share_prefix else 0
        prefix = torch.tensor([prompts[0][:shared]], device=device) if shared else None
        limit = None
        if limits is not None:
            limit = torch.full((rows,), gen_len, dtype=torch.long)
            limit[:len(limits)] = torch.tensor(limits, dtype=torch.long)
        return cls(tokens.to(device), pad.to(device), prompt_len, gen_len, gpu_batch_size, finished, eos, length,
                   generators=generators, pad_host=pad, shared=shared, prefix=prefix, limit=limit)

    def rows(self, batch: int) -> slice:
        return slice(batch * self.gpu_batch_size, (batch + 1) * self.gpu_batch_size)

    def row_generators(self, batch: int, active: torch.Tensor | None = None) -> list[torch.Generator] | None:
        """The per-row sampling generators of GPU batch `batch`'s active rows (None: the global RNG)."""
        return self._of_rows(self.generators, batch, active)

    def row_samplings(self, batch: int, active: torch.Tensor | None = None) -> list | None:
        """Each of GPU batch `batch`'s active rows' SamplingConfig (None: the block's, for every row)."""
        return self._of_rows(self.samplings, batch, active)

    def _of_rows(self, values: list | None, batch: int, active: torch.Tensor | None) -> list | None:
        if values is None:
            return None
        values = values[self.rows(batch)]
        return values if active is None else [values[i] for i in active.tolist()]

    def choose(self, batch: int, active: torch.Tensor | None, active_device: torch.Tensor | None,
               logits: torch.Tensor, sampling) -> torch.Tensor:
        """The next token of GPU batch `batch`'s active rows (`active` on the host, `active_device` on the compute
        device; None: all) from their `logits`: by each row's rules and sampling (`sampling`: where rows do not
        have their own), and for a guided row by its form."""
        logits = self.ruled(batch, active_device, logits)
        ids = sample_rows(logits, self.row_samplings(batch, active) or sampling, self.row_generators(batch, active))
        if self.guides is None:
            return ids
        first = batch * self.gpu_batch_size
        rows = range(first, first + logits.shape[0]) if active is None else (first + active).tolist()
        guided = [(i, row) for i, row in enumerate(rows) if self.guides[row] is not None]
        if not guided:
            return ids
        index = torch.tensor([i for i, _ in guided], device=logits.device)
        picked = ids[index].tolist()
        for k, ((_, row), row_logits) in enumerate(zip(guided, logits[index].float().cpu(), strict=True)):
            config = self.samplings[row] if self.samplings is not None else sampling
            generator = self.generators[row] if self.generators is not None else None
            token, ends = self.guides[row].pick(row_logits, config, generator, picked[k])
            if ends:  # its form is whole and cannot grow, or nothing keeps it (no token: this one is dropped)
                self._ending.append((row, token is not None))
            picked[k] = picked[k] if token is None else token
        ids = ids.clone()
        ids[index] = torch.tensor(picked, device=ids.device)
        return ids

    def ruled(self, batch: int, active_device: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """The logits (rows: GPU batch `batch`'s active ones, `active_device` on the compute device; None: all)
        after the rows' rules (logit_rules.py), or as they are where no row has any."""
        if self.rules is None:
            return logits
        first = batch * self.gpu_batch_size
        rows = (torch.arange(first, first + logits.shape[0], device=logits.device) if active_device is None
                else active_device + first)
        if self.output_from is None:
            self.output_from = torch.full_like(self.pad, self.prompt_len)
        return self.rules.apply(logits, rows, self.tokens, self.pad, self.output_from,
                                self.prompt_len + self.generated)

    def batch_done(self, batch: int) -> bool:
        return bool(self.finished[self.rows(batch)].all())

    def step_span(self, step: int) -> tuple[int, int]:
        """(first position computed per row, number of them) for a step; step 0 is the prefill: of a shared
        prefix's columns only the prefix is computed (once, before the rows), and the cache is written from 0."""
        return (self.shared, self.prompt_len - self.shared) if step == 0 else (self.prompt_len + step - 1, 1)

    def positions(self, batch: int, start: int, t: int) -> torch.Tensor:
        pos = torch.arange(start, start + t, device=self.tokens.device)[None] - self.pad[self.rows(batch), None]
        return pos.clamp(min=-1)

    def mask(self, batch: int, start: int, t: int) -> torch.Tensor:
        """(rows, 1, t, start + t) bool: causal, padding hidden; a padding query sees itself (no NaN)."""
        device = self.tokens.device
        q = torch.arange(start, start + t, device=device)[:, None]
        k = torch.arange(start + t, device=device)[None]
        real = k[None] >= self.pad[self.rows(batch), None, None]
        return ((k <= q)[None] & (real | (k == q)[None]))[:, None]

    def windowed(self, batch: int, start: int, t: int, window: int, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask` (None: causal, no row padded) with each query's keys limited to its sliding window: a query at
        position p sees positions p - window < q <= p (by positions, so that packed rows are windowed too)."""
        if mask is None:
            mask = self.mask(batch, start, t)
        pos = self.positions(batch, 0, start + t)
        return mask & (pos[:, start:, None] - pos[:, None, :] < window)[:, None]

    def padded(self, batch: int, active: torch.Tensor | None) -> bool:
        """Whether a row of GPU batch `batch` still generating is padded (else attention needs no mask)."""
        pad = self.host_pad()[self.rows(batch)]
        return bool((pad if active is None else pad[active]).any())

    def host_pad(self) -> torch.Tensor:
        return self.pad_host if self.pad_host is not None else self.pad.cpu()

    def keep_logprobs(self, batch: int, logits: torch.Tensor, active: torch.Tensor | None) -> None:
        """Of the rows of GPU batch `batch` that chose their token this step (`active`; None: all) and keep
        logprobs: the chosen token's log-probability and the likeliest tokens' (as many as the row asked), from
        `logits`, their rows' logits: a few numbers a token, not the vocabulary's."""
        first = batch * self.gpu_batch_size
        rows = range(first, first + logits.shape[0]) if active is None else [first + i for i in active.tolist()]
        want = [(i, row) for i, row in enumerate(rows) if self.logprobs[row] is not None]
        if not want:
            return
        device = logits.device
        logprobs = logits[torch.tensor([i for i, _ in want], device=device)].float().log_softmax(-1)
        chosen = self.tokens[torch.tensor([row for _, row in want], device=device), self.prompt_len + self.generated]
        top = logprobs.topk(max(self.logprobs[row] for _, row in want), dim=-1)
        values = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for j, (_, row) in enumerate(want):
            k = self.logprobs[row]
            self.row_logprobs[row].append((values[j], list(zip(top_ids[j][:k], top_values[j][:k], strict=True))))

    def active_rows(self, batch: int) -> torch.Tensor | None:
        """Rows of GPU batch `batch` still generating (host indices within the batch); None when all are."""
        done = self.finished[self.rows(batch)]
        return (~done).nonzero().squeeze(1) if done.any() else None

    def device_rows(self, batch: int, active: torch.Tensor) -> torch.Tensor:
        """`active` on the compute device, copied only when the batch's active rows changed."""
        cached = self._device_rows.get(batch)
        if cached is None or cached[0].shape != active.shape or not torch.equal(cached[0], active):
            cached = self._device_rows[batch] = (active, active.to(self.tokens.device))
        return cached[1]

    def record(self, batch: int, next_ids: torch.Tensor, active: torch.Tensor | None,
               active_device: torch.Tensor | None = None) -> None:
        """Store the tokens the active rows of one GPU batch chose at this step (`active_device`: `active` on
        the compute device, when the caller has it)."""
        rows, column = self.rows(batch), self.prompt_len + self.generated
        if active is None:
            self.length[rows] += 1
            self.tokens[rows, column] = next_ids
            return
        self.length[rows.start + active] += 1
        if active_device is None:
            active_device = self.device_rows(batch, active)
        self.tokens[rows.start + active_device, column] = next_ids

    def end_step(self) -> None:
        """Rows that emitted eos this step finish (those that end at eos; one device-to-host read per step, not per
        batch), and rows that reached their own limit."""
        if self.ended_by is not None:  # rows with stop tokens of their own
            column = self.tokens[:, self.prompt_len + self.generated]
            self.finished |= (column[:, None] == self.ended_by).any(-1).cpu()
        elif self.eos:
            column = self.tokens[:, self.prompt_len + self.generated]
            if self._eos_ids is None:
                self._eos_ids = torch.tensor(self.eos, device=column.device)
            hit = torch.isin(column, self._eos_ids).cpu()
            self.finished |= hit if self.ends_at_eos is None else hit & self.ends_at_eos
        if self.limit is not None:
            self.finished |= self.length >= self.limit
        for row, kept in self._ending:  # guided rows whose form is whole and cannot grow, or is out of reach
            self.finished[row] = True
            self.length[row] -= int(not kept)
            if not kept and self.logprobs is not None and self.logprobs[row] is not None:
                self.row_logprobs[row].pop()  # the dropped token's
        self._ending.clear()
        self.generated += 1

    def new_tokens(self, row: int, last: int | None = None) -> list[int]:
        """The tokens the row generated here (only its `last` ones, where given)."""
        end = self.prompt_len + int(self.length[row])
        start = self.prompt_len if last is None else max(self.prompt_len, end - last)
        return self.tokens[row, start:end].tolist()


MIN_SHARED = 16  # fewer common tokens (a bos, a chat template's first line) are not worth a pass of their own
MIN_SAVED = 0.1  # nor is a prefix that saves less of the prefill's row-positions than this (filler rows, finished
# from the start, are not computed: the prompts' rows count)


def shared_columns(prompts: list[list[int]]) -> int:
    """Leading columns of the left-padded block holding, in every row, only padding or the prompts' common
    prefix: row i's columns [pad_i, C) are the prefix's first C - pad_i tokens, so their keys and values are
    the prefix's own, computed once. C is the common prefix less at least one token of the shortest prompt
    (each row's last position makes its first logits); 0 where that saves too little (MIN_SHARED, MIN_SAVED)."""
    if len(prompts) < 2:
        return 0
    common, longest = common_prefix(prompts), max(len(p) for p in prompts)
    saved = sum(max(0, common - (longest - len(p))) for p in prompts) - common
    return common if common >= MIN_SHARED and saved >= MIN_SAVED * len(prompts) * longest else 0


def block_order(prompts: list[list[int]], by_prefix: bool) -> list[int]:
    """The order prompts are cut into blocks: longest first, so that similar lengths share a block (little
    padding). by_prefix: prompts that begin with the same MIN_SHARED tokens as another are gathered first (each
    group longest first, groups by their longest), so a job of several instructions or few-shot sets has one per
    block where it can (shared_columns); the others keep their places by length."""
    if not by_prefix:
        return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    first: dict[tuple, int] = {}  # a group: the first prompt with its head; a prompt too short for one, its own
    group = [first.setdefault(tuple(p[:MIN_SHARED]), i) if len(p) > MIN_SHARED else i for i, p in enumerate(prompts)]
    longest: dict[int, int] = {}
    for p, g in zip(prompts, group, strict=True):
        longest[g] = max(longest.get(g, 0), len(p))
    return sorted(range(len(prompts)), key=lambda i: (-longest[group[i]], group[i], -len(prompts[i])))


def common_prefix(prompts: list[list[int]]) -> int:
    """Tokens all `prompts` begin with, less at least the shortest one's last (a prompt's own last position
    makes its first logits)."""
    shortest = min(prompts, key=len)
    for i, token in enumerate(shortest[:-1]):
        if any(p[i] != token for p in prompts):
            return i
    return len(shortest) - 1


def layer_mask(inputs: dict, config, layer: int) -> torch.Tensor | None:
    """A batch's attention mask for decoder layer `layer`: limited to its sliding window where that hides a
    position (inputs from the schedule's _batch_inputs), else the batch's mask (None: causal, no row padded)."""
    return inputs["masks"].get(config.window(layer), inputs["mask"])
