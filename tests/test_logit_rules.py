"""A row's penalties, logit bias, min-p, min_tokens and stop tokens (kernels/logit_rules.py, sampling.warped):
each rule as transformers' own logits processor computes it (the frequency and presence penalties, which it lacks,
as OpenAI defines them), greedy generation with them token-identical to transformers' generate under placements
across a link and over GPU batches, rows with rules of their own in one block as alone, carried rows counting
their output from its start, and the doors taking vLLM's and OpenAI's fields."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.kernels.logit_rules import LogitRules
from flexgen_lite.kernels.sampling import warped

from .conftest import PROMPTS, VOCAB, copy_with_eos

ROWS, COLUMNS = 6, 20
POLICIES = {
    "all-in-memory": (Policy(gpu_batch_size=4, num_gpu_batches=1, dtype="float32"), None),
    "weights-and-cache-across-a-link": (Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=0,
                                               weight_cpu_percent=100, cache_gpu_percent=50, cache_cpu_percent=50,
                                               dtype="float32"), "cpu+link"),
    "cpu-attention": (Policy(gpu_batch_size=3, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100,
                             cpu_cache_compute=True, dtype="float32"), "cpu+link"),
}


def history(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (ROWS, VOCAB), token ids (ROWS, COLUMNS)) drawn at random, ids from a small range so they repeat."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, VOCAB, generator=gen) * 3, torch.randint(0, 40, (ROWS, COLUMNS), generator=gen)


def ruled(logits, tokens, configs, context_from=0, output_from=0, eos=(2,)):
    rules = LogitRules.of(configs, eos, torch.device("cpu"))
    n = len(configs)
    return rules.apply(logits, torch.arange(n), tokens, torch.full((n,), context_from),
                       torch.full((n,), output_from), tokens.shape[1])


def test_repetition_penalty_is_transformers():
    logits, tokens = history()
    for penalty in (1.3, 0.7):
        ours = ruled(logits, tokens, [SamplingConfig(repetition_penalty=penalty)] * ROWS)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(tokens, logits.clone())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # left padding is not context: columns before a row's start are left out
    ours = ruled(logits, tokens, [SamplingConfig(repetition_penalty=1.3)] * ROWS, context_from=8)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(tokens[:, 8:], logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_logit_bias_is_transformers_sequence_bias():
    logits, tokens = history(1)
    bias = {5: 3.5, 17: -100.0, 300: 0.25}
    ours = ruled(logits, tokens, [SamplingConfig(logit_bias=bias)] * ROWS)
    theirs = SequenceBiasLogitsProcessor({(i,): v for i, v in bias.items()})(tokens, logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ruled(logits, tokens, [SamplingConfig(logit_bias={5: 1.0})] * ROWS)[:, 17].equal(logits[:, 17])


def test_min_tokens_is_transformers_min_new_tokens():
    logits, tokens = history(2)
    prompt = 12  # the output so far: the last 8 columns
    for least in (8, 9):
        ours = ruled(logits, tokens, [SamplingConfig(max_new_tokens=16, min_tokens=least)] * ROWS, output_from=prompt,
                     eos=(2, 7))
        theirs = MinNewTokensLengthLogitsProcessor(prompt, least, [2, 7])(tokens, logits.clone())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a stop token of the row's own is held back too, and eos not where the row ignores it
    config = SamplingConfig(max_new_tokens=16, min_tokens=9, stop_token_ids=(30,), stop_at_eos=False)
    ours = ruled(logits, tokens, [config] * ROWS, output_from=prompt, eos=(2,))
    assert torch.isinf(ours[:, 30]).all() and ours[:, 2].equal(logits[:, 2])


def test_frequency_and_presence_penalties_are_openais():
    """OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c[j] the output's count of j."""
    logits, tokens = history(3)
    configs = [SamplingConfig(frequency_penalty=f, presence_penalty=p) for f, p in
               ((0.5, 0.0), (0.0, 1.5), (0.8, -0.4), (-1.0, 2.0), (0.0, 0.0), (2.0, 2.0))]
    output_from = 9  # the prompt's tokens do not count
    ours = ruled(logits, tokens, configs, output_from=output_from)
    for row, c in enumerate(configs):
        expected = logits[row].clone()
        for token, count in Counter(tokens[row, output_from:].tolist()).items():
            expected[token] -= count * c.frequency_penalty + c.presence_penalty
        torch.testing.assert_close(ours[row], expected, rtol=0, atol=1e-6)


def test_min_p_is_transformers_and_the_warpers_go_in_vllms_order():
    logits, _ = history(4)
    for temperature, min_p in ((1.0, 0.05), (0.6, 0.2), (1.5, 1.0)):
        ours = warped(logits, SamplingConfig(temperature=temperature, min_p=min_p))
        theirs = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))
    ours = warped(logits, SamplingConfig(temperature=0.8, top_k=50, top_p=0.9))
    theirs = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.8)(None, logits.clone())))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))


