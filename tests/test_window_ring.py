"""A windowed layer's KV cache keeps its window alone, as a ring (kv_cache.ring_placed): position p in slot
p % window, decode attending over every slot under a mask of the positions they hold. transformers' greedy output and
logits are the reference, across the link's copies (cpu+link), on disk, with finished rows and a 4-bit cache; the
memory plan counts the rings exactly."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.kv_cache import ring_placed, ring_positions

from .conftest import PROMPTS, copy_with_eos, hf_greedy, make_checkpoint
from .test_link_paths import check_gpu_memory_plan
from .test_parity import LOGITS_ATOL, POLICIES, P, link_only_on_cpu
from .test_shared_prefix import SHARED_PROMPTS
from .test_shared_prefix import run as shared_run

WINDOW = 5  # every layer of the Mistral below; prompts of up to 10 tokens and 8 new ones wrap it
GREEDY = SamplingConfig(max_new_tokens=8, stop_at_eos=False)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(checkpoint, transformers' ids and logits for PROMPTS, 8 new tokens): fp32 on the CPU."""
    path = tmp_path_factory.mktemp("mistral-ring")
    model = make_checkpoint(path, "mistral", seed=31, sliding_window=WINDOW)
    return path, hf_greedy(model, PROMPTS, 8)


def generate(path, policy, device=None, sampling=GREEDY, prompts=PROMPTS):
    with FlexGenLite(str(path), policy=policy, device=device) as m:
        ids, logits = m.generate_ids(prompts, sampling, return_logits=True)
        kept = {part.capacity for layer in m.engine.cache.parts for parts in layer for part in parts}
    return ids, logits, kept


def check(ours, theirs) -> None:
    ids, logits, kept = ours
    assert kept == {WINDOW}  # every layer's cache is a ring of the window, not max_len (18)
    assert ids == theirs[0]
    for a, b in zip(logits, theirs[1], strict=True):
        torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)


def test_each_position_lands_in_its_slot_and_is_found_there():
    """A prompt's last `capacity` positions, then one per step, each in slot p % capacity: what ring_positions says
    every slot holds after each write, for prompts shorter than, as long as and longer than the ring."""
    capacity = 5
    for prompt in (1, 3, 5, 7, 12):
        ring = torch.full((capacity,), -1)
        placed, start = ring_placed(torch.arange(prompt).view(1, 1, prompt, 1), 0, capacity)
        ring[start:start + placed.shape[2]] = placed.view(-1)
        for p in range(prompt, prompt + 9):
            step, slot = ring_placed(torch.tensor(p).view(1, 1, 1, 1), p, capacity)
            ring[slot] = step.view(-1)
            held = ring_positions(p, capacity)
            assert torch.equal(torch.where(held >= 0, held, -1), ring), (prompt, p)
            assert sorted(held[held >= 0].tolist()) == list(range(max(0, p - capacity + 1), p + 1))
    with pytest.raises(ValueError, match="ring of 5"):
        ring_placed(torch.zeros(1, 1, 3, 1), 4, capacity)


@link_only_on_cpu
@pytest.mark.parametrize("name", ["cache-cpu", "cache-disk", "cache-split-3-tiers", "cpu-attention-cache-split",
                                  "no-overlap-offloaded"])
def test_rings_across_a_link_match_transformers(mistral, name):
    """Rings in host RAM (position-major, copied into slots max_len long), in files, and attended on the CPU."""
    path, reference = mistral
    check(generate(path, POLICIES[name], "cpu+link"), reference)


@pytest.mark.parametrize("name", ["cache-disk", "one-row-batches"])
def test_rings_in_place_match_transformers(mistral, name):
    """A CPU's memory-mapped disk rings, and batches of one row."""
    path, reference = mistral
    check(generate(path, POLICIES[name]), reference)


def with_eos(path, tmp_path, want_ids: list[list[int]]) -> tuple[object, int]:
    """A copy of the checkpoint whose EOS is the 7th greedy token of one row and of no other row's output: (its
    folder, that row)."""
    row = next(r for r, ids in enumerate(want_ids)
               if ids[6] not in ids[:6] and not any(ids[6] in o for i, o in enumerate(want_ids) if i != r))
    return copy_with_eos(path, tmp_path / "model", want_ids[row][6]), row


