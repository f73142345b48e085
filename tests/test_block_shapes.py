"""A prompt longer than the policy was planned for, where a whole block of it would pass the budgets, runs in
a narrower block (block_shapes.py): transformers' tokens, the engine's memory within the budget, the planned
shape back after the call; without budgets, or where the block fits, the policy's shape."""

from __future__ import annotations

import pytest

from flexgen_lite import Budgets, FlexGenLite, Policy, PolicyError, SamplingConfig
from flexgen_lite.block_shapes import narrower
from flexgen_lite.model_source import model_config
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.memory_plan import peak_memory

from .conftest import PROMPTS, hf_greedy, on_device

PLANNED = Policy(gpu_batch_size=4, num_gpu_batches=2, dtype="float32")
LONG = [2] + [10 + i % 400 for i in range(50)]  # 51 tokens: with 8 new, near the tiny models' context of 64
NEW = 8


def test_narrower_shapes_fewer_batches_then_fewer_rows():
    shapes = [(p.gpu_batch_size, p.num_gpu_batches) for p in narrower(Policy(gpu_batch_size=3, num_gpu_batches=3))]
    assert shapes == [(3, 2), (3, 1), (2, 1), (1, 1)]
    assert all(p.weight_gpu_percent == PLANNED.weight_gpu_percent for p in narrower(PLANNED))


def compute_peak(path, policy: Policy, prompt_len: int, device: str, gen_len: int = NEW) -> int:
    """The planned peak of the tier the block's rows are computed in: GPU memory on CUDA, else the CPU's."""
    cuda = device.startswith("cuda")
    peaks = peak_memory(model_config(path), Workload(prompt_len, gen_len), policy, cuda)[1]
    return int(peaks["gpu" if cuda else "cpu"])


def budgets(device: str, limit: int) -> Budgets:
    return Budgets(gpu=limit) if device.startswith("cuda") else Budgets(cpu=limit)


# weights streamed and the cache split across a link (a GPU's staging and copies, on the CPU)
LINKED = Policy(gpu_batch_size=4, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100,
                cache_gpu_percent=50, cache_cpu_percent=50, dtype="float32")


@pytest.mark.parametrize("policy,link", [(PLANNED, False), (LINKED, True)], ids=["resident", "across-a-link"])
def test_a_long_prompt_past_the_budget_runs_in_a_narrower_block(tiny_models, references, compute_device, policy,
                                                                  link):
    path, model = tiny_models["llama"]
    budget = compute_peak(path, policy, len(LONG), compute_device) - 1  # a whole block of LONG passes it
    assert compute_peak(path, policy, max(map(len, PROMPTS)), compute_device) < budget  # a block of PROMPTS not
    expected = references["llama"][0] + hf_greedy(on_device(model, compute_device), [LONG], NEW)[0]
    device = "cpu+link" if link and compute_device == "cpu" else compute_device
    with FlexGenLite(str(path), policy=policy, device=device, budgets=budgets(compute_device, budget)) as m:
        with pytest.raises(PolicyError, match="this block"):
            m._check_budgets(Workload(len(LONG), NEW), "this block")
        blocks = []
        ids = m.generate_ids(PROMPTS + [LONG], SamplingConfig(max_new_tokens=NEW),
                             on_block=lambda done: blocks.append(sorted(done)))
        assert ids == expected
        assert len(blocks) > 1 and len(PROMPTS) in blocks[0]  # the long prompt's block came first, narrower
        assert m.policy == policy and m.engine is m.shapes.engines[(4, 2)]  # the planned shape after the call
        narrow = [e for shape, e in m.shapes.engines.items() if shape != (4, 2)]
        assert narrow and all(e.cache is None for e in narrow)  # the narrower block's cache given back
        assert m.memory_report()["peak"]["gpu" if compute_device.startswith("cuda") else "cpu"] <= budget
        assert m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=NEW)) == references["llama"][0]


def test_scoring_a_long_request_past_the_budget_runs_in_a_narrower_block(tiny_models, compute_device):
    path = tiny_models["llama"][0]
    budget = compute_peak(path, PLANNED, len(LONG) - 1, compute_device, 1) - 1  # scoring: one new position
    requests = [(LONG[:40], LONG[40:])] + [(p[:-2], p[-2:]) for p in PROMPTS if len(p) > 2]
    with FlexGenLite(str(path), policy=PLANNED, device=compute_device) as m:
        expected, expected_top = m.score(requests), m.prompt_logprobs([LONG], top=2)
    with FlexGenLite(str(path), policy=PLANNED, device=compute_device, budgets=budgets(compute_device, budget)) as m:
        found, found_top = m.score(requests), m.prompt_logprobs([LONG], top=2)
        assert len(m.shapes.engines) == 2 and m.policy == PLANNED
    assert [g for _, g in found] == [g for _, g in expected]
    assert [lp for lp, _ in found] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert [t[0] for t in found_top[0][1:]] == pytest.approx([t[0] for t in expected_top[0][1:]], abs=1e-4)


def test_one_row_past_the_budget_is_still_refused(tiny_models, compute_device):
    path = tiny_models["llama"][0]
    one_row = Policy(gpu_batch_size=1, dtype="float32")
    budget = compute_peak(path, one_row, len(LONG), compute_device) - 100 * 1024
    with FlexGenLite(str(path), policy=PLANNED, device=compute_device, budgets=budgets(compute_device, budget)) as m, \
            pytest.raises(PolicyError, match=r"narrowed from the policy's 8 rows to 1, \(.*--gpu-batch-size 1 "
                                            r"--num-gpu-batches 1 .* 100.00 KiB larger would fit it") as e:
        m.generate_ids([LONG], SamplingConfig(max_new_tokens=NEW))
    assert "Lower the batch size" not in str(e.value) and "Move more to disk" in str(e.value)  # it is one row


def test_without_budgets_the_block_keeps_its_shape(tiny_models, compute_device):
    with FlexGenLite(str(tiny_models["llama"][0]), policy=PLANNED, device=compute_device) as m:
        m.generate_ids([LONG], SamplingConfig(max_new_tokens=2))
        assert list(m.shapes.engines) == [(4, 2)]
