"""Choosing the next token: greedy, or sampling with temperature, min-p, top-k and top-p (what a row's penalties,
logit bias and min_tokens do to its logits before: logit_rules.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_at_eos: bool = True
    # the logits' rules (logit_rules.py), vLLM's meanings: neutral by default
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (transformers' rule)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of each token the output holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the output holds the token
    min_p: float = 0.0  # sampling keeps the tokens at least min_p times as likely as the likeliest
    min_tokens: int = 0  # no eos (nor stop_token_ids) before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): OpenAI's logit_bias
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the output as eos does (kept in its ids)
    # the output's form (guided.py): ("choice", text, ...), ("regex", pattern), ("json_object",) or ("json_schema",
    # the schema as JSON text); () none
    guided: tuple = ()

    def __post_init__(self) -> None:
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        if not isinstance(self.stop, tuple):  # a string is one stop string (as OpenAI takes it), not its characters
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        self._check_rules()
        for name in ("max_new_tokens", "top_k", "seed"):  # numpy's and torch's integers too
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool) and isinstance(value, numbers.Integral):
                object.__setattr__(self, name, int(value))
            elif name != "seed" or value is not None:
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop strings must be strings, got {self.stop!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty (an empty one would end every output at once)")
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        if self.min_tokens and self.stop:
            raise ValueError("min_tokens with stop strings is not supported (a stop string before the min_tokens-th "
                             "token would be cut from the output): use one or the other")

    def _check_rules(self) -> None:
        """The logits' rules' values as numbers (pairs and dicts as tuples, so that the config stays hashable)."""
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        most = torch.finfo(torch.float32)
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):  # as fp32 logits take them
            if abs(getattr(self, name)) > most.max:
                raise ValueError(f"{name} must be within float32's range (|x| <= {most.max:.3g})")
        if not most.tiny <= self.repetition_penalty:  # one that rounds to 0 in fp32 would make -inf * 0
            raise ValueError(f"repetition_penalty must be > 0 and at least {most.tiny:.3g} (1: none), got "
                             f"{self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be within [0, 1], got {self.min_p}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, numbers.Integral) \
                or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a whole number >= 0, got {self.min_tokens!r}")
        object.__setattr__(self, "min_tokens", int(self.min_tokens))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else (self.logit_bias or ())
        pairs = {}
        for pair in bias:
            token, value = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (pair, None)
            if not _token_id(token) or isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not abs(value) <= torch.finfo(torch.float32).max:
                raise ValueError(f"logit_bias: each entry is a token id and a number within float32's range, got "
                                 f"{pair!r}")
            if int(token) in pairs:
                raise ValueError(f"logit_bias names token {int(token)} twice")
            pairs[int(token)] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))
        ids = self.stop_token_ids or ()
        if not isinstance(ids, (tuple, list)) or not all(_token_id(i) for i in ids):
            raise ValueError(f"stop_token_ids must be token ids (whole numbers >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(sorted({int(i) for i in ids})))
        self._check_guided()

    def _check_guided(self) -> None:
        guided = tuple(self.guided or ())
        object.__setattr__(self, "guided", guided)
        if not guided:
            return
        kind, *args = guided
        if kind == "choice" and args and all(isinstance(a, str) and a for a in args):
            return
        if kind == "regex" and len(args) == 1 and isinstance(args[0], str):
            import regex

            try:
                regex.compile(args[0])
            except regex.error as e:
                raise ValueError(f"guided regex {args[0]!r} does not compile: {e}") from None
            return
        if kind == "json_object" and not args:
            return
        if kind == "json_schema" and len(args) == 1 and isinstance(args[0], str):
            import json

            from .json_form import check_schema
            try:
                check_schema(json.loads(args[0]))
            except ValueError as e:  # the text is not JSON, or the schema asks what is not read
                raise ValueError(f"guided json_schema: {e}") from None
            return
        raise ValueError(f"guided must be ('choice', text, ...) with non-empty texts, ('regex', pattern), "
                         f"('json_object',) or ('json_schema', schema as JSON text), got {guided!r}")

    def rules(self) -> bool:
        """Whether this config changes its logits before picking (logit_rules.py)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or bool(self.logit_bias) or (self.min_tokens > 0 and (self.stop_at_eos or bool(self.stop_token_ids))))

    def token_ids(self) -> list[int]:
        """The token ids this config names (logit_bias, stop_token_ids), to check against a vocabulary."""
        return [i for i, _ in self.logit_bias] + list(self.stop_token_ids)


