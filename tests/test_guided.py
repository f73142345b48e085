"""Outputs held to a form (guided.py): the JSON object check against Python's json module, guided greedy output
token-identical to transformers' logits picked under the same rule, sampling drawing from the distribution
restricted to the tokens that keep the form, and the doors and the command line taking vLLM's and OpenAI's fields."""

from __future__ import annotations

import json

import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.kernels.json_form import json_object_state

from .conftest import PROMPTS

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4), st.sampled_from([None, 1, 2]),
       st.booleans(), st.booleans())
def test_every_prefix_of_a_json_object_is_open_and_the_object_whole(obj, indent, compact, ascii_only):
    text = json.dumps(obj, indent=indent, separators=(",", ":") if compact and indent is None else None,
                      ensure_ascii=ascii_only)
    assert json_object_state(text) == "whole"
    assert all(json_object_state(text[:i]) == "open" for i in range(len(text)))
    assert json_object_state(text + " ") is None and json_object_state(text + "}") is None


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='{}[]":,-.0123456789eEtruefalsn \\u', max_size=24))
def test_what_it_calls_a_whole_object_json_reads_as_one(text):
    state = json_object_state(text)
    if state == "whole":
        assert isinstance(json.loads(text), dict)
    try:
        whole = isinstance(json.loads(text), dict) and text == text.strip()
    except ValueError:
        whole = False
    assert whole == (state == "whole") or len(text) - len(text.lstrip()) > 0  # none before the object


def reference(model, tokenizer, prompt, form, new_tokens, eos=None):
    """transformers' logits, each step's token the likeliest whose text (the word tokenizer's, after the prompt:
    its first word's space) keeps the form after its leading space; its special tokens other than eos never taken;
    eos only where the text is whole; ends where the text is whole and cannot grow (a choice)."""
    kind, *args = form
    pattern = regex.compile(args[0]) if kind == "regex" else None

    def viable(text):
        return any(c.startswith(text) for c in args) if kind == "choice" else \
            pattern.fullmatch(text, partial=True) is not None

    def whole(text):
        if kind == "choice":
            return text in args
        match = pattern.fullmatch(text, partial=True)
        return match is not None and not match.partial

    made = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([prompt + made])).logits[0, -1]
            text = tokenizer.decode(made, skip_special_tokens=True)
            for token in logits.argsort(descending=True).tolist():
                if token == eos:
                    if whole(text):
                        return made + [token]
                elif token not in tokenizer.all_special_ids and viable(
                        tokenizer.decode(made + [token], skip_special_tokens=True)):
                    made.append(token)
                    break
            else:  # no token keeps the form (a word tokenizer cannot spell w300 after w30): the row ends there
                return made
            text = tokenizer.decode(made, skip_special_tokens=True)  # the words joined: no leading space
            if kind == "choice" and whole(text) and not any(len(c) > len(text) and c.startswith(text) for c in args):
                return made
    return made


FORMS = [("choice", "w5 w6 w7", "w5 w9", "w300"), ("regex", r"w[0-9]*7( w[0-9]+)*"),
         ("regex", r"(w[0-9]+ ){1,3}w1[0-9]*")]


@pytest.mark.parametrize("policy,device", [
    (Policy(gpu_batch_size=4, num_gpu_batches=1, dtype="float32"), None),
    (Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100, cache_gpu_percent=50,
            cache_cpu_percent=50, dtype="float32"), "cpu+link")], ids=["in-memory", "across-a-link"])
def test_guided_greedy_is_transformers_logits_picked_by_the_form(tiny_models, policy, device):
    tiny_dir, model = tiny_models["llama"]
    eos = 2  # the word tokenizer's eos: special, so not in the text
    with FlexGenLite(str(tiny_dir), policy=policy, device=device) as m:
        for form in FORMS:
            got = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, guided=form))
            expected = [reference(model, m.tokenizer, p, form, 6, eos) for p in PROMPTS]
            assert got == expected, form
            texts = [m.decode(ids, (), p) for ids, p in zip(got, PROMPTS, strict=True)]
            if form[0] == "choice":  # a choice, or at a dead end (no word spells what is left) a choice's beginning
                assert all(any(c.startswith(t.strip()) for c in form[1:]) for t in texts)
                assert sum(t.strip() in form[1:] for t in texts) >= 3
        free = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6))
        assert free != got  # the forms changed what was generated


