"""What runs after each step of a block (`FlexGenLite._run_block`'s on_step): stop strings and cancellations end
rows, a block whose last rows straggle ends early (stragglers.py), streaming and progress report."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .completion_text import CONTEXT_TOKENS, text_after
from .engine.block import Block
from .stragglers import Carried, worth_ending


def streamer(chosen: list[int], moving: dict[int, Carried], on_tokens):
    """on_tokens(i, ids) for each prompt i of the block (`chosen`): its tokens so far, those of an earlier block
    included. The tokens a step added are read from the compute device at once (one read a step, not one a row)
    and kept on the host."""
    made: list[list[int]] = [list(moving[row].tokens) if row in moving else [] for row in range(len(chosen))]
    before = [len(m) for m in made]  # tokens from an earlier block

    def report(block: Block) -> None:
        lengths = block.length[:len(chosen)].tolist()
        grown = [row for row, n in enumerate(lengths) if before[row] + n > len(made[row])]
        if grown:
            first = min(len(made[row]) - before[row] for row in grown)
            index = torch.tensor(grown, device=block.tokens.device)
            columns = block.tokens[index, block.prompt_len + first:block.prompt_len + max(lengths)].tolist()
            for row, tokens in zip(grown, columns, strict=True):
                have = len(made[row]) - before[row]
                made[row] += tokens[have - first:lengths[row] - first]
        for row, i in enumerate(chosen):
            on_tokens(i, list(made[row]))
    return report


def straggler_check(engine, real_rows: int, sharing: Callable[[int], int], rule: bool | None):
    """Ends the block where stragglers.worth_ending says so, by the engine's step times so far (its `times`:
    the running block's, made anew by each run)."""
    rows_at: list[int] = []  # rows each decode step computed
    before = real_rows  # rows active after the step before

    def check(block: Block) -> None:
        nonlocal before
        times = engine.times
        active = int((~block.finished[:real_rows]).sum())
        if block.generated > 1:  # a decode step ran, over the rows active after the step before
            rows_at.append(before)
        before = active
        # their share of a later block's prefill: this one's for as many rows (the larger share: a prefill
        # bound by its weights' reads costs the same for fewer rows), over their positions by then
        share = sharing(active)
        refill = (times.prefill * active / max(min(share, real_rows), active, 1)
                  * (block.prompt_len + block.generated) / block.prompt_len)
        if worth_ending(times.decode, rows_at, active, real_rows, block.gen_len - block.generated, share, rule,
                        refill):
            block.stopped = True
    return check


def cancel_check(cancelled: Callable[[int], bool], real_rows: int):
    """Ends the rows whose prompt is no longer wanted (`cancelled(row)`)."""
    def check(block: Block) -> None:
        for row in range(real_rows):
            if not block.finished[row] and cancelled(row):
                block.finished[row] = True
    return check


def stop_check(tokenizer, stops: list[tuple[str, ...]], moving: dict[int, Carried]):
    """Ends the rows whose text holds one of their stop strings (`stops`: each prompt's row's). Asked after every
    step, so a stop string new in a row's text ends at its last token: only the text of its last tokens, as many as
    the longest stop string could span (stop_window), is decoded, not the whole text at every step. (A stop string
    spread past them, by special tokens between its characters, is still cut from the output at the end.) While
    those reach back to the row's first generated token, they are decoded after the prompt's last tokens, as the
    output's text is (completion_text.py: a first word's leading space). The rows' last tokens, a row's prompt (and
    tokens carried from an earlier block) before them in the block, are read from the compute device at once: one
    read a step, not one a row."""
    windows = [stop_window(stop) for stop in stops]

    def check(block: Block) -> None:
        rows = [row for row, stop in enumerate(stops) if stop and not block.finished[row]]
        if not rows:
            return
        lengths = block.length[rows].tolist()
        end = max(lengths)
        width = min(block.prompt_len + end, max(windows[row] for row in rows) + CONTEXT_READ)
        index = torch.tensor(rows, device=block.tokens.device)
        recent = block.tokens[index, block.prompt_len + end - width:block.prompt_len + end].tolist()
        pad = block.host_pad().tolist()
        for row, tokens, length in zip(rows, recent, lengths, strict=True):
            stop_at = block.prompt_len + length
            if length != end:  # finished rows made fewer tokens: its own read
                tokens = block.tokens[row, max(0, stop_at - width):stop_at].tolist()
            tokens = tokens[max(0, pad[row] - (stop_at - len(tokens))):]  # the row's own: not its left padding
            made = length + (len(moving[row].tokens) if row in moving else 0)  # generated, this block and before
            last = min(windows[row], made)
            if not last:
                continue
            context = tokens[:-last] if last == made else []
            text = text_after(tokenizer, context, tokens[-last:])
            if any(s in text for s in stops[row]):
                block.finished[row] = True
    return check


CONTEXT_READ = 2 * CONTEXT_TOKENS  # prompt tokens read before a row's window: its last few with text among them


def stop_window(stop: tuple[str, ...]) -> int:
    """Tokens a stop string can span: one per UTF-8 byte of it (byte-level tokens), and a few more whose text
    may begin with the string's start (a leading space, a character's first bytes)."""
    return max((len(s.encode()) for s in stop), default=0) + 4


def step_message(label: str, times, rows: int, gen_len: int) -> str:
    """Progress after a step: the prefill's time, then decode step i/n and tokens per second so far."""
    if not times.decode:
        shared = f" (their first {times.shared} tokens once)" if times.shared else ""
        return f"{label}: prefill of {rows} prompts{shared} {times.prefill:.1f} s"
    done = len(times.decode)
    return (f"{label}: decode step {done}/{gen_len - 1}, {rows * done / sum(times.decode):.1f} tok/s "
            f"({rows} rows)")
