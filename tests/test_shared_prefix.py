"""A block's common prompt prefix computed once in the prefill (Block.shared_columns, Engine._prefix_through):
transformers' greedy output and logits under the placements whose prefill writes the cache differently, and the
same tokens as the same run with the prefix computed per row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.block import MIN_SHARED, Block, shared_columns

from .conftest import hf_greedy, on_device
from .test_parity import LOGITS_ATOL, POLICIES

PREFIX = torch.randint(3, 400, (30,), generator=torch.Generator().manual_seed(5)).tolist()
# an instruction, then items of different lengths (sorted into blocks by length: every block has two or more)
SHARED_PROMPTS = [[2, *PREFIX, *range(100 + 10 * i, 100 + 10 * i + n)] for i, n in enumerate((3, 1, 7, 5, 2, 9, 4, 6))]
PLACEMENTS = ["all-gpu", "weights-disk", "cache-cpu", "cache-split-3-tiers", "act-disk-split", "one-row-batches",
              "block-larger-than-prompts", "cpu-attention-cache-split"]


@pytest.fixture(scope="module")
def shared_references(tiny_models, compute_device):
    return {family: hf_greedy(on_device(tiny_models[family][1], compute_device), SHARED_PROMPTS, 6)
            for family in ("opt", "llama3", "qwen3")}


def run(model_dir, policy: Policy, device: str, prompts=SHARED_PROMPTS, new_tokens: int = 6):
    """(ids, logits, each block's shared columns)."""
    shared = []
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        ids, logits = m.generate_ids(prompts, SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False),
                                     return_logits=True, on_block=lambda _: shared.append(m.engine.times.shared))
    return ids, logits, shared


@pytest.mark.parametrize("family", ["opt", "llama3", "qwen3"])
@pytest.mark.parametrize("name", PLACEMENTS)
def test_shared_prefix_matches_transformers(tiny_models, shared_references, compute_device, family, name):
    ids, logits, shared = run(tiny_models[family][0], POLICIES[name], compute_device)
    assert shared and all(n > MIN_SHARED for n in shared), shared  # every block shared the instruction
    want_ids, want_logits = shared_references[family]
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("switches", [dict(compress_cache=True), dict(compress_weight=True),
                                      dict(compress_cache=True, cpu_cache_compute=True, cache_gpu_percent=0,
                                           cache_cpu_percent=100)])
def test_shared_prefix_under_compression_same_as_per_row(tiny_models, compute_device, switches):
    """4-bit weights or cache are lossy: there the reference is the same run computing the prefix per row."""
    policy = dataclasses.replace(POLICIES["all-gpu"], **switches)
    ids, logits, shared = run(tiny_models["llama"][0], policy, compute_device)
    want_ids, want_logits, none = run(tiny_models["llama"][0], dataclasses.replace(policy, share_prefix=False),
                                      compute_device)
    assert all(shared) and not any(none)
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_same_prompts_leave_one_token_per_row(tiny_models, compute_device):
    """Identical prompts: all but the last token are shared; each row's prefill is then one position."""
    prompts = [SHARED_PROMPTS[0]] * 4
    ids, _, shared = run(tiny_models["llama3"][0], POLICIES["all-gpu"], compute_device, prompts)
    assert shared == [len(prompts[0]) - 1]
    want, _, _ = run(tiny_models["llama3"][0], dataclasses.replace(POLICIES["all-gpu"], share_prefix=False),
                     compute_device, prompts)
    assert ids == want and len({tuple(i) for i in ids}) == 1


def test_shared_columns():
    prefix = list(range(3, 3 + 20))
    prompts = [prefix + [50, 51], prefix + [60], prefix + [70, 71, 72]]
    assert shared_columns(prompts, rows=3) == 20
    assert shared_columns(prompts, rows=64) == 0  # filler rows: 20 shared positions save too little of 64 x 23
    assert shared_columns([prefix + [50]], rows=1) == 0  # one prompt: nothing to share
    assert shared_columns([prefix, prefix], rows=2) == 19  # the shortest keeps its last token
    short = prefix[:MIN_SHARED - 1]
    assert shared_columns([short + [1, 2], short + [3]], rows=2) == 0  # too short to be worth a pass
    differs = [prefix + [50], [4] + prefix[1:] + [60]]
    assert shared_columns(differs, rows=2) == 0


def test_block_positions_of_a_shared_prefix():
    """Step 0 computes each row from column `shared`; row i's columns [pad_i, shared) hold prefix tokens."""
    prefix = list(range(3, 3 + 20))
    prompts = [prefix + [50, 51, 52], prefix + [60]]
    block = Block.from_prompts(prompts, 2, 2, 4, 1, (), torch.device("cpu"), share_prefix=True)
    assert block.shared == 20 and block.prefix.tolist() == [prefix]
    assert block.step_span(0) == (20, 3) and block.step_span(1) == (23, 1)
    pad = block.pad.tolist()
    for row, p in enumerate(prompts):
        assert block.tokens[row, pad[row]:20].tolist() == prefix[:20 - pad[row]]
        assert block.tokens[row, 20:23].tolist() == p[20 - pad[row]:]
    unshared = Block.from_prompts(prompts, 2, 2, 4, 1, (), torch.device("cpu"))
    assert unshared.shared == 0 and unshared.step_span(0) == (0, 23)