def test_sampling_draws_from_the_distribution_restricted_to_the_form(tiny_models):
    """A first token under three choices: the tokens that keep the form are the words that begin one (w3 and w30
    begin w300); their frequencies over 300 rows within 4.5 sigma of the model's probabilities renormalised over
    them. Rows with their own seeds sample as alone."""
    tiny_dir, model = tiny_models["llama"]
    prompt = PROMPTS[0]
    choices, keep = ("w5", "w9", "w300"), [5, 9, 3, 30, 300]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    probs = logits[keep].softmax(-1)
    config = SamplingConfig(max_new_tokens=1, temperature=1.0, seed=3, guided=("choice", *choices))
    with FlexGenLite(str(tiny_dir), policy=Policy(gpu_batch_size=100, num_gpu_batches=2, dtype="float32")) as m:
        ids = m.generate_ids([prompt] * 300, config)
        alone = [m.generate_ids([prompt], config, indices=[i])[0] for i in (0, 7, 299)]
    assert [ids[i] for i in (0, 7, 299)] == alone
    counts = torch.tensor([sum(i == [t] for i in ids) for t in keep], dtype=torch.float)
    assert counts.sum() == 300
    sigma = (300 * probs * (1 - probs)).sqrt()
    assert ((counts - 300 * probs).abs() <= 4.5 * sigma + 1).all(), (counts, 300 * probs)


def test_rows_of_their_own_forms_share_a_block_and_carry_on(tiny_models):
    tiny_dir, _ = tiny_models["llama"]
    configs = [SamplingConfig(6, guided=FORMS[i % 3]) if i % 2 else SamplingConfig(6) for i in range(len(PROMPTS))]
    with FlexGenLite(str(tiny_dir), policy=Policy(gpu_batch_size=4, num_gpu_batches=2, dtype="float32")) as m:
        together = m.generate_ids(PROMPTS, configs)
        alone = [m.generate_ids([p], c)[0] for p, c in zip(PROMPTS, configs, strict=True)]
        carried = m.generate_ids(PROMPTS, configs, carry_over=True)
    assert together == alone == carried


def test_json_mode_gives_json_objects_from_a_real_model(smollm):
    path, _ = smollm
    asks = ["Give a fictional person's name and age as JSON.", "Describe a cat as JSON with keys color and legs."]
    with FlexGenLite(path, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        greedy = m.generate(asks[:1], chat=True, max_new_tokens=48, guided=("json_object",))
        sampled = m.generate(asks[1:], chat=True, max_new_tokens=24, guided=("json_object",), temperature=1.0,
                             seed=0)
        choice = m.generate(["Is Paris the capital of France? Answer yes or no."], chat=True,
                            guided=("choice", "yes", "no"))
    for text in greedy + sampled:  # an object, or where the tokens ran out, its beginning
        assert json_object_state(text) in ("whole", "open")
        if json_object_state(text) == "whole":
            assert isinstance(json.loads(text), dict)
    assert isinstance(json.loads(greedy[0]), dict) and json.loads(greedy[0])
    assert choice == ["yes"]


def test_the_doors_and_the_command_line_take_the_forms(tiny_models, capsys):
    from flexgen_lite.cli.main import main
    from flexgen_lite.openai_api.batch_lines import check_request
    from flexgen_lite.openai_api.requests import RequestError, Served, prepare
    from flexgen_lite.openai_api.runner import run_jobs

    tiny_dir = str(tiny_models["llama"][0])
    with FlexGenLite(tiny_dir, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        served = Served("tiny", m.config, m.tokenizer)
        bodies = [{"guided_choice": ["w5 w6 w7", "w300"]}, {"guided_regex": r"w[0-9]*7( w[0-9]+)*"}]
        lines = [json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                             "body": {"prompt": "w17 w43", "max_tokens": 6, "temperature": 0, **b}})
                 for i, b in enumerate(bodies)]
        outputs = run_jobs(m, [job for line in lines for job in check_request(line, served)[1].jobs])
        expected = [m.generate("w17 w43", max_new_tokens=6, guided=form) for form in
                    (("choice", "w5 w6 w7", "w300"), ("regex", r"w[0-9]*7( w[0-9]+)*"))]
        assert [o.text for o in outputs] == expected
        for bad, field in (({"guided_regex": "("}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
                           ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
                           ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
                           ({"guided_grammar": "root ::= x"}, "guided_grammar"),
                           ({"guided_json": {"type": "object", "oneOf": []}}, "guided_json")):
            with pytest.raises(RequestError) as e:
                prepare("/v1/completions", {"prompt": "w5", **bad}, served)
            assert e.value.status == 400 and e.value.param == field, (bad, e.value.message)
    main(["generate", "--model", tiny_dir, "--dtype", "float32", "--policy", "manual", "--max-new-tokens", "6",
          "--json", "--choice", "w5 w6 w7", "--choice", "w300", "w17 w43"])
    assert json.loads(capsys.readouterr().out)["text"] == expected[0]


def test_helper_47s_cases_on_a_real_tokenizer(smollm):
    """A choice that begins with a space is reached (the form checked on the text as it is, where it may begin
    with whitespace); a whitespace-only token does not count as a step toward a choice; tokens that add no text
    (SmolLM2's special tokens 3-16 beyond its listed ones) are never taken; a row whose form is out of reach ends
    without a token, also where the model has no eos; greedy never takes a banned token."""
    from flexgen_lite.guided import Guide

    path, _ = smollm
    ask = "Q: Is Paris in France?\nA:"
    with FlexGenLite(path, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        spaced = m.generate([ask], guided=("choice", " yes", " no"), max_new_tokens=5)[0]
        plain = m.generate([ask], guided=("choice", "yes", "no"), max_new_tokens=5)[0]
        prompt = m.encode([ask])[0]
        ids = m.generate_ids([prompt], SamplingConfig(12, stop_at_eos=False, guided=("regex", "(yes|no)")))[0]
        tokenizer = m.tokenizer
    assert spaced in (" yes", " no")
    assert plain.strip() in ("yes", "no") and len(plain) - len(plain.strip()) <= 1
    assert m.decode(ids, (), prompt).strip() in ("yes", "no") and len(ids) <= 2  # ended there: nothing else fits
    assert not set(ids) & set(range(17))
    guide = Guide(("regex", "x"), tokenizer, prompt, [], (), True)  # no eos at all
    x = tokenizer.encode("x")[-1]
    logits = torch.zeros(tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 49152)
    logits[x] = 5.0
    assert guide.pick(logits, SamplingConfig(4), None, x)[0] == x
    assert guide.pick(logits, SamplingConfig(4), None, x) == (None, True)  # "x" whole: nothing more keeps it
    banned = Guide(("regex", "(y|n)"), tokenizer, prompt, [], (), True)
    logits = torch.full_like(logits, float("-inf"))
    logits[0] = 1.0
    assert banned.pick(logits, SamplingConfig(4), None, 0) == (None, True)  # y and n banned: not taken


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets", "role", "boss"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 2},
                         "role": {"enum": ["admin", "user"]}, "boss": {"anyOf": [{"type": "null"}, {"type": "string"}]},
                         "score": {"type": "number"}},
          "$defs": {"pet": {"type": "object", "properties": {"kind": {"type": "string"}, "legs": {"type": "integer"}},
                            "required": ["kind"]}}}