def _token_id(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 0


def warpers(config: SamplingConfig) -> tuple[float, int, float, float]:
    """How a row picks its token: (temperature, top_k, top_p, min_p); greedy whatever the others say."""
    if config.temperature == 0:
        return 0.0, 0, 1.0, 0.0
    return config.temperature, config.top_k, config.top_p, config.min_p


def per_prompt(sampling: SamplingConfig | Sequence[SamplingConfig], n: int
               ) -> tuple[SamplingConfig, list[SamplingConfig]]:
    """One SamplingConfig for n prompts, or one each (rows of a block may differ in every setting), as (the
    first's with the largest max_new_tokens, for what a block sizes by; each prompt's own)."""
    configs = [sampling] * n if isinstance(sampling, SamplingConfig) else list(sampling)
    if n == 0:  # the caller refuses no prompts
        return sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(), []
    if len(configs) != n or not all(isinstance(c, SamplingConfig) for c in configs):
        raise ValueError(f"sampling must be a SamplingConfig or one for each of the {n} prompts")
    return dataclasses.replace(configs[0], max_new_tokens=max(c.max_new_tokens for c in configs)), configs


def row_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per row, seeded from (seed, the row's prompt index): with these, what a prompt samples
    depends only on the seed and its place in the request, not on the batching or the other prompts."""
    out = []
    for i in indices:
        digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
    return out


def sample_rows(logits: torch.Tensor, config: SamplingConfig | Sequence[SamplingConfig],
                generator: Sequence[torch.Generator] | None) -> torch.Tensor:
    """`sample`, with one config for all rows or one per row: rows that pick alike sampled together."""
    if isinstance(config, SamplingConfig):
        return sample(logits, config, generator)
    groups: dict[tuple, list[int]] = {}
    for row, c in enumerate(config):
        groups.setdefault(warpers(c), []).append(row)
    if len(groups) == 1:
        return sample(logits, config[0], generator)
    ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        ids[index] = sample(logits[index], config[rows[0]], None if generator is None else [generator[r] for r in rows])
    return ids


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit's id, the first where several tie (as argmax). On a CPU by max(dim), the same ids:
    torch's CPU argmax took 4.1 ms over 128 x 50,272 fp32 logits where max took 1.6 (a 125M model's decode step
    at batch 128 is ~70 ms)."""
    return logits.max(dim=-1).indices if logits.device.type == "cpu" else logits.argmax(dim=-1)


def warped(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """fp32 logits (B, vocab) as a sampling row draws from them: over the temperature, shifted so each row's
    largest is 0, then -inf for the tokens min-p, top-k and top-p leave out (vLLM's order)."""
    # shifted by each row's largest first: a tiny temperature sends the others to -inf, not to inf - inf; one below
    # fp32's least normal (1e-46) would be 0 in fp32, and the largest 0 / 0
    temperature = max(config.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if config.min_p > 0:  # the likeliest is 0 now: a token's probability over its, exp(logit), against min_p
        logits = logits.masked_fill(logits < math.log(config.min_p), float("-inf"))
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and the likeliest token always (a top_p below fp32's least value dropped them all)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig,
           generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, vocab).

    `generator` is one generator for all rows, or a sequence of one generator per row."""
    if config.temperature == 0:
        return greedy(logits)
    logits = warped(logits, config)
    probs = logits.softmax(-1).cpu()
    if generator is None or isinstance(generator, torch.Generator):
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        if len(generator) != len(probs):
            raise ValueError(f"{len(generator)} generators for {len(probs)} rows")
        ids = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)])
    return ids.to(logits.device)
