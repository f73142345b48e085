"""A real trained model end to end: SmolLM2-135M-Instruct from its GGUF file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig

from .conftest import hf_greedy

TEXTS = ["The capital of France is", "def add(a, b):", "Water boils at a temperature of",
         "Once upon a time, there was a"]


@pytest.fixture(scope="module")
def reference(smollm):
    path, model = smollm
    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer

    tok = gguf_tokenizer(path)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    return prompts, hf_greedy(model, prompts, 12)


THREE_TIERS = Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=20, weight_cpu_percent=40,
                     cache_gpu_percent=0, cache_cpu_percent=50, cpu_cache_compute=True, dtype="float32")


@pytest.mark.parametrize("policy,device", [
    (Policy(gpu_batch_size=4, dtype="float32"), "cpu"),
    (THREE_TIERS, "cpu"),
    (Policy(gpu_batch_size=4, dtype="float32", compress_weight=True), "cpu"),  # the file's Q4_1 groups as stored
    # the copies a GPU makes, made by the CPU (dense three tiers across the link: the tiny models' parity tests)
    (dataclasses.replace(THREE_TIERS, compress_weight=True), "cpu+link"),
], ids=["all-on-compute-device", "weights-and-cache-on-three-tiers", "4-bit-as-stored",
        "4-bit-as-stored-on-three-tiers-across-a-link"])
def test_greedy_equals_transformers_on_the_gguf(smollm, reference, policy, device):
    prompts, (ref_ids, ref_logits) = reference
    with FlexGenLite(smollm[0], policy=policy, device=device) as m:
        ids, logits = m.generate_ids(prompts, SamplingConfig(max_new_tokens=12, stop_at_eos=False),
                                     return_logits=True)
    assert ids == ref_ids
    for ours, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def bf16_model(smollm):
    """The model as the CPU runs it by default (bf16), loaded once for the tests below that need no other
    placement (each load of the GGUF dequantizes and checks all its tensors)."""
    with FlexGenLite(smollm[0], policy=Policy(gpu_batch_size=2)) as m:
        yield m


def answers_a_factual_question(m: FlexGenLite) -> None:
    plain = m.generate("The capital of France is", max_new_tokens=12)
    chat = m.generate("What is the capital of France?", max_new_tokens=12, chat=True)
    assert "Paris" in plain and "Paris" in chat


def test_answers_a_factual_question_bf16(bf16_model):
    answers_a_factual_question(bf16_model)


def test_answers_a_factual_question_bf16_4bit_weights(smollm):
    with FlexGenLite(smollm[0], policy=Policy(gpu_batch_size=2, compress_weight=True)) as m:
        answers_a_factual_question(m)


def test_chat_template_applied(bf16_model):
    ids = bf16_model.encode(["Hi"], chat=True)[0]
    text = bf16_model.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_generate_says_to_use_chat_when_an_instruct_model_ends_at_once(capsys):
    """SmolLM2-Instruct answers some raw questions with end-of-turn at once (its real greedy output): when most
    answers are empty `generate` says that --chat applies its template; with --chat none is, and nothing is said."""
    from flexgen_lite.cli.main import main

    questions = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?"]
    main(["generate", "--max-new-tokens", "6", "--policy", "manual", "--json", *questions])
    out, err = capsys.readouterr()
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert [bool(t.strip()) for t in texts] == [False, True, False]
    assert "2 of 3 completions are empty" in err and "--chat" in err
    main(["generate", "--max-new-tokens", "6", "--policy", "manual", "--json", "--chat", *questions])
    out, err = capsys.readouterr()
    assert all(json.loads(line)["text"].strip() for line in out.splitlines())
    assert "completions are empty" not in err