PETS = st.lists(st.fixed_dictionaries({"kind": st.text(max_size=4)}, optional={"legs": st.integers(0, 8)}),
                max_size=2)
PEOPLE = st.fixed_dictionaries(
    {"name": st.text(max_size=6), "age": st.integers(-5, 200), "pets": PETS, "role": st.sampled_from(["admin", "user"]),
     "boss": st.none() | st.text(max_size=4)},
    optional={"score": st.floats(allow_nan=False, allow_infinity=False)})


@settings(max_examples=200, deadline=None)
@given(PEOPLE, st.sampled_from([None, 2]), st.randoms())
def test_a_schemas_instances_read_whole_and_their_prefixes_open(person, indent, rnd):
    """jsonschema (the reference) takes every instance; the reader calls each whole and each prefix open, and the
    instance with a key dropped, a key added, or a value of another type never whole."""
    import jsonschema

    from flexgen_lite.kernels.json_form import json_state

    jsonschema.validate(person, PERSON)
    keys = list(person)
    rnd.shuffle(keys)
    text = json.dumps({k: person[k] for k in keys}, indent=indent)  # any order of the keys
    assert json_state(text, PERSON) == "whole"
    assert all(json_state(text[:i], PERSON) == "open" for i in range(len(text)))
    dropped = rnd.choice(PERSON["required"])
    for broken in ({k: v for k, v in person.items() if k != dropped}, person | {"x": 1},
                   person | {"age": 1.5}, person | {"role": "root"}, person | {"pets": [{"legs": 2}]},
                   person | {"pets": [{"kind": "a"}] * 3}):
        assert json_state(json.dumps(broken, indent=indent), PERSON) != "whole"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, PERSON)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='{}[]":, nameg1-.0adminusertrulkpsbo', max_size=40))
def test_what_it_calls_whole_jsonschema_validates(text):
    import jsonschema

    from flexgen_lite.kernels.json_form import json_state

    if json_state(text, PERSON) == "whole":
        jsonschema.validate(json.loads(text), PERSON)


