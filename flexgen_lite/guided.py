"""Outputs held to a form (vLLM's guided decoding, OpenAI's JSON mode): one of given choices, a whole match of a
regular expression, or a JSON object.

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

import regex
import torch

from .completion_text import _special_ids, text_after
from .kernels.sampling import SamplingConfig, warped

UNREAD = 1e-4  # sampling: the tokens that keep the form are read until the others' mass is below this of theirs
READ_AT_MOST = 1024  # ... or this many tokens have been read (a form the model finds unlikely: the rest's mass,
# a little of the whole, is left out)
BLANK_RUN = 16  # whitespace a JSON object may hold in a row (a model in JSON mode can emit it without end)
NUMBER = regex.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
LITERALS = ("true", "false", "null")
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


class JsonObject(Form):
    def viable(self, text: str) -> bool:
        return json_object_state(text) is not None

    def whole(self, text: str) -> bool:
        return json_object_state(text) == "whole"

    def grows(self, text: str) -> bool:
        return not self.whole(text)


def form_of(guided: tuple):
    kind, *args = guided
    return {"choice": lambda: Choice(tuple(args)), "regex": lambda: Pattern(args[0]),
            "json_object": JsonObject}[kind]()


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


def json_object_state(text: str) -> str | None:
    """Whether `text` begins a JSON object ("open"), is one ("whole": nothing after its last brace), or neither
    (None). Whitespace between tokens at most BLANK_RUN characters in a row; none before or after the object."""
    stack: list[str] = []
    expect, i, n, blank = "start", 0, len(text), 0
    while i < n:
        ch = text[i]
        if ch in " \t\n\r" and expect not in ("start", "end"):
            blank += 1
            if blank > BLANK_RUN:
                return None
            i += 1
            continue
        blank = 0
        if expect == "start" and ch == "{" or expect in ("value", "value_or_close") and ch in "{[":
            stack.append(ch)
            expect, i = ("key_or_close" if ch == "{" else "value_or_close"), i + 1
        elif expect in ("key_or_close", "comma_or_close") and ch == "}" and stack[-1] == "{" \
                or expect in ("value_or_close", "comma_or_close") and ch == "]" and stack[-1] == "[":
            stack.pop()
            expect, i = ("comma_or_close" if stack else "end"), i + 1
        elif expect in ("key_or_close", "key") and ch == '"' or expect in ("value", "value_or_close") and ch == '"':
            end = _string_end(text, i)
            if end is None or end == n:
                return None if end is None else "open"
            expect, i = ("colon" if expect.startswith("key") else "comma_or_close"), end
        elif expect == "colon" and ch == ":":
            expect, i = "value", i + 1
        elif expect == "comma_or_close" and ch == ",":
            expect, i = ("key" if stack[-1] == "{" else "value"), i + 1
        elif expect in ("value", "value_or_close") and (ch == "-" or ch.isdigit() and ch.isascii()):
            end = i
            while end < n and text[end] in "0123456789.eE+-":
                end += 1
            match = NUMBER.fullmatch(text[i:end], partial=end == n)
            if match is None:
                return None
            if end == n:
                return "open"
            expect, i = "comma_or_close", end
        elif expect in ("value", "value_or_close") and ch in "tfn":
            word = next(w for w in LITERALS if w[0] == ch)
            if not word.startswith(text[i:i + len(word)]):
                return None
            if i + len(word) > n:
                return "open"
            expect, i = "comma_or_close", i + len(word)
        else:
            return None
    return "whole" if expect == "end" else "open"


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string opening at text[i], len(text) where it is still open, None where it is
    not a JSON string's beginning."""
    j, n = i + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == '"':
            return j + 1
        if ch == "\\":
            if j + 1 == n:
                return n
            escape = text[j + 1]
            if escape == "u":
                digits = text[j + 2:j + 6]
                if any(c not in "0123456789abcdefABCDEF" for c in digits):
                    return None
                if len(digits) < 4:
                    return n
                j += 6
            elif escape in '"\\/bfnrt':
                j += 2
            else:
                return None
        elif ord(ch) < 0x20:
            return None
        else:
            j += 1
    return n
