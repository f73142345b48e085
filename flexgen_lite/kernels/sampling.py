"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p."""

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

    def __post_init__(self) -> None:
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        if not isinstance(self.stop, tuple):  # a string is one stop string (as OpenAI takes it), not its characters
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
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


def warpers(config: SamplingConfig) -> tuple[float, int, float]:
    """How a row picks its token: (temperature, top_k, top_p); greedy whatever top_k and top_p say."""
    return (0.0, 0, 1.0) if config.temperature == 0 else (config.temperature, config.top_k, config.top_p)


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


def sample(logits: torch.Tensor, config: SamplingConfig,
           generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, vocab).

    `generator` is one generator for all rows, or a sequence of one generator per row."""
    if config.temperature == 0:
        return greedy(logits)
    # shifted by each row's largest first: a tiny temperature sends the others to -inf, not to inf - inf; one below
    # fp32's least normal (1e-46) would be 0 in fp32, and the largest 0 / 0
    temperature = max(config.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
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
    probs = logits.softmax(-1).cpu()
    if generator is None or isinstance(generator, torch.Generator):
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        if len(generator) != len(probs):
            raise ValueError(f"{len(generator)} generators for {len(probs)} rows")
        ids = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)])
    return ids.to(logits.device)
