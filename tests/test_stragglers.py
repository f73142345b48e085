"""Rows still generating when most of their block has finished go on in a later block (stragglers.py): their
tokens are those of the run that kept them, and transformers' (greedy); the rule that ends a block early."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.block import block_order
from flexgen_lite.stragglers import later_rows, next_group, worth_ending

from .conftest import PROMPTS, copy_with_eos, hf_greedy

EIGHT = PROMPTS + [[2, 33, 34, 35, 36]]
NEW = 12
POLICY = Policy(gpu_batch_size=4, num_gpu_batches=1, dtype="float32")  # blocks of 4: two of EIGHT


def stopping_ids(outputs: list[list[int]]) -> tuple[set[int], set[int]]:
    """EOS ids that end three rows of each block of 4 at their second token while one row (the straggler)
    never meets one, and the stragglers' rows; EIGHT's blocks as the engine cuts them."""
    blocks = [block_order(EIGHT, True)[i:i + 4] for i in (0, 4)]
    for pick in range(4):  # the straggler of each block: rows tried in turn
        stragglers = {block[pick] for block in blocks}
        eos = {outputs[r][1] for block in blocks for r in block if r not in stragglers}
        enders_stop = all(outputs[r][0] not in eos for block in blocks for r in block if r not in stragglers)
        if enders_stop and not any(t in eos for r in stragglers for t in outputs[r]):
            return eos, stragglers
    pytest.fail("no straggler for this tiny model's outputs: change the prompts")


def with_eos(tiny_dir, tmp_path, eos: set[int]):
    return copy_with_eos(tiny_dir, tmp_path / "model", sorted(eos))


def run(model_dir, sampling: SamplingConfig, carry_over: bool | None, policy: Policy = POLICY, device=None,
        logprobs: list[int | None] | None = None):
    """(ids, logits, or with `logprobs` what was kept of them, the progress lines of blocks); what each step
    streamed (on_tokens) checked to grow into each prompt's ids, carried rows' included."""
    said, streamed = [], {}

    def on_tokens(i: int, tokens: list[int]) -> None:
        assert tokens[:len(streamed.get(i, []))] == streamed.get(i, [])  # each step's tokens begin with the last's
        streamed[i] = tokens

    with FlexGenLite(str(model_dir), policy=policy, device=device, progress=said.append) as m:
        ids, logits = m.generate_ids(EIGHT, sampling, return_logits=logprobs is None, carry_over=carry_over,
                                     logprobs=logprobs, on_tokens=on_tokens)
        assert (m.engine.logits is None) == (logprobs is not None)  # no vocabulary-wide logits kept for logprobs
    assert [streamed[i] for i in range(len(EIGHT))] == ids
    return ids, logits, [s for s in said if s.endswith("done") or "carried on" in s]


def cut(tokens: list[int], eos: set[int]) -> list[int]:
    return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


@pytest.mark.parametrize("policy,device", [
    (POLICY, None),
    (Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=50, cache_cpu_percent=50, dtype="float32"),
     "cpu+link"),  # two GPU batches, the cache split over a link
], ids=["one-batch", "two-batches-cache-across-a-link"])
def test_carried_rows_end_as_transformers_greedy_and_as_kept_rows(tiny_models, tmp_path, policy, device):
    tiny_dir, model = tiny_models["llama"]
    reference, reference_logits = hf_greedy(model, EIGHT, NEW)
    eos, stragglers = stopping_ids(reference)
    model_dir = with_eos(tiny_dir, tmp_path, eos)
    sampling = SamplingConfig(max_new_tokens=NEW)
    carried, carried_logits, said = run(model_dir, sampling, True, policy, device)
    kept, kept_logits, kept_said = run(model_dir, sampling, False, policy, device)
    assert sum("carried on" in s for s in said) == 2 and len(said) == 3  # two blocks end early, a third goes on
    assert len(kept_said) == 2 and not any("carried on" in s for s in kept_said)
    assert carried == kept == [cut(r, eos) for r in reference]
    assert all(len(carried[r]) == NEW for r in stragglers)
    for row in range(len(EIGHT)):  # each token's logits, the carried rows' first in their new block by a prefill
        assert carried_logits[row].shape == (len(carried[row]), model.config.vocab_size)
        torch.testing.assert_close(carried_logits[row], kept_logits[row], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(carried_logits[row], reference_logits[row][:len(carried[row])], atol=1e-4,
                                   rtol=1e-4)
    asked = [3, None, 0, 3, 1, None, 3, 2]  # alternatives per row: logprobs kept as the blocks run, carried too
    ids, kept, said = run(model_dir, sampling, True, policy, device, asked)
    assert ids == carried and sum("carried on" in s for s in said) == 2
    for row, k in enumerate(asked):
        if k is None:
            assert kept[row] is None
            continue
        logprobs = carried_logits[row].log_softmax(-1)
        assert len(kept[row]) == len(ids[row])
        for step, (chosen, best) in enumerate(kept[row]):
            assert chosen == pytest.approx(logprobs[step, ids[row][step]].item(), abs=1e-4)
            top = logprobs[step].topk(k)
            assert [t for t, _ in best] == top.indices.tolist()
            assert [v for _, v in best] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_sampled_rows_keep_their_generators_across_blocks(tiny_models, tmp_path):
    """Each row samples from its own generator (seeded by its place): a carried row's goes on where it was, so
    its tokens are those it makes when kept in its block, and those it makes with no EOS at all, cut."""
    tiny_dir, _ = tiny_models["llama"]
    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7)
    with FlexGenLite(str(tiny_dir), policy=POLICY) as m:
        free = m.generate_ids(EIGHT, SamplingConfig(max_new_tokens=NEW, temperature=1.0, seed=7, stop_at_eos=False))
    eos, _ = stopping_ids(free)
    model_dir = with_eos(tiny_dir, tmp_path, eos)
    carried, _, said = run(model_dir, sampling, True)
    kept, _, _ = run(model_dir, sampling, False)
    assert sum("carried on" in s for s in said) == 2
    assert carried == kept == [cut(r, eos) for r in free]


def test_a_block_ends_early_only_where_its_tail_costs_more_than_carrying_it():
    full, rows = [0.10, 0.10, 0.10], [16, 16, 16, 3]
    # 2 rows left of 16, 20 steps: the tail (10 steps taken) at 0.09 s a step against sharing a block of 16
    assert worth_ending(full + [0.09], rows, 2, 16, 20, 16)  # 10 x (0.09 - 0.1 x 2 / 16) = 0.78 s saved
    assert not worth_ending(full + [0.09], rows, 2, 16, 20, 2)  # no one to share with: 10 x (0.09 - 0.1) < 0
    assert worth_ending(full + [0.03], rows, 2, 16, 20, 16)  # cheaper steps still pay: 10 x 0.0175 s
    assert not worth_ending(full + [0.03], rows, 2, 16, 20, 16, refill=0.2)  # ... but not a dearer prefill
    assert not worth_ending(full + [0.012], rows, 2, 16, 20, 16)  # a step as cheap as its share: go on
    assert not worth_ending(full + [0.09], rows, 2, 16, 20, 0)  # nothing else waits
    assert not worth_ending(full + [0.09], [16, 16, 16, 6], 5, 16, 20, 16)  # more than a quarter still going
    assert not worth_ending(full + [0.09], rows, 2, 16, 3, 16)  # the end is near
    assert not worth_ending(full + [0.09], rows, 2, 16, 20, 16, rule=False)
    assert worth_ending(full + [0.012], rows, 2, 16, 20, 16, rule=True)
    assert not worth_ending(full + [0.09], rows, 2, 16, 20, 0, rule=True)
    assert not worth_ending([], [], 2, 16, 20, 16, rule=True)  # no decode step yet: a row would carry nothing


def test_the_later_block_holds_the_stragglers_of_the_blocks_to_come_and_those_waiting():
    assert later_rows(2, blocks=3, waiting=0, size=16) == 8  # 2 from this block and each of 3 more
    assert later_rows(2, blocks=0, waiting=5, size=16) == 7
    assert later_rows(4, blocks=9, waiting=3, size=16) == 16  # at most a block
    assert later_rows(2, blocks=0, waiting=0, size=16) == 0  # nothing else: the block runs to its end


def test_a_carried_block_needs_no_more_positions_than_the_prompts_block():
    context = {0: 40, 1: 12, 2: 30, 3: 12}  # prompt and tokens so far
    remaining = {0: 2, 1: 30, 2: 12, 3: 28}  # of max_new_tokens 32; the longest prompt 10 + 32 = bound 42
    assert next_group([0, 1, 2, 3], context, remaining, 4, 42) == [1, 3]  # 12 + 30; with 2: 30 + 30 > 42
    assert next_group([0, 2], context, remaining, 4, 42) == [2]  # with 0: 40 + 12 > 42
    assert next_group([0], context, remaining, 4, 42) == [0]  # each row alone fits: its prompt + max_new_tokens
    assert next_group([1, 3], context, remaining, 1, 42) == [1]  # at most a block's rows


def test_streams_and_stop_strings_see_a_carried_rows_tokens_from_its_start(tiny_models, tmp_path):
    """A stop string spanning the carry (a straggler's second token, made before it, and its third, after) ends
    the row as in the kept run; streaming reports each row's tokens from the first."""
    tiny_dir, model = tiny_models["llama"]
    reference, _ = hf_greedy(model, EIGHT, NEW)
    eos, stragglers = stopping_ids(reference)
    row = min(stragglers)
    stop = f"w{reference[row][1]} w{reference[row][2]}"
    assert stop not in " ".join(f"w{t}" for t in reference[row][:2])
    model_dir = with_eos(tiny_dir, tmp_path, eos)
    sampling = SamplingConfig(max_new_tokens=NEW, stop=(stop,))
    outputs = {}
    for carry in (True, False):
        streamed, said = {}, []
        with FlexGenLite(str(model_dir), policy=POLICY, progress=said.append) as m:
            ids = m.generate_ids(EIGHT, sampling, on_tokens=streamed.__setitem__,
                                 carry_over=carry)
        assert streamed == dict(enumerate(ids))
        assert any("carried on" in s for s in said) == carry
        outputs[carry] = ids
    assert outputs[True] == outputs[False]
    assert outputs[True][row] == reference[row][:3]
