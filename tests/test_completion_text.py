"""A completion's text continues its prompt's (completion_text.py): decoded after the prompt's last tokens, so a
SentencePiece tokenizer's first word keeps its leading space, a stop string with one is found at the first token,
and the texts of every door agree. The reference: the text transformers' tokenizer gives the prompt and completion
decoded together, less the prompt's (as transformers' text-generation pipeline cuts it, and vLLM's text reads)."""

from __future__ import annotations

import pytest

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.completion_text import text_after
from flexgen_lite.openai_api.runner import output_of, settled_text, token_logprobs

from .conftest import VOCAB, make_checkpoint

PROMPT = "w5 w17 w99 w250 w3 w42 w77 w8"


def metaspace_tokenizer(path) -> None:
    """Llama-2's and Mistral's way: words as '▁w5', decoded with the first one's leading space dropped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"▁w{i}": i for i in range(VOCAB)}, unk_token="▁w0"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="▁w0", pad_token="▁w1",
                            eos_token="▁w2").save_pretrained(str(path))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("metaspace") / "llama"
    make_checkpoint(path, "llama", seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    metaspace_tokenizer(path)
    with FlexGenLite(str(path), policy=Policy(gpu_batch_size=2, dtype="float32"), device="cpu") as m:
        yield m


def test_a_completion_keeps_its_first_words_leading_space(model):
    prompt = model.encode([PROMPT])[0]
    gen = model.generate_ids([prompt], SamplingConfig(6, stop_at_eos=False))[0]
    tokenizer = model.tokenizer
    expected = tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)):]
    assert expected.startswith(" ") and not tokenizer.decode(gen).startswith(" ")  # what was dropped
    assert model.generate(PROMPT, max_new_tokens=6) == expected == text_after(tokenizer, prompt, gen)
    assert output_of(model, gen, SamplingConfig(6)).text == tokenizer.decode(gen)  # no prompt given: alone
    assert output_of(model, gen, SamplingConfig(6), prompt=prompt).text == expected
    assert settled_text(model, gen, SamplingConfig(6), prompt) == expected
    kept = [(0.0, [])] * len(gen)
    assert "".join(text for text, _, _ in token_logprobs(model, gen, kept, prompt)) == expected


def test_a_stop_string_with_a_leading_space_is_found_at_the_first_token(model):
    """helper-36: ' w79' as a stop string, the first token's text after the prompt, ran to max_tokens."""
    prompt = model.encode([PROMPT])[0]
    gen = model.generate_ids([prompt], SamplingConfig(6, stop_at_eos=False))[0]
    first = text_after(model.tokenizer, prompt, gen[:1])
    stopped = model.generate_ids([prompt], SamplingConfig(6, stop=(first,), stop_at_eos=False))[0]
    assert stopped == gen[:1]
    assert model.generate(PROMPT, max_new_tokens=6, stop=first) == ""
    third = text_after(model.tokenizer, prompt + gen[:2], gen[2:3])  # later tokens: found as before
    assert model.generate_ids([prompt], SamplingConfig(6, stop=(third,), stop_at_eos=False))[0] == gen[:3]


def test_special_tokens_at_the_prompts_end_are_not_its_context(model):
    """helper-42: the context was the prompt's last six tokens, special ones (skipped when decoding) included; a
    prompt ending in six of them (a chat template's end tokens) gave its completion no context: no leading space,
    and a stop string with it not found. Its last tokens with text are the context."""
    eos = model.tokenizer.eos_token_id
    prompt = model.encode(["w5 w6"])[0] + [eos] * 7
    gen = model.generate_ids([prompt], SamplingConfig(4, stop_at_eos=False))[0]
    tokenizer = model.tokenizer
    whole = tokenizer.decode(prompt + gen, skip_special_tokens=True)
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    assert text_after(tokenizer, prompt, gen) == whole[len(head):] and whole[len(head)] == " "
    first = text_after(tokenizer, prompt, gen[:1])
    assert model.generate_ids([prompt], SamplingConfig(4, stop=(first,), stop_at_eos=False))[0] == gen[:1]


def test_a_rows_left_padding_is_not_its_context(tmp_path):
    """helper-42: the stop check read a row's context from the block, left padding included; with a pad id that is
    an ordinary word and a prompt without text, a stop string matched the pad's text and the row stopped early,
    batched beside a longer prompt only (its text had no stop string, its finish reason said stop)."""
    path = tmp_path / "llama"
    make_checkpoint(path, "llama", seed=5, pad_token_id=5)  # the config's pad: '▁w5', a word
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    metaspace_tokenizer(path)
    with FlexGenLite(str(path), policy=Policy(gpu_batch_size=2, dtype="float32"), device="cpu") as m:
        short, long = [m.tokenizer.eos_token_id], m.encode(["w9 w10 w11 w12 w13 w14 w15 w16"])[0]
        gen = m.generate_ids([short], SamplingConfig(6, stop_at_eos=False))[0]
        words = m.decode(gen, (), short).split()
        later = next(k for k in range(1, 6) if words[k] == words[0])  # the first word again
        stop = " " + words[0]  # found where the word comes again, not at the first (nothing before it)
        alone = m.generate_ids([short], SamplingConfig(6, stop=(stop,), stop_at_eos=False))[0]
        batched = m.generate_ids([short, long], SamplingConfig(6, stop=(stop,), stop_at_eos=False))[0]
    assert alone == batched == gen[:later + 1]