def test_a_real_model_writes_json_of_a_schema_through_the_api_the_doors_and_the_command_line(smollm, tmp_path,
                                                                                              capsys):
    import jsonschema

    from flexgen_lite.cli.main import main
    from flexgen_lite.openai_api.requests import RequestError, Served, prepare
    from flexgen_lite.openai_api.runner import run_jobs

    path, _ = smollm
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "role": {"enum": ["admin", "user"]}},
              "required": ["name", "age", "role"], "additionalProperties": False}
    ask = "Describe a fictional person as JSON."
    with FlexGenLite(path, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        text = m.generate(ask, chat=True, max_new_tokens=40, guided=("json_schema", json.dumps(schema)))
        served = Served("smol", m.config, m.tokenizer)
        body = {"messages": [{"role": "user", "content": ask}], "max_tokens": 40, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}
        door = run_jobs(m, prepare("/v1/chat/completions", body, served).jobs)[0].text
        for bad in ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                                          "minLength": 2}}}},
                    {"guided_json": "{not json"}, {"response_format": {"type": "json_schema"}}):
            with pytest.raises(RequestError) as e:
                prepare("/v1/chat/completions", {**body, "response_format": None} | bad, served)
            assert e.value.status == 400 and e.value.param in ("response_format", "guided_json"), e.value.message
    jsonschema.validate(json.loads(text), schema)
    assert door == text
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    main(["generate", "--model", path, "--dtype", "float32", "--policy", "manual", "--max-new-tokens", "40", "--chat",
          "--json", "--json-schema", f"@{tmp_path / 'schema.json'}", ask])
    assert json.loads(capsys.readouterr().out)["text"] == text


def test_helper_48s_schemas():
    """Schemas a reader of one keyword at a time would misread, loop on or crash at are refused by name up front
    (a $ref loop hung the engine; a missing one failed every request batched with it); numbers at the top end
    whole and may go on; a number literal is not the start of a longer one; an enum's value in any spelling."""
    from flexgen_lite.kernels.json_form import SchemaError, check_schema, json_grows, json_state

    refused = [{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
               {"$ref": "#/$defs/zz"}, {"$ref": "#/$defs/a/properties/b", "$defs": {"a": {}}}, {"type": 5},
               {"properties": [1]}, {"$ref": 5}, {"anyOf": 5}, {"anyOf": []}, {"enum": []}, {"required": True},
               {"minItems": "2"}, {"type": "object", "anyOf": [{"type": "string"}]}, {"const": 1, "enum": [2]},
               {"$defs": {"o": {"type": "object"}}, "$ref": "#/$defs/o", "required": ["x"]},
               {"enum": [[]], "minItems": 1}, {"properties": {"a": {"type": "string"}}, "required": ["b"]},
               {"type": "array", "minItems": 2, "maxItems": 1}]
    for schema in refused:
        with pytest.raises(SchemaError):
            check_schema(schema)
    assert json_state("12", {"type": "integer"}) == "whole" and json_grows("12", {"type": "integer"})
    assert json_state("18.", {"type": "number"}) == "open"
    assert json_state("12", {"enum": [1, 12]}) == json_state("[12]", {"items": {"enum": [1, 12]}}) == "whole"
    assert json_state('{"a":1}', {"enum": [{"a": 1}]}) == json_state('"é"', {"enum": ["é"]}) == "whole"
    assert json_state("1", {"type": "string", "enum": ["a", 1]}) is None
    assert json_state('{"é', {"properties": {"é": {"type": "integer"}}}) == "open"
    assert json_state("{}", {"anyOf": [False, {"type": "object"}]}) == "whole"
    assert not json_grows('{"a": 1}', {"type": "object"})


def test_a_row_ended_without_a_token_keeps_logprobs_for_its_tokens_alone(tiny_models):
    """A dead end (w30 and nothing spells w300's last 0) drops the step's token, and its logprobs with it."""
    from flexgen_lite.openai_api.requests import Served, prepare
    from flexgen_lite.openai_api.runner import run_jobs

    with FlexGenLite(str(tiny_models["llama"][0]), policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        served = Served("tiny", m.config, m.tokenizer)
        bodies = [{"prompt": "w300 w5", "max_tokens": 6, "temperature": 0, "logprobs": 2, "guided_choice": choices}
                  for choices in (["w300"], ["w30 w7", "w300"])]
        for body in bodies:
            out = run_jobs(m, prepare("/v1/completions", body, served).jobs)[0]
            assert len(out.logprobs) == len(out.token_ids) >= 1
