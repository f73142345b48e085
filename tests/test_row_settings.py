"""Prompts of one call with their own max_new_tokens, seed, temperature, top-k, top-p, stop strings and eos
handling share blocks (kernels/sampling.per_prompt): each row's tokens are those it gets generated alone, and the
doors run requests that differ so in one call."""

from __future__ import annotations

import json

import pytest

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.kernels.sampling import per_prompt, warpers
from flexgen_lite.openai_api.batch_lines import check_request
from flexgen_lite.openai_api.requests import Served
from flexgen_lite.openai_api.runner import run_jobs

from .conftest import PROMPTS, copy_with_eos

POLICY = Policy(gpu_batch_size=4, num_gpu_batches=2, dtype="float32")


def test_per_prompt_settings():
    mixed = [SamplingConfig(4, stop=("w5",)), SamplingConfig(9, 0.7, top_p=0.5, seed=3, stop_at_eos=False)]
    shared, configs = per_prompt(mixed, 2)
    assert shared.max_new_tokens == 9 and configs == mixed
    assert per_prompt(SamplingConfig(3, seed=5), 2)[1] == [SamplingConfig(3, seed=5)] * 2
    assert warpers(SamplingConfig(4, top_p=0.5)) == warpers(SamplingConfig(4))  # greedy: top_p does not matter
    with pytest.raises(ValueError, match="one for each of the 3 prompts"):
        per_prompt([SamplingConfig(4)] * 2, 3)


def test_a_block_of_rows_alike_picks_as_they_ask_not_as_the_calls_first(tiny_models):
    """The call's first prompt is greedy; a block holding only sampled rows samples them (helper-32: such a block
    picked by the first prompt's settings, greedily)."""
    path = tiny_models["llama"][0]
    prompts = [PROMPTS[0]] + [p for p in PROMPTS for _ in range(2)]  # 15 prompts: two blocks of 8
    configs = [SamplingConfig(6, stop_at_eos=False)] + [SamplingConfig(6, 1.0, seed=i, stop_at_eos=False)
                                                        for i in range(len(prompts) - 1)]
    with FlexGenLite(str(path), policy=POLICY) as m:
        blocks = []
        together = m.generate_ids(prompts, configs, on_block=lambda done: blocks.append(sorted(done)))
        alone = [m.generate_ids([p], c, indices=[i])[0] for i, (p, c) in enumerate(zip(prompts, configs, strict=True))]
    assert any(0 not in block for block in blocks)  # a block of sampled rows alone
    assert together == alone


def test_rows_stopping_their_own_ways_generate_as_alone(tiny_models, references, tmp_path):
    """In one block: rows that end at eos beside rows that ignore it, rows with stop strings of their own beside
    rows without: each ends where it ends generated alone."""
    refs = references["llama"][0]  # 8 greedy tokens a prompt, eos ignored
    path = copy_with_eos(tiny_models["llama"][0], tmp_path / "m", refs[1][3])  # prompt 1's 4th token: eos
    prompts = PROMPTS[:6] + [PROMPTS[1]]  # prompt 1 twice: ignoring eos (row 1), ending at it (row 6)
    with FlexGenLite(str(path), policy=POLICY) as m:
        stop = m.decode(refs[2][1:2])  # prompt 2's second token's text
        configs = [SamplingConfig(8, stop_at_eos=i != 1, stop=(stop,) if i == 2 else ()) for i in range(7)]
        blocks = []
        together = m.generate_ids(prompts, configs, on_block=lambda done: blocks.append(len(done)))
        alone = [m.generate_ids([p], c)[0] for p, c in zip(prompts, configs, strict=True)]
    assert blocks == [len(prompts)] and together == alone
    assert together[1] == refs[1] and together[6] == refs[1][:4]  # past its eos; ended at it
    assert together[2] == refs[2][:2] and together[3] == refs[3][:len(together[3])]  # at its stop string; not


def test_rows_of_their_own_lengths_and_seeds_generate_as_alone(tiny_models, references):
    path = tiny_models["llama"][0]
    greedy = [SamplingConfig(max_new_tokens=2 + i, stop_at_eos=False) for i in range(len(PROMPTS))]
    sampled = [SamplingConfig(max_new_tokens=3 + i % 3, temperature=0.5 + 0.25 * (i % 3), top_k=(0, 5)[i % 2],
                              top_p=(1.0, 0.9)[i % 2], seed=10 + i, stop_at_eos=False) for i in range(len(PROMPTS))]
    sampled[1] = SamplingConfig(max_new_tokens=5, temperature=1.0, seed=None, stop_at_eos=False)  # unseeded
    sampled[2] = SamplingConfig(max_new_tokens=4, stop_at_eos=False)  # greedy beside sampled rows
    with FlexGenLite(str(path), policy=POLICY) as m:
        blocks = []
        ids = m.generate_ids(PROMPTS, greedy, on_block=lambda done: blocks.append(len(done)))
        assert blocks == [len(PROMPTS)]  # one block: the rows stopped at their own lengths
        assert ids == [ref[:2 + i] for i, ref in enumerate(references["llama"][0])]
        together = m.generate_ids(PROMPTS, sampled)
        alone = [m.generate_ids([p], s, indices=[i])[0] for i, (p, s) in enumerate(zip(PROMPTS, sampled, strict=True))]
    assert [len(t) for t in together] == [s.max_new_tokens for s in sampled]
    assert [t for i, t in enumerate(together) if i != 1] == [a for i, a in enumerate(alone) if i != 1]


def test_the_doors_run_requests_of_other_lengths_seeds_and_stops_in_one_call(tiny_models, monkeypatch):
    path = tiny_models["llama"][0]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": "w5 w6 w7", "max_tokens": 2 + i, "temperature": 0.5 + 0.1 * i,
                                  "top_p": 0.95, "seed": i, "ignore_eos": i % 2 == 1,
                                  "stop": ["w1"] if i == 5 else None}})
             for i in range(6)]
    with FlexGenLite(str(path), policy=POLICY) as m:
        served = Served("tiny", m.config, m.tokenizer)
        jobs = [job for line in lines for job in check_request(line, served)[1].jobs]
        calls = []
        generate_ids = m.generate_ids
        monkeypatch.setattr(m, "generate_ids", lambda prompts, *a, **k: calls.append(len(prompts))
                            or generate_ids(prompts, *a, **k))
        outputs = run_jobs(m, jobs)
        assert calls == [6]  # one engine call for all six
        alone = [run_jobs(m, [job])[0] for job in jobs]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in alone]
    assert [o.text for o in outputs] == [o.text for o in alone]
    assert [len(o.token_ids) for o in outputs[:5]] == [2 + i for i in range(5)]
    assert all(o.finish_reason == "length" for o in outputs[:5])
