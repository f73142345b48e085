"""The stop-string check after each step (step_checks.stop_check) decodes only a row's last tokens: it ends a row at
the same step as decoding its whole text would, on a byte-level tokenizer (SmolLM2's) whose tokens split
characters, for rows carried on from an earlier block too. The text a stream sends after each step
(runner.settled_text) is never cut later by a stop string."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from flexgen_lite import FlexGenLite, SamplingConfig, default_model_path
from flexgen_lite.engine.block import Block
from flexgen_lite.model_source import open_model
from flexgen_lite.openai_api.runner import settled_text
from flexgen_lite.step_checks import stop_check
from flexgen_lite.stragglers import Carried


def first_step(check, ids: list[int], carried: int) -> int | None:
    """The step after which `check` ends a row generating `ids`, its first `carried` made in an earlier block (and
    in this one's prompt, after the first's, as the engine carries a row on)."""
    block = Block.from_prompts([[1] + ids[:carried]], 1, 1, len(ids) - carried, 0, (), torch.device("cpu"))
    for k, token in enumerate(ids[carried:], start=1):
        block.tokens[0, block.prompt_len + k - 1] = token
        block.length[0] = k
        check(block)
        if block.finished[0]:
            return carried + k
    return None


def test_a_stop_string_ends_its_row_at_the_step_the_whole_text_first_holds_it():
    tokenizer = open_model(default_model_path())[2]
    rng = random.Random(0)
    words = [tokenizer.encode(w, add_special_tokens=False) for w in
             (" the", " Human:", "\n\n", " ünïcödé", " 日本語", " ok", "Ж", " —", "ab", "🙂", " x")]
    checked = 0
    for _ in range(60):
        ids = [t for _ in range(rng.randrange(8, 30)) for t in rng.choice(words + [[rng.randrange(17, 49152)]])]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        start = rng.randrange(len(text))
        stop = (text[start:start + rng.randrange(1, 9)],)
        whole = next(k for k in range(1, len(ids) + 1)
                     if stop[0] in tokenizer.decode(ids[:k], skip_special_tokens=True))
        carried = rng.randrange(0, whole)
        check = stop_check(tokenizer, [stop], {0: Carried(ids[:carried])} if carried else {})
        assert first_step(check, ids, carried) == whole, (ids, stop, carried)
        checked += 1
    assert checked == 60


def test_streamed_text_is_never_cut_later():
    """Each step's settled text begins the final (stop-cut) text; helper-32: a stop of three emoji streamed two of
    them, while the third's bytes were split across tokens."""
    tokenizer = open_model(default_model_path())[2]
    model = SimpleNamespace(tokenizer=tokenizer)
    model.decode = lambda ids, stop=(), context=(): FlexGenLite.decode(model, ids, stop, context)
    for text, stop in (("Hi 🌟🌟🌟 there", "🌟🌟🌟"), ("Fin — voilà é", "— voi"), ("a\n\nHuman: b", "\n\nHuman:"),
                       ("日本語のテキスト", "のテ")):
        ids = tokenizer.encode(text, add_special_tokens=False)
        sampling = SamplingConfig(len(ids), stop=(stop,))
        final = model.decode(ids, sampling.stop)
        assert final == text[:text.index(stop)]
        for k in range(1, len(ids) + 1):
            assert final.startswith(settled_text(model, ids[:k], sampling)), (text, k)