def test_settings_checked():
    for bad, match in ((dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                       (dict(presence_penalty=float("nan")), "presence_penalty"),
                       (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={5: float("inf")}), "logit_bias"),
                       (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(min_tokens=40), "min_tokens"),
                       (dict(min_tokens=2, stop=("w5",)), "min_tokens with stop strings")):
        with pytest.raises(ValueError, match=match):
            SamplingConfig(max_new_tokens=32, **bad)
    assert SamplingConfig(logit_bias=[(9, 1.0), (3, 2.0)]).logit_bias == ((3, 2.0), (9, 1.0))
    assert hash(SamplingConfig(logit_bias={3: 1})) == hash(SamplingConfig(logit_bias=((3, 1.0),)))


def hf_generate(model, prompts, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=1,
                               **kwargs)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("placement", POLICIES)
def test_greedy_with_rules_is_transformers_generate(tiny_models, tmp_path, placement):
    tiny_dir, model = tiny_models["llama"]
    policy, device = POLICIES[placement]
    plain = hf_generate(model, PROMPTS, eos_token_id=None)
    eos = plain[1][2]  # prompt 1's third token: ends it early unless min_tokens holds it back
    model_dir = copy_with_eos(tiny_dir, tmp_path / "m", eos)
    bias = {plain[0][0]: -5.0, 77: 4.0}
    cases = [(dict(repetition_penalty=1.8, stop_at_eos=False), dict(repetition_penalty=1.8, eos_token_id=None)),
             (dict(logit_bias=bias, stop_at_eos=False),
              dict(sequence_bias={(i,): v for i, v in bias.items()}, eos_token_id=None)),
             (dict(min_tokens=5), dict(min_new_tokens=5, eos_token_id=eos)),
             (dict(), dict(eos_token_id=eos))]
    with FlexGenLite(str(model_dir), policy=policy, device=device) as m:
        for ours, theirs in cases:
            got = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, **ours))
            expected = hf_generate(model, PROMPTS, **theirs)
            assert got == expected, ours
            assert got != plain or not ours  # each rule changed something
    assert len(expected[1]) == 3  # eos ends prompt 1 where min_tokens does not hold it back


def test_rows_with_rules_of_their_own_generate_as_alone_and_stop_at_their_tokens(tiny_models):
    tiny_dir, _ = tiny_models["llama"]
    with FlexGenLite(str(tiny_dir), policy=Policy(gpu_batch_size=4, num_gpu_batches=2, dtype="float32")) as m:
        free = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8, stop_at_eos=False))
        configs = [SamplingConfig(8, stop_at_eos=False),
                   SamplingConfig(8, stop_at_eos=False, stop_token_ids=(free[1][3],)),
                   SamplingConfig(8, 0.9, seed=4, min_p=0.1, presence_penalty=1.0, stop_at_eos=False),
                   SamplingConfig(8, stop_at_eos=False, frequency_penalty=1.5),
                   SamplingConfig(8, stop_at_eos=False, repetition_penalty=2.0, logit_bias={free[4][1]: -50.0}),
                   SamplingConfig(8, stop_at_eos=False, stop_token_ids=(free[5][2], 3), min_tokens=4),
                   SamplingConfig(8, stop_at_eos=False, presence_penalty=-1.0)]
        together = m.generate_ids(PROMPTS, configs)
        alone = [m.generate_ids([p], c, indices=[i])[0] for i, (p, c) in enumerate(zip(PROMPTS, configs, strict=True))]
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.generate_ids(PROMPTS[:1], SamplingConfig(logit_bias={VOCAB: 1.0}))
    assert together == alone
    assert together[1] == free[1][:4]  # ended at its stop token, kept in its ids
    assert together[0] == free[0] and together[3] != free[3] and together[4] != free[4]
    assert len(together[5]) >= 4 and free[5][2] not in together[5][:3]


def test_carried_rows_count_their_output_from_its_start(tiny_models, tmp_path):
    """A row carried on to a later block has its output so far at the end of its prompt there: the penalties
    count it as output, so its tokens are those it makes kept in its block."""
    from .test_stragglers import EIGHT, NEW, cut, run, stopping_ids, with_eos

    tiny_dir, _ = tiny_models["llama"]
    rules = dict(frequency_penalty=0.7, presence_penalty=0.6, repetition_penalty=1.2)
    with FlexGenLite(str(tiny_dir), policy=Policy(gpu_batch_size=4, num_gpu_batches=1, dtype="float32")) as m:
        free = m.generate_ids(EIGHT, SamplingConfig(max_new_tokens=NEW, stop_at_eos=False, **rules))
    eos, _ = stopping_ids(free)
    model_dir = with_eos(tiny_dir, tmp_path, eos)
    carried, _, said = run(model_dir, SamplingConfig(max_new_tokens=NEW, **rules), True)
    kept, _, _ = run(model_dir, SamplingConfig(max_new_tokens=NEW, **rules), False)
    assert sum("carried on" in s for s in said) == 2
    assert carried == kept == [cut(r, eos) for r in free]


