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


NOTES = {"title", "description", "default", "format", "examples", "strict", "$schema", "$id", "$comment", "$defs",
         "definitions"}


def check_schema(schema, where: str = "schema", root=None) -> None:
    """SchemaError naming the first keyword, value or combination not read here, or a schema no text can meet."""
    root = schema if root is None else root
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be an object or a boolean, got {schema!r}")
    for key, value in schema.items():
        if key not in READ:
            raise SchemaError(f"{where}: the keyword {key!r} is not supported (read: {', '.join(sorted(READ))})")
        _check_value(key, value, where, root)
    alone = sorted({"anyOf", "$ref", "enum", "const"} & set(schema)) or [""]
    beside = set(schema) - NOTES - {alone[0]} - ({"type"} if alone[0] in ("enum", "const") else set())
    if alone[0] and beside:  # JSON schema applies both; this reader would apply one
        raise SchemaError(f"{where}: {alone[0]} beside {sorted(beside)} is not supported (put the other keywords into "
                          "each alternative, or drop them)")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", not properties)
    if extra is False and set(schema.get("required", ())) - set(properties):
        raise SchemaError(f"{where}: required {sorted(set(schema['required']) - set(properties))} are not in its "
                          "properties, and no other key is allowed (additionalProperties)")
    if schema.get("minItems", 0) > schema.get("maxItems", float("inf")):
        raise SchemaError(f"{where}: minItems is above maxItems")


def _check_value(key: str, value, where: str, root) -> None:
    here = f"{where}.{key}"
    if key == "type":
        types = [value] if isinstance(value, str) else value
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t in TYPES for t in types):
            raise SchemaError(f"{here}: a type or a list of them ({', '.join(sorted(TYPES))}), got {value!r}")
    elif key in ("properties", "$defs", "definitions"):
        if not isinstance(value, dict):
            raise SchemaError(f"{here} must be an object, got {value!r}")
        for name, sub in value.items():
            check_schema(sub, f"{here}.{name}", root)
    elif key in ("items", "additionalProperties"):
        check_schema(value, here, root)
    elif key == "anyOf":
        if not isinstance(value, list) or not value:
            raise SchemaError(f"{here} must be a list of schemas, got {value!r}")
        for k, sub in enumerate(value):
            check_schema(sub, f"{here}[{k}]", root)
    elif key == "enum" and (not isinstance(value, list) or not value):
        raise SchemaError(f"{here} must be a list of values, got {value!r}")
    elif key == "required" and (not isinstance(value, list) or not all(isinstance(k, str) for k in value)):
        raise SchemaError(f"{here} must be a list of keys, got {value!r}")
    elif key in ("minItems", "maxItems") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SchemaError(f"{here} must be a whole number >= 0, got {value!r}")
    elif key == "$ref":
        _target(value, root, here)


def _target(ref, root, where: str):
    """The schema a $ref names (one level into $defs or definitions), following references to references; a
    SchemaError for a missing one or a loop of them."""
    seen = []
    while True:
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions") or "~" in parts[2]:
            raise SchemaError(f"{where}: only references to #/$defs/NAME or #/definitions/NAME, got {ref!r}")
        defs = root.get(parts[1])
        if not isinstance(defs, dict) or parts[2] not in defs:
            raise SchemaError(f"{where}: {ref} names no schema")
        if ref in seen:
            raise SchemaError(f"{where}: references in a loop ({' -> '.join(seen + [ref])})")
        seen.append(ref)
        target = defs[parts[2]]
        if not (isinstance(target, dict) and "$ref" in target):
            return target
        ref = target["$ref"]


def json_state(text: str, schema: dict) -> str | None:
    """"whole", "open" or None for `text` against `schema` (no whitespace before or after the value)."""
    if not text:
        return "open"
    if text[0] in " \t\n\r":
        return None
    end = _Reader(text, schema).value(0, schema)
    if end == OPEN and _Reader(text + " ", schema).value(0, schema) == len(text):  # a number, whole at the top
        return "whole"
    return None if end is None else "open" if end == OPEN else "whole" if end == len(text) else None


def json_grows(text: str, schema: dict) -> bool:
    """Whether a whole `text` may go on (a number at the top: 12 to 120)."""
    return any(json_state(text + c, schema) is not None for c in "0.eE")


def json_object_state(text: str) -> str | None:
    return json_state(text, {"type": "object"})


class _Reader:
    def __init__(self, text: str, root: dict):
        self.text, self.n, self.root = text, len(text), root

    def resolve(self, schema):
        if isinstance(schema, dict) and "$ref" in schema:  # checked: it names a schema, and no loop
            schema = _target(schema["$ref"], self.root, "schema")
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
        if "anyOf" in schema:  # alone beside notes (check_schema)
            return next((end for alt in schema["anyOf"] if (end := self.value(i, self.resolve(alt))) is not None),
                        None)
        types = schema.get("type", TYPES)
        types = {types} if isinstance(types, str) else set(types)
        if "const" in schema or "enum" in schema:  # beside its type alone (check_schema)
            values = [schema["const"]] if "const" in schema else schema["enum"]
            return self.literal(i, [v for v in values if _type_of(v) & types])
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
        """A value of `values` at i, as json.dumps spells it with or without spaces and escapes; a number only
        where no digit follows (1 is not the start of 12)."""
        rest, opened = self.text[i:], False
        for value in values:
            for text in {json.dumps(value, separators=sep, ensure_ascii=ascii) for sep in ((", ", ": "), (",", ":"))
                         for ascii in (True, False)}:
                number = text[-1] in "0123456789"
                if rest.startswith(text) and not (number and rest[len(text):len(text) + 1] in set("0123456789.eE")
                                                  and len(rest) > len(text)):
                    return i + len(text)
                opened = opened or text.startswith(rest)
        return OPEN if opened else None

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
            if end == OPEN:  # inside the key: a beginning of one still to come (escaped or not)
                if allowed is None:
                    return OPEN
                part = self.text[i:]
                return OPEN if any(json.dumps(k).startswith(part) or json.dumps(k, ensure_ascii=False).startswith(part)
                                   for k in allowed) else None
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


def _type_of(value) -> set[str]:
    """The JSON types a value is of (an integer is a number too; a bool is neither)."""
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    return {{type(None): "null", str: "string", list: "array", dict: "object"}.get(type(value), "?")}


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
