"""A completion's text as the continuation of its prompt's: its tokens decoded after the prompt's last few, so
the text keeps what those tokens add there. A SentencePiece tokenizer (Llama-2's, Mistral's) drops a leading
space when it decodes from a sequence's first token: decoded alone, a completion " Paris" read "Paris", and a
stop string " Paris" could not be found at its first token (helper-36). vLLM decodes the same way."""

from __future__ import annotations

import contextlib
import weakref

CONTEXT_TOKENS = 6  # tokens decoded before one to find its text (a character's bytes, a word's leading space)


def context_tail(tokenizer, context: list[int]) -> list[int]:
    """The last CONTEXT_TOKENS tokens of `context` that have text: special tokens (skipped when decoding) do not
    count (helper-42: a prompt ending in six of them left its completion without its first word's space)."""
    special = _special_ids(tokenizer)
    tail = []
    for token in reversed(context):
        if token not in special:
            tail.append(token)
            if len(tail) == CONTEXT_TOKENS:
                break
    return tail[::-1]


_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's special ids, read once (the stop check asks for every row of a step's first steps)."""
    try:
        return _SPECIAL[tokenizer]
    except (KeyError, TypeError):
        ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        with contextlib.suppress(TypeError):  # an object without weak references: read each time
            _SPECIAL[tokenizer] = ids
        return ids


def text_after(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text `ids` add to the text of `context` (the tokens before them; special tokens skipped); their text
    alone where the context's own text is not a prefix of it (a character split between the two)."""
    if context:
        context = context_tail(tokenizer, context)
        head = tokenizer.decode(context, skip_special_tokens=True)
        whole = tokenizer.decode(context + list(ids), skip_special_tokens=True)
        if whole.startswith(head) and not head.endswith("\ufffd"):
            return whole[len(head):]
    return tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to the first of the stop strings in it."""
    return text[:min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))]
