"""What a row's settings do to its logits before it picks a token, in vLLM's order: min_tokens (no eos or stop
token before them), OpenAI's logit_bias, then the repetition penalty (transformers' rule, over the prompt and the
output: a seen token's positive logit divided by it, a negative one multiplied), the frequency penalty (OpenAI's:
subtracted once per time the output holds the token) and the presence penalty (once if it holds it). Temperature,
min-p, top-k and top-p follow (sampling.py). Logprobs are the model's, before these rules (vLLM's default).

Every tensor lives on the compute device and is indexed by device-side rows: a step reads nothing back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import SamplingConfig


@dataclass
class LogitRules:
    """A block's rows' rules, (N, ...) tensors on the compute device; `uses` names the rules any row has."""

    repetition: torch.Tensor  # (N,) float, 1: none
    frequency: torch.Tensor  # (N,) float
    presence: torch.Tensor  # (N,) float
    min_tokens: torch.Tensor  # (N,) long: eos and stop tokens banned while the output holds fewer
    ended_by: torch.Tensor  # (N, E) long: each row's eos and stop tokens, -1 where it has fewer
    bias_ids: torch.Tensor  # (N, K) long: each row's logit_bias ids (padded with 0, whose bias is 0)
    bias: torch.Tensor  # (N, K) float
    uses: frozenset[str]

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig], eos: Sequence[int], device: torch.device) -> LogitRules | None:
        """The rules of a block's rows (`configs`, fillers included; `eos`: the model's), None where no row has
        one (the step then pays nothing for them)."""
        if not any(c.rules() for c in configs):
            return None
        most = max(1, max(len(c.logit_bias) for c in configs))
        bias_ids = torch.zeros((len(configs), most), dtype=torch.long)
        bias = torch.zeros((len(configs), most))
        for row, c in enumerate(configs):
            if c.logit_bias:
                bias_ids[row, :len(c.logit_bias)] = torch.tensor([i for i, _ in c.logit_bias])
                bias[row, :len(c.logit_bias)] = torch.tensor([v for _, v in c.logit_bias])
        uses = {name for name, on in (("repetition", any(c.repetition_penalty != 1 for c in configs)),
                                      ("counts", any(c.frequency_penalty or c.presence_penalty for c in configs)),
                                      ("min_tokens", any(c.min_tokens for c in configs)),
                                      ("bias", any(c.logit_bias for c in configs))) if on}
        floats = [torch.tensor([getattr(c, name) for c in configs]) for name in
                  ("repetition_penalty", "frequency_penalty", "presence_penalty")]
        return cls(*(t.to(device) for t in floats), torch.tensor([c.min_tokens for c in configs]).to(device),
                   ending_tokens(configs, eos, device, always=True), bias_ids.to(device), bias.to(device),
                   frozenset(uses))

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, context_from: torch.Tensor,
              output_from: torch.Tensor, end: int) -> torch.Tensor:
        """`logits` (R, vocab) of block rows `rows` (R,) with the rules applied (a new tensor: the model's logits
        stay as they were for logprobs). tokens: the block's (N, columns); a row's context is its columns from
        `context_from` (its left padding's end) to `end`, its output from `output_from` (tokens carried from an
        earlier block are output too). Each rule touches only the tokens it names (a few per row), never a pass
        over the vocabulary: SmolLM2's 64 rows took 11 ms a step through vocabulary-wide counts."""
        logits = logits.float().clone()
        start = output_from[rows]
        if "bias" in self.uses:
            logits.scatter_add_(1, self.bias_ids[rows], self.bias[rows])
        if not self.uses & {"repetition", "counts"}:
            return self._min_tokens(logits, rows, start, end)
        history, columns = tokens[rows, :end], torch.arange(end, device=logits.device)
        if "repetition" in self.uses:  # a seen token's logit set once, whatever its count: its duplicates agree
            ids = torch.where(columns >= context_from[rows][:, None], history, history[:, -1:])  # the last: context
            seen, penalty = logits.gather(1, ids), self.repetition[rows][:, None]
            logits.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
        if "counts" in self.uses:
            vocab = logits.shape[-1]
            ids = torch.where(columns >= start[:, None], history, vocab).sort(dim=1).values  # the prompt's last
            output = ids < vocab
            first = output & torch.cat([torch.ones_like(output[:, :1]), ids[:, 1:] != ids[:, :-1]], dim=1)
            less = self.frequency[rows][:, None] * output + self.presence[rows][:, None] * first
            logits.scatter_add_(1, torch.where(output, ids, 0), -less)  # a prompt's token: 0 added to token 0
        return self._min_tokens(logits, rows, start, end)

    def _min_tokens(self, logits: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, end: int) -> torch.Tensor:
        """The ban of eos and stop tokens before min_tokens, last (vLLM bans first; the same, but no rule after
        it can turn its -inf into NaN: -inf times a repetition penalty that is 0 in fp32)."""
        if "min_tokens" in self.uses:
            ended_by = self.ended_by[rows]
            banned = (ended_by >= 0) & (end - start < self.min_tokens[rows])[:, None]
            logits.scatter_add_(1, ended_by.clamp(min=0), torch.zeros_like(logits[:, :1]).expand(ended_by.shape)
                                .masked_fill(banned, float("-inf")))
        return logits


def ending_tokens(configs: Sequence[SamplingConfig], eos: Sequence[int], device: torch.device,
                  always: bool = False) -> torch.Tensor | None:
    """(N, E) long on `device`: the tokens that end each row (the model's `eos` where it ends at eos, and its
    stop_token_ids), -1 past a row's own; None where no row has stop_token_ids (eos alone: Block.eos) unless
    `always`."""
    if not always and not any(c.stop_token_ids for c in configs):
        return None
    ended = [(tuple(eos) if c.stop_at_eos else ()) + c.stop_token_ids for c in configs]
    table = torch.full((len(configs), max(1, max(len(e) for e in ended))), -1, dtype=torch.long)
    for row, ids in enumerate(ended):
        table[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table.to(device)
