"""Outputs held to a form (vLLM's guided decoding, OpenAI's JSON mode and structured outputs): one of given
choices, a whole match of a regular expression, a JSON object, or JSON of a schema (kernels/json_form.py).

A guided row picks its token on the host, from its logits after its rules (logit_rules.py): the token it would
pick anyway (greedy: the likeliest; sampling: its draw) unless that token leaves no way to the form; then the
next likeliest, or a new draw without the refused tokens, so that sampling draws from the row's distribution
restricted to the tokens that keep the form. The form is the text's after its leading whitespace (at most
BLANK_RUN characters: a word tokenizer's or SentencePiece's first word carries its space, as the output's text
does). End-of-sequence is allowed only where the text is whole; a whole text that cannot grow (a choice made, a
JSON object closed) ends the row. Only guided rows pay: one read of their logits
a step and a few decodes of candidate texts (completion_text.text_after, so a token's text is its text after the
prompt and the tokens before it)."""

from __future__ import annotations

import bisect
import json

import regex
import torch

from .completion_text import _special_ids, text_after
from .kernels.json_form import BLANK_RUN, json_grows, json_state
from .kernels.sampling import SamplingConfig, warped

UNREAD = 1e-4  # sampling: the tokens that keep the form are read until the others' mass is below this of theirs
READ_AT_MOST = 1024  # ... or this many tokens have been read (a form the model finds unlikely: the rest's mass,
# a little of the whole, is left out)
BEGUN = ("\u00e9", "\u4e2d", "\U0001f600")  # characters of 2, 3 and 4 UTF-8 bytes


class Form:
    def viable_begun(self, text: str) -> bool:
        """Whether a character of more than one byte may follow `text` (one of each length is tried: a form that
        needs another such character there, one the tokenizer spells in bytes, is not reached)."""
        return any(self.viable(text + c) for c in BEGUN)

    def starts_blank(self) -> bool:
        """Whether the form itself may begin with whitespace (then a text's leading whitespace is its own)."""
        return any(self.viable(c) for c in " \n\t")


class Choice(Form):
    def __init__(self, choices: tuple[str, ...]):
        self.choices, self.sorted, self.set = choices, sorted(set(choices)), frozenset(choices)

    def _from(self, text: str) -> int:
        return bisect.bisect_left(self.sorted, text)  # the choices beginning with `text` follow it in order

    def viable(self, text: str) -> bool:
        i = self._from(text)
        return i < len(self.sorted) and self.sorted[i].startswith(text)

    def whole(self, text: str) -> bool:
        return text in self.set

    def grows(self, text: str) -> bool:
        i = self._from(text) + (text in self.set)
        return i < len(self.sorted) and self.sorted[i].startswith(text)

    def viable_begun(self, text: str) -> bool:
        i = self._from(text)
        while i < len(self.sorted) and self.sorted[i].startswith(text):
            if len(self.sorted[i]) > len(text) and not self.sorted[i][len(text)].isascii():
                return True
            i += 1
        return False


class Pattern(Form):
    def __init__(self, pattern: str):
        self.pattern = regex.compile(pattern)

    def viable(self, text: str) -> bool:
        return self.pattern.fullmatch(text, partial=True) is not None

    def whole(self, text: str) -> bool:
        match = self.pattern.fullmatch(text, partial=True)
        return match is not None and not match.partial

    def grows(self, text: str) -> bool:
        return True  # a regular expression's whole match may go on (a row ends at eos, or at a token no form takes)


class Json(Form):
    def __init__(self, schema: dict):
        self.schema = schema

    def viable(self, text: str) -> bool:
        return json_state(text, self.schema) is not None

    def whole(self, text: str) -> bool:
        return json_state(text, self.schema) == "whole"

    def grows(self, text: str) -> bool:
        return json_grows(text, self.schema)


def form_of(guided: tuple):
    kind, *args = guided
    return {"choice": lambda: Choice(tuple(args)), "regex": lambda: Pattern(args[0]),
            "json_object": lambda: Json({"type": "object"}), "json_schema": lambda: Json(json.loads(args[0]))}[kind]()


