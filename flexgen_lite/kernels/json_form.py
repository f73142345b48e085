"""JSON text held to a schema, read as it grows: whether a text begins a value the schema admits ("open"), is one
("whole"), or neither (None). OpenAI's JSON mode is the schema {"type": "object"}.

The schema keywords read: type (one or a list), properties, required, additionalProperties (with properties given,
other keys only where it is true or a schema), items, minItems, maxItems, enum, const, anyOf (the first
alternative that reads the text), $ref to #/$defs/... or #/definitions/...; title, description, default, format,
examples and strict are notes. Keywords that constrain in ways not read here (pattern, minLength, minimum, oneOf,
...) are refused by `check_schema`, so that no output passes for what the schema forbids."""

from __future__ import annotations

import json

import regex

BLANK_RUN = 16  # whitespace in a row (a model in JSON mode can emit it without end)
NUMBER = regex.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
INTEGER = regex.compile(r"-?(0|[1-9][0-9]*)")
OPEN = -1  # a parse that reached the text's end inside a value, still admissible
READ = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
        "anyOf", "$ref", "$defs", "definitions", "title", "description", "default", "format", "examples", "strict",
        "$schema", "$id", "$comment"}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class SchemaError(ValueError):
    pass


def check_schema(schema, where: str = "schema") -> None:
    """SchemaError naming the first keyword or type not read here."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be an object, got {schema!r}")
    for key, value in schema.items():
        if key not in READ:
            raise SchemaError(f"{where}: the keyword {key!r} is not supported (read: {', '.join(sorted(READ))})")
        if key == "type" and not set([value] if isinstance(value, str) else value) <= TYPES:
            raise SchemaError(f"{where}: unknown type {value!r}")
        if key in ("properties", "$defs", "definitions"):
            for name, sub in value.items():
                check_schema(sub, f"{where}.{key}.{name}")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, f"{where}.{key}")
        elif key == "anyOf":
            for k, sub in enumerate(value):
                check_schema(sub, f"{where}.anyOf[{k}]")
        elif key == "$ref" and not (value.startswith("#/$defs/") or value.startswith("#/definitions/")):
            raise SchemaError(f"{where}: only references into #/$defs or #/definitions are supported, got {value!r}")


def json_state(text: str, schema: dict) -> str | None:
    """"whole", "open" or None for `text` against `schema` (no whitespace before or after the value)."""
    if not text:
        return "open"
    if text[0] in " \t\n\r":
        return None
    end = _Reader(text, schema).value(0, schema)
    return None if end is None else "open" if end == OPEN else "whole" if end == len(text) else None


def json_object_state(text: str) -> str | None:
    return json_state(text, {"type": "object"})


class _Reader:
    def __init__(self, text: str, root: dict):
        self.text, self.n, self.root = text, len(text), root

    def resolve(self, schema):
        while isinstance(schema, dict) and "$ref" in schema:
            _, defs, name = schema["$ref"].split("/", 2)
            schema = self.root.get(defs, {})[name]
        return {} if schema is True else schema

    def blank(self, i: int) -> int | None:
        start = i
        while i < self.n and self.text[i] in " \t\n\r":
            i += 1
        return None if i - start > BLANK_RUN else i

    def value(self, i: int, schema) -> int | None:
        schema = self.resolve(schema)
        if schema is False:
            return None
        if i == self.n:
            return OPEN
        if "anyOf" in schema:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            return next((end for alt in schema["anyOf"] if (end := self.value(i, rest | self.resolve(alt)))
                         is not None), None)
        if "const" in schema or "enum" in schema:
            return self.literal(i, [schema["const"]] if "const" in schema else schema["enum"])
        types = schema.get("type", TYPES)
        types = {types} if isinstance(types, str) else set(types)
        ch = self.text[i]
        if ch == "{" and "object" in types:
            return self.object(i + 1, schema)
        if ch == "[" and "array" in types:
            return self.array(i + 1, schema)
        if ch == '"' and "string" in types:
            return string_end(self.text, i)
        if ch == "-" or ch.isdigit() and ch.isascii():
            return self.number(i, types)
        for word, kind in (("true", "boolean"), ("false", "boolean"), ("null", "null")):
            if ch == word[0] and kind in types:
                part = self.text[i:i + len(word)]
                return None if not word.startswith(part) else OPEN if len(part) < len(word) else i + len(word)
        return None

    def literal(self, i: int, values: list) -> int | None:
        rest = self.text[i:]
        for text in (json.dumps(v) for v in values):
            if rest.startswith(text):
                return i + len(text)
            if text.startswith(rest):
                return OPEN
        return None

    def number(self, i: int, types: set[str]) -> int | None:
        end = i
        while end < self.n and self.text[end] in "0123456789.eE+-":
            end += 1
        pattern = NUMBER if "number" in types else INTEGER if "integer" in types else None
        if pattern is None or pattern.fullmatch(self.text[i:end], partial=end == self.n) is None:
            return None
        return OPEN if end == self.n else end

    def object(self, i: int, schema: dict) -> int | None:
        properties, required = schema.get("properties", {}), set(schema.get("required", ()))
        extra = schema.get("additionalProperties", not properties)
        seen: set[str] = set()
        while True:
            i = self.blank(i)
            if i is None or i == self.n:
                return None if i is None else OPEN
            if self.text[i] == "}" and not seen:
                return i + 1 if required <= seen else None
            if self.text[i] != '"':
                return None
            end = string_end(self.text, i)
            allowed = [k for k in properties if k not in seen] if extra is False else None
            if end is None:
                return None
            if end == OPEN:  # inside the key: a beginning of one still to come
                if allowed is None:
                    return OPEN
                return OPEN if any(json.dumps(k).startswith(self.text[i:]) for k in allowed) else None
            key = json.loads(self.text[i:end])
            if key in seen or allowed is not None and key not in allowed:
                return None
            seen.add(key)
            i = self.blank(end)
            if i is None or i == self.n or self.text[i] != ":":
                return None if i is None or i < self.n else OPEN
            i = self.blank(i + 1)
            if i is None:
                return None
            i = self.value(i, properties.get(key, {} if extra is True else extra))
            if i is None or i == OPEN:
                return i
            i = self.blank(i)
            if i is None or i == self.n:
                return None if i is None else OPEN
            if self.text[i] == "}":
                return i + 1 if required <= seen else None
            if self.text[i] != "," or extra is False and seen >= set(properties):
                return None
            i += 1

    def array(self, i: int, schema: dict) -> int | None:
        items, count = schema.get("items", {}), 0
        least, most = schema.get("minItems", 0), schema.get("maxItems")
        while True:
            i = self.blank(i)
            if i is None or i == self.n:
                return None if i is None else OPEN
            if self.text[i] == "]" and count == 0:
                return i + 1 if least == 0 else None
            if most is not None and count >= most:
                return None
            i = self.value(i, items)
            if i is None or i == OPEN:
                return i
            count += 1
            i = self.blank(i)
            if i is None or i == self.n:
                return None if i is None else OPEN
            if self.text[i] == "]":
                return i + 1 if count >= least else None
            if self.text[i] != ",":
                return None
            i += 1


def string_end(text: str, i: int) -> int | None:
    """The index after the JSON string opening at text[i], OPEN where the text ends inside it, None where it is
    not a JSON string's beginning."""
    j, n = i + 1, len(text)
    while j < n:
        ch = text[j]
        if ch == '"':
            return j + 1
        if ch == "\\":
            if j + 1 == n:
                return OPEN
            escape = text[j + 1]
            if escape == "u":
                digits = text[j + 2:j + 6]
                if any(c not in "0123456789abcdefABCDEF" for c in digits):
                    return None
                if len(digits) < 4:
                    return OPEN
                j += 6
            elif escape in '"\\/bfnrt':
                j += 2
            else:
                return None
        elif ord(ch) < 0x20:
            return None
        else:
            j += 1
    return OPEN