@pytest.mark.parametrize("device", [None, "cpu+link"])
def test_rows_that_finish_leave_their_rings(mistral, tmp_path, device):
    """A row that stops at its EOS leaves the batch; the others go on over their rings (the part's rows gathered)."""
    path, (want_ids, _) = mistral
    model_dir, row = with_eos(path, tmp_path, want_ids)
    for policy in (P((100, 0, 50, 0, 100, 0), gbs=3, nb=2), P((100, 0, 0, 50, 100, 0), gbs=3, nb=2,
                                                               cpu_cache_compute=True)):
        ids, _, _ = generate(model_dir, policy, device, SamplingConfig(max_new_tokens=8))
        assert ids[row] == want_ids[row][:7]
        assert all(ids[r] == want_ids[r] for r in range(len(PROMPTS)) if r != row)


def test_unpadded_rows_that_finish_leave_their_rings(mistral, tmp_path):
    """As a GPU runs them (Engine.unpadded_without_mask: rows none of which is padded get no mask, and neither do
    their rings), a finished row leaves a batch whose windows bite (the H100 run of 2026-12-05 failed here)."""
    from transformers import AutoModelForCausalLM

    prompts = [p[-3:] for p in PROMPTS if len(p) >= 3]  # no row padded
    want_ids, _ = hf_greedy(AutoModelForCausalLM.from_pretrained(str(mistral[0])).eval(), prompts, 8)
    model_dir, row = with_eos(mistral[0], tmp_path, want_ids)
    with FlexGenLite(str(model_dir), policy=P((100, 0, 100, 0, 100, 0), gbs=3, nb=2)) as m:
        m.engine.unpadded_without_mask = True
        ids = m.generate_ids(prompts, SamplingConfig(max_new_tokens=8))
    assert ids[row] == want_ids[row][:7]
    assert all(ids[r] == want_ids[r] for r in range(len(prompts)) if r != row)


@pytest.mark.parametrize("device", [None, "cpu+link"])
def test_a_4_bit_ring_is_the_same_wherever_it_lives(mistral, device):
    """4-bit rings on the device, in host RAM, on disk and attended on the CPU give the same logits; its first
    step is transformers' (the prompt's exact k, v), and the next one near it."""
    path, (want_ids, want_logits) = mistral
    base_ids, base_logits, kept = generate(path, P((100, 0, 100, 0, 100, 0), compress_cache=True), device)
    assert kept == {WINDOW}
    errors = []
    for ours, theirs, a, b in zip(base_ids, want_ids, base_logits, want_logits, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=LOGITS_ATOL, rtol=0)
        assert ours[0] == theirs[0]  # so the second step is fed the same token
        errors.append(float((a[1] - b[1]).norm() / b[1].norm()))
    assert sum(errors) / len(errors) < 0.25, errors  # 0.14 here; a full cache's 4 bits err as much (0.15)
    for cpu_attention in (False, True):
        ids, logits, _ = generate(path, P((0, 0, 34, 33, 100, 0), gbs=3, nb=3, compress_cache=True,
                                          cpu_cache_compute=cpu_attention), device)
        assert ids == base_ids
        for a, b in zip(logits, base_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@link_only_on_cpu
def test_a_shared_prefix_read_once_until_the_ring_wraps(tmp_path):
    """Host-RAM parts read a shared prefix for one row across the link (KVCache.prefix_reads): in a ring of 36
    under prompts of up to 41 tokens, 31 of them shared, the prefix's slots hold later positions, so every row's own
    are read."""
    from .test_parity import LINK

    model = make_checkpoint(tmp_path, "mistral", seed=12, sliding_window=36)
    want_ids, want_logits = hf_greedy(model, SHARED_PROMPTS, 6)
    ids, logits, shared = shared_run(tmp_path, POLICIES["cache-cpu"], LINK)
    assert max(map(len, SHARED_PROMPTS)) > 36 > max(shared), shared
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


@link_only_on_cpu
@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=3, num_gpu_batches=3, cache_gpu_percent=34, cache_cpu_percent=33),
    Policy(gpu_batch_size=3, num_gpu_batches=3, cache_gpu_percent=34, cache_cpu_percent=33, compress_cache=True,
           cpu_cache_compute=True),
], ids=["three-tiers", "4-bit-cpu-attention"])
def test_the_memory_plan_counts_the_rings(mistral, policy):
    """What the engine allocates across the link, exactly as planned, with every layer's cache a ring of 5 of 14."""
    check_gpu_memory_plan(mistral[0], policy)