class Guide:
    """A guided row: its form, the tokenizer, its prompt's tokens and the tokens it made (carried ones too)."""

    def __init__(self, guided: tuple, tokenizer, prompt: list[int], made: list[int], eos: tuple[int, ...],
                 ends_at_eos: bool):
        self.form, self.tokenizer, self.context, self.made = form_of(guided), tokenizer, list(prompt), list(made)
        self.eos, self.ends_at_eos = eos, ends_at_eos
        self.special = _special_ids(tokenizer) - set(eos)
        self.blank_ahead = not self.form.starts_blank()  # a tokenizer's leading space is not the form's
        self.text = text_after(tokenizer, self.context, self.made) if self.made else ""

    def _with(self, token: int) -> str:
        """The text with `token` after it: what the token adds after the tokens before it (a few decoded), or
        the whole text decoded again where it ends inside a character."""
        if self.text.endswith("\ufffd") or not self.made:
            return text_after(self.tokenizer, self.context, self.made + [token])
        return self.text + text_after(self.tokenizer, self.context + self.made, [token])

    def _form_text(self, text: str) -> str | None:
        """The part of `text` the form checks: all of it, or where the form does not begin with whitespace, what
        follows at most BLANK_RUN characters of it; None where those are more."""
        if not self.blank_ahead:
            return text
        form = text.lstrip()
        return form if len(text) - len(form) <= BLANK_RUN else None

    def _takes(self, token: int) -> bool:
        if token in self.eos:
            form = self._form_text(self.text)
            return self.ends_at_eos and form is not None and self.form.whole(form)
        if token in self.special:
            return False
        text = self._with(token)
        form = self._form_text(text)
        if form is None or text == self.text or not form:  # nothing added (an unlisted special token), or blank
            return False
        if form.endswith("\ufffd"):  # a character begun (its first bytes): one the form takes there may come
            return self.form.viable_begun(form[:-1])
        return self.form.viable(form)

    def pick(self, logits: torch.Tensor, config: SamplingConfig, generator, first: int) -> tuple[int | None, bool]:
        """(the token, whether the row ends after it) from the row's logits (vocab,) on the host; `first`: the
        token it picked unguided. (None, True): no token keeps the form, the row ends without one."""
        token = first if self._takes(first) else self._search(logits, config, generator, first)
        if token is None:
            return None, True
        if token not in self.eos:
            self.text = self._with(token)
            self.made.append(token)
        form = self._form_text(self.text)
        return token, token in self.eos or (form is not None and self.form.whole(form) and not self.form.grows(form))

    def _search(self, logits: torch.Tensor, config: SamplingConfig, generator, refused: int) -> int | None:
        """Greedy: the likeliest token that keeps the form. Sampling: a draw from the row's distribution over the
        tokens that keep it, found likeliest first until the mass left unread is below UNREAD of theirs, or
        READ_AT_MOST tokens are read (the unguided draw, refused, was not one of them: so the pick is a draw from
        the restricted distribution, but for the unread tokens' share)."""
        if config.temperature > 0:
            probs = warped(logits[None].float(), config).softmax(-1)[0]
            sorted_probs, order = probs.sort(descending=True)
            kept, mass, left = [], 0.0, 1.0
            for read, (token, p) in enumerate(zip(order.tolist(), sorted_probs.tolist(), strict=True)):
                if p == 0 or kept and (left <= UNREAD * mass or read >= READ_AT_MOST):
                    break
                left -= p
                if token != refused and self._takes(token):
                    kept.append(token)
                    mass += p
            if kept:
                pick = torch.multinomial(probs[kept], 1, generator=generator)
                return kept[int(pick)]
        allowed, order = logits.sort(descending=True)  # greedy, or no token the warpers keep keeps the form
        for token, logit in zip(order.tolist(), allowed.tolist(), strict=True):
            if logit == float("-inf"):  # banned (min_tokens, a bias): none of the rest either
                return None
            if token != refused and self._takes(token):
                return token
        return None