def test_the_generate_command_takes_them_and_a_resume_checks_them(tiny_models, tmp_path, capsys):
    import json

    from flexgen_lite.cli.main import main

    opt_dir = str(tiny_models["opt"][0])
    flags = ["--frequency-penalty", "1.5", "--repetition-penalty", "1.3", "--logit-bias", "77=4",
             "--logit-bias", "6=-100", "--stop-token-id", "9", "--min-tokens", "2"]
    base = ["generate", "--model", opt_dir, "--dtype", "float32", "--policy", "manual", "--max-new-tokens", "6",
            "--json", "w5 w6 w7", "w9 w9"]
    main(base + flags)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    config = SamplingConfig(6, frequency_penalty=1.5, repetition_penalty=1.3, logit_bias={77: 4, 6: -100},
                            stop_token_ids=(9,), min_tokens=2)
    with FlexGenLite(opt_dir, policy=Policy(gpu_batch_size=2, dtype="float32")) as m:
        expected = [m.decode(ids, (), m.encode([p])[0]) for p, ids in
                    zip(("w5 w6 w7", "w9 w9"), m.generate_ids(m.encode(["w5 w6 w7", "w9 w9"]), config), strict=True)]
    assert [line["text"] for line in lines] == expected
    out = tmp_path / "out.jsonl"
    main(base[:-2] + ["--output", str(out), "w5 w6 w7"] + flags)
    with pytest.raises(SystemExit):
        main(base[:-2] + ["--output", str(out), "w5 w6 w7", "w9 w9"])
    assert "made with --frequency-penalty 1.5, not (none)" in capsys.readouterr().err
    same = [f.replace("77=4", "77=4.0") if f == "77=4" else f for f in flags] + ["--stop-token-id", "9"]
    main(base[:-2] + ["--output", str(out), "w5 w6 w7", "w9 w9"] + same)  # the same rules written otherwise
    assert "resuming: 1 of 2" in capsys.readouterr().err
    plain = tmp_path / "plain.jsonl"  # a file whose record names no rule (as one made before they existed)
    main(base[:-2] + ["--output", str(plain), "w5 w6 w7"])
    assert "frequency_penalty" not in json.loads(plain.read_text().splitlines()[0])["flexgen_lite_run"]["settings"]
    main(base[:-2] + ["--output", str(plain), "w5 w6 w7", "w9 w9"])
    assert "resuming: 1 of 2" in capsys.readouterr().err


def test_helper_46s_cases():
    """A repetition penalty that is 0 in fp32 (its -inf * 0 made NaN of min_tokens' ban) and biases past fp32's
    range are refused; the ban comes last, so no rule can make it NaN; a bias named twice is refused; stop tokens
    are a sorted set."""
    for bad in (dict(repetition_penalty=1e-50), dict(logit_bias={5: -1e39}), dict(frequency_penalty=1e39),
                dict(logit_bias=[(5, 1.0), (5, 2.0)])):
        with pytest.raises(ValueError):
            SamplingConfig(max_new_tokens=8, **bad)
    logits, tokens = history(5)
    tiny = SamplingConfig(max_new_tokens=16, min_tokens=9, repetition_penalty=torch.finfo(torch.float32).tiny)
    out = ruled(logits, tokens, [tiny] * ROWS, output_from=12, eos=(tokens[0, 3].item(),))
    assert not out.isnan().any() and torch.isinf(out[:, tokens[0, 3]]).all()
    assert SamplingConfig(stop_token_ids=(9, 3, 9)).stop_token_ids == (3, 9)


def test_a_stop_token_on_the_last_allowed_token_is_a_stop(tiny_models):
    """helper-46: the doors said "length" where a stop token id ended the output at max_tokens (eos: "stop")."""
    from flexgen_lite.openai_api.requests import Served, prepare
    from flexgen_lite.openai_api.runner import run_jobs

    with FlexGenLite(str(tiny_models["llama"][0]), policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        served = Served("tiny", m.config, m.tokenizer)
        body = {"prompt": "w17 w43", "max_tokens": 4, "temperature": 0}
        free = run_jobs(m, prepare("/v1/completions", body, served).jobs)[0].token_ids
        for at in (2, 3):
            work = prepare("/v1/completions", body | {"stop_token_ids": [free[at]]}, served)
            out = run_jobs(m, work.jobs)[0]
            assert out.token_ids == free[:at + 1] and out.finish_reason == "stop"
