"""Rows still generating when most of their block has finished: moved on to a later block.

A block runs until its last row ends (eos, a stop string, or max_new_tokens). Where a decode step costs about the
same whatever the rows (weights read across a link or from disk, CUDA graphs over every row, a CPU reading each
weight for a few rows), the last few rows' steps cost nearly as much as the full block's. When other prompts are
waiting, such a block ends early instead: its unfinished rows go on in a later block with the rows other blocks
leave, from their prompt and the tokens they have (one prefill), with their own sampling generators and what is
left of max_new_tokens. Their tokens are the model's continuation either way (greedy: the same ids up to the
rounding of a prefill against a decode step).

Whether it pays is measured on the block's own steps: the rest of the tail (taken as half the steps left) at the
last step's cost, against the same steps shared with the later block's other rows at a full step's cost, plus
the prefill that carrying costs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

STRAGGLER_SHARE = 0.25  # a block ends early once at most this share of its prompts is still generating
MIN_STEPS_LEFT = 4  # ... and at least this many steps may be left (near the end, finishing costs little)


@dataclass
class Carried:
    """A prompt's generation so far, carried on from an earlier block."""

    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # (tokens, vocab) parts, where kept
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)  # (its logprob, [(id, logprob)]) per token, where kept


def worth_ending(step_times: list[float], step_rows: list[int], active: int, rows: int, steps_left: int,
                 sharing: int, rule: bool | None = None, refill: float = 0.0) -> bool:
    """Whether a block whose decode steps took `step_times` over `step_rows` rows each, `active` of its `rows`
    prompts still generating and `steps_left` steps at most to go, should end here, its active rows going on
    in a later block of about `sharing` rows (theirs included; 0: no other work waits). rule: None measures
    (the module's note; `refill`: the seconds of the active rows' prefill there), True ends wherever few rows
    are left and others wait, False never."""
    if rule is False or sharing <= 0 or not step_times or active == 0:
        return False
    if active > STRAGGLER_SHARE * rows or steps_left < MIN_STEPS_LEFT:
        return False
    if rule:
        return True
    full = [t for t, r in zip(step_times, step_rows, strict=True) if r >= (1 - STRAGGLER_SHARE) * rows]
    if not full:
        return False
    last, whole = min(step_times[-2:]), statistics.median(full[:3])
    return steps_left / 2 * (last - whole * active / max(sharing, active)) > refill


def later_rows(active: int, blocks: int, waiting: int, size: int) -> int:
    """The rows of the later block a block's `active` last rows would go on in: the `waiting` ones carried
    already, and as many again as theirs from each of the `blocks` still to run; 0 where no other work waits."""
    return 0 if not (blocks or waiting) else min(size, active * (1 + blocks) + waiting)


def next_group(waiting: list[int], context: dict[int, int], remaining: dict[int, int], rows: int,
               bound: int) -> list[int]:
    """Up to `rows` of the `waiting` prompts (shortest context first, `context`: prompt and tokens so far) whose
    block needs no more positions than `bound` (its longest context and longest `remaining` generation), so
    that a carried block fits the cache and budgets a block of the original prompts was planned for."""
    group: list[int] = []
    for i in sorted(waiting, key=lambda i: (context[i], i)):
        longest = max([context[i]] + [context[j] for j in group])
        left = max([remaining[i]] + [remaining[j] for j in group])
        if len(group) < rows and (not group or longest + left <= bound):
            group.append(i)
    return group
