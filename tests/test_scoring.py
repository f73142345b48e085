"""Prefill-only scoring (scoring.py): log-likelihoods equal to transformers' under every kind of placement."""

from __future__ import annotations

import random

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy
from flexgen_lite.engine.scoring import rolling_windows

from .test_parity import POLICIES

# fp32 on both sides: per scored token, within this
TOKEN_ATOL = 1e-4


def requests(n: int = 11, seed: int = 0, choices: int = 1) -> list[tuple[list[int], list[int]]]:
    """n contexts, each with `choices` continuations (requests sharing a context share a prefill row)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        context = [2] + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 30))]
        out += [(context, [rng.randrange(3, 512) for _ in range(rng.randrange(1, 7))]) for _ in range(choices)]
    return out


def hf_score(model, reqs) -> list[tuple[float, bool]]:
    out = []
    with torch.no_grad():
        for context, cont in reqs:
            full = context + cont
            logits = model(torch.tensor([full[:-1]])).logits[0, -len(cont):].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
            out.append((float(lp.sum()), bool((logits.argmax(-1) == torch.tensor(cont)).all())))
    return out


def check(ours, theirs, reqs) -> None:
    for (a, ga), (b, gb), (_, cont) in zip(ours, theirs, reqs, strict=True):
        assert abs(a - b) <= TOKEN_ATOL * len(cont), (a, b)
        assert ga == gb


PLACEMENTS = ["all-gpu", "weights-cpu", "weights-disk", "cache-disk", "act-disk-split", "one-row-batches",
              "cpu-attention-cache-split", "all-disk-overlap"]


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("name", PLACEMENTS)
def test_score_equals_transformers(tiny_models, family, name):
    path, model = tiny_models[family]
    reqs = requests() + requests(6, seed=1, choices=4)  # single requests, and contexts shared by four
    rng = random.Random(2)
    reqs = [reqs[i] for i in rng.sample(range(len(reqs)), len(reqs))]
    prompts = [context + cont for context, cont in reqs[:7]] + [[2]]
    with FlexGenLite(str(path), policy=POLICIES[name]) as m:
        ours = m.score(reqs)
        assert m.score_stats.rows == len(reqs) and m.score_stats.fed < m.score_stats.tokens
        each = m.prompt_logprobs(prompts, top=3)
    check(ours, hf_score(model, reqs), reqs)
    for prompt, places in zip(prompts, each, strict=True):  # every token's, and the top 3 there
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        assert len(places) == len(prompt) and places[0] is None
        for n, (logprob, top) in enumerate(places[1:]):
            assert logprob == pytest.approx(reference[n, prompt[n + 1]].item(), abs=TOKEN_ATOL)
            assert [lp for _, lp in top] == pytest.approx(reference[n].topk(3).values.tolist(), abs=TOKEN_ATOL)


def test_greedy_continuations_are_recognized(tiny_models):
    """A model's own greedy continuation scores as greedy (the reference output is far from degenerate)."""
    path, model = tiny_models["opt"]
    with FlexGenLite(str(path), policy=POLICIES["all-gpu"]) as m:
        prompts = [c for c, _ in requests(5, seed=1)]
        conts = m.generate_ids(prompts)
        ours = m.score(list(zip(prompts, [c[:4] for c in conts], strict=True)))
    assert all(g for _, g in ours)


def test_score_in_chunks_equals_one_chunk(tiny_models, monkeypatch):
    """The head's logits made a few positions at a time give the same sums as all at once."""
    import flexgen_lite.engine.scoring as scoring

    path, _ = tiny_models["llama"]
    reqs = requests() + requests(3, seed=4, choices=3)
    with FlexGenLite(str(path), policy=POLICIES["weights-cpu"]) as m:
        whole = m.score(reqs)
        monkeypatch.setattr(scoring, "CHUNK_BYTES", 512 * 4 * 3 * 2)  # two positions of one row at a time
        chunked = m.score(reqs)
    check(chunked, whole, reqs)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_rolling_over_documents_longer_than_the_context(tiny_models, family):
    """Documents of 5, 64 and 150 tokens (the models' context: 64): every token scored once, each window's
    sum as transformers'."""
    path, model = tiny_models[family]
    rng = random.Random(3)
    docs = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 64, 150)]
    with FlexGenLite(str(path), policy=Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=0,
                                              weight_cpu_percent=100, dtype="float32")) as m:
        ours = m.loglikelihood_rolling(docs, prefix_token=2)
    for doc, total in zip(docs, ours, strict=True):
        windows = rolling_windows(doc, 2, 64)
        assert [t for _, c in windows for t in c] == doc
        assert all(len(c) + len(x) - 1 <= 64 for x, c in windows)
        theirs = sum(lp for lp, _ in hf_score(model, windows))
        assert abs(total - theirs) <= TOKEN_ATOL * len(doc)


def test_rolling_windows_are_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(3, 200))
    for max_len in (1, 7, 64, 196, 197, 300):
        theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 2, max_len, 1)]
        assert rolling_windows(tokens, 2, max_len) == [(list(a), list(b)) for a, b in theirs]


def test_shared_contexts_past_one_row(tiny_models):
    """Continuations of one context that do not fit one row of the context (64) spill into more rows, and a
    request cut from the left (longer than the context) is scored alone."""
    path, model = tiny_models["opt"]
    rng = random.Random(5)
    context = [2] + [rng.randrange(3, 512) for _ in range(30)]
    reqs = [(context, [rng.randrange(3, 512) for _ in range(8)]) for _ in range(6)]
    reqs.append(([2] + [rng.randrange(3, 512) for _ in range(70)], [7, 8]))
    with FlexGenLite(str(path), policy=POLICIES["weights-cpu"]) as m:
        ours = m.score(reqs)
    full = reqs[-1][0] + reqs[-1][1]
    cut = [(full[-65:-2], [7, 8])]
    check(ours, hf_score(model, reqs[:-1] + cut), reqs)


def test_empty_context_and_no_room_are_errors(tiny_models):
    with FlexGenLite(str(tiny_models["opt"][0]), policy=POLICIES["all-gpu"]) as m:
        with pytest.raises(ValueError, match="empty context"):
            m.score([([], [5])])
        for max_len in (0, -3, True, 2.5):  # not the model's context
            with pytest.raises(ValueError, match="max_len must be a whole number >= 1"):
                m.score([([2, 7], [5])], max_len=max_len)
        # a continuation past max_len was scored in part, without a word (helper-43); lm-eval's hf model refuses it
        assert len(m.score([([2, 7], list(range(3, 11)))], max_len=8)) == 1  # as long as max_len: whole
        with pytest.raises(ValueError, match="continuation has 9 tokens, more than the 8 a request can score"):
            m.score([([2, 7], list(range(3, 12)))], max_len=8)


def test_logits_are_made_in_chunks_the_budgets_leave_room_for(tiny_models):
    """The head's fp32 logits of scored places (and their log-softmax) are not in the block's memory plan beyond a
    GPU batch's: with a budget, as many places at once as the room left beside the planned peak holds."""
    from flexgen_lite import Budgets, Workload
    from flexgen_lite.engine import scoring
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.memory_plan import peak_memory

    path = str(tiny_models["llama"][0])
    policy, config = Policy(gpu_batch_size=2, dtype="float32"), model_config(path)
    vocab, place = config.vocab_size, config.vocab_size * 4 * 3
    peak = peak_memory(config, Workload(40, 1), policy, False)[1]["cpu"]
    with FlexGenLite(path, policy=policy) as m:
        assert scoring._chunk_places(m, 40) == scoring.CHUNK_BYTES // place
    with FlexGenLite(path, policy=policy, budgets=Budgets(cpu=int(peak) + 10 * place)) as m:
        assert scoring._chunk_places(m, 40) == (10 * place + 2 * vocab * (4 + 8)) // place
        reqs = requests(4)
        check(m.score(reqs), hf_score(tiny_models["llama"][1], reqs), reqs)
