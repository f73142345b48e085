"""`flexgen-lite generate`: prompts in, completions out (to stdout, or resumably to an --output file).

Everything that can be checked without the model's weights is checked first: the sampling flags, the input
file, the output file (locked, and already finished jobs end here), then each prompt's length against the
context, named by its input line.
"""

from __future__ import annotations

import json
import sys
import time

from ..kernels.sampling import SamplingConfig
from .batch_io import InputError, Prompt, ResumableOutput, read_prompts
from .checks import finite_float
from .options import Overall, end_progress, model_of

EXAMPLE_PROMPTS = (  # what `flexgen-lite generate` answers when given no prompts
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "Give me a synonym for 'happy'.",
    "What is 12 times 12?",
    "Suggest a name for a pet turtle.",
    "Translate 'good morning' into Spanish.",
)


def add_sampling_flags(g) -> None:
    g.add_argument("--temperature", type=finite_float, default=0.0, help="0 is greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample among the k likeliest tokens only; 0: all (default %(default)s)")
    g.add_argument("--top-p", type=finite_float, default=1.0,
                   help="sample among the likeliest tokens whose probabilities reach p (default %(default)s)")
    g.add_argument("--min-p", type=finite_float, default=0.0,
                   help="sample among the tokens at least p times as likely as the likeliest (default %(default)s)")
    g.add_argument("--seed", type=int, help="seed of sampling: a prompt's samples depend only on it and the "
                   "prompt's place in the input (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--repetition-penalty", type=finite_float, default=1.0, help="> 1 discourages the tokens of the "
                   "prompt and the output (transformers' and vLLM's; default %(default)s: none)")
    g.add_argument("--presence-penalty", type=finite_float, default=0.0,
                   help="subtracted from the logit of each token the output holds (OpenAI's; default %(default)s)")
    g.add_argument("--frequency-penalty", type=finite_float, default=0.0,
                   help="subtracted once per time the output holds a token (OpenAI's; default %(default)s)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable; -100 bans it, as OpenAI's logit_bias)")
    g.add_argument("--min-tokens", type=int, default=0, help="no end-of-sequence (nor --stop-token-id) before this "
                   "many tokens (default %(default)s)")
    g.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="the output is one of these texts (repeatable; vLLM's guided_choice)")
    g.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression whole")
    g.add_argument("--json-object", action="store_true", help="the output is a JSON object (OpenAI's JSON mode)")
    g.add_argument("--json-schema", metavar="SCHEMA", help="the output is JSON of this JSON schema (its text, or "
                   "@FILE; OpenAI's structured outputs)")
    g.add_argument("--stop-token-id", dest="stop_token_ids", action="append", default=[], type=int, metavar="ID",
                   help="a token that ends the output as end-of-sequence does (repeatable)")


def logit_bias(pairs: list[str]) -> dict[int, float]:
    """--logit-bias ID=BIAS flags as a dict; InputError naming a malformed one."""
    bias = {}
    for pair in pairs:
        token, _, value = pair.partition("=")
        try:
            token, value = int(token), float(value)
        except ValueError:
            raise InputError(f"--logit-bias {pair}: give a token id and a number, as 50256=-100") from None
        if token in bias:
            raise InputError(f"--logit-bias names token {token} twice")
        bias[token] = value
    return bias


def guided(args) -> tuple:
    """The output's form from --choice, --regex or --json-object (one of them at most)."""
    schema = args.json_schema
    if schema is not None and schema.startswith("@"):
        try:
            with open(schema[1:], encoding="utf-8-sig") as f:
                schema = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--json-schema {schema}: cannot read it ({e})") from None
    forms = [form for form, given in ((("choice", *args.choice), args.choice),
                                      (("regex", args.regex), args.regex is not None),
                                      (("json_object",), args.json_object),
                                      (("json_schema", schema), schema is not None)) if given]
    if len(forms) > 1:
        raise InputError("--choice, --regex, --json-object and --json-schema each give the output a form: use one")
    return forms[0] if forms else ()


def sampling_from_args(args) -> SamplingConfig:
    rules = {key: getattr(args, key) for key in RULES} | {"logit_bias": logit_bias(args.logit_bias)}
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                          tuple(args.stop), stop_at_eos=not args.ignore_eos, guided=guided(args), **rules)


SETTING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                 "top_p": "--top-p", "seed": "--seed", "stop": "--stop", "ignore_eos": "--ignore-eos",
                 "chat": "--chat", "instruction": "--instruction", "system": "--system"}
# the logits' rules and their neutral values: recorded only where set (a file made before they existed resumes)
RULES = {"min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
         "logit_bias": [], "min_tokens": 0, "stop_token_ids": []}
RULE_FLAGS = {key: "--" + key.replace("_", "-").replace("-ids", "-id") for key in RULES} | {
    "guided": "--choice/--regex/--json-object/--json-schema"}
CARRY_OVER = {"auto": None, "always": True, "never": False}  # --carry-over: generate_ids' carry_over


def result_settings(args) -> dict:
    """The generate flags that change what is generated (the policy's numerics are recorded apart); greedy
    decoding (temperature 0) ignores the seed, top-k, top-p and min-p, so they are not recorded then."""
    settings = {key: getattr(args, key) for key in SETTING_FLAGS}
    sampling = sampling_from_args(args)  # the values as generation takes them: 77=4 and 77=4.0 alike
    settings.update({key: value for key, neutral in RULES.items()
                     if (value := getattr(args, key)) != neutral})
    if "logit_bias" in settings:
        settings["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if "stop_token_ids" in settings:
        settings["stop_token_ids"] = list(sampling.stop_token_ids)
    if form := guided(args):
        settings["guided"] = list(form)
    if settings["temperature"] == 0:
        settings.update(seed=None, top_k=None, top_p=None)
        settings.pop("min_p", None)
    return settings


def read_texts(args) -> None:
    """--instruction and --system as their texts (@FILE: the file's), checked before anything loads."""
    for flag in ("instruction", "system"):
        value = getattr(args, flag)
        if value is not None and value.startswith("@"):
            try:
                with open(value[1:], encoding="utf-8-sig") as f:  # a BOM is not text
                    value = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"--{flag} {value}: cannot read it ({e})") from None
        if value is not None and not value.strip():
            raise InputError(f"--{flag} is empty: give its text, or @FILE")
        setattr(args, flag, value)
    if args.system is not None and not args.chat:
        raise InputError("--system is the chat template's system message: add --chat (or put it in --instruction)")


def cmd_generate(args, progress) -> None:
    read_texts(args)
    sampling = sampling_from_args(args)
    prompts = read_prompts(args.prompt, args.input)
    if not prompts and not args.input:
        prompts = [Prompt(text, f"example {i + 1}") for i, text in enumerate(EXAMPLE_PROMPTS)]
    if not prompts:
        raise InputError(f"--input {args.input} holds no prompts")
    output = ResumableOutput(args.output, prompts) if args.output else None
    try:
        todo, run = list(range(len(prompts))), None
        if output is not None:
            run = _check_record(args, output)
            todo = [i for i in todo if i not in output.done]
            _say_resumed(output, len(prompts), len(todo))
        if todo:
            _generate(args, prompts, todo, sampling, output, progress, run)
    finally:
        if output is not None:
            output.close()


def _check_record(args, output: ResumableOutput) -> dict | None:
    """The run record to write (None for a file of an older flexgen-lite, left unrecorded); a resume with
    another model or settings is refused here, before the model loads."""
    from .. import __version__
    from .run_record import check_and_adopt, model_identity, settings_hash

    identity, settings = model_identity(model_of(args)), result_settings(args)
    if output.done and not output.recorded:
        print(f"{output.path} does not record what made it (an older flexgen-lite): model and settings not checked",
              file=sys.stderr)
        return None
    for note in check_and_adopt(output.recorded, identity, settings, SETTING_FLAGS | RULE_FLAGS, args,
                                f"--output {output.path}", args.force_resume):
        print(note, file=sys.stderr)
    return {"version": __version__, "model": identity, "settings": settings, "settings_hash": settings_hash(settings)}


def _say_resumed(output: ResumableOutput, total: int, left: int) -> None:
    if output.repaired:
        print(f"{output.path}: dropped a last line cut short (an interrupted write); that prompt is redone",
              file=sys.stderr)
    if not left:
        print(f"all {total} prompts already answered in {output.path}: nothing to do", file=sys.stderr)
    elif left < total:
        print(f"resuming: {total - left} of {total} prompts already answered in {output.path}", file=sys.stderr)


def encode_and_check(args, prompts: list[Prompt], todo: list[int], sampling: SamplingConfig):
    """(model path, config, token ids of the prompts to do), each prompt checked against the context."""
    from ..generation import encode_texts
    from ..model_source import open_model

    model = model_of(args)
    config, _, tokenizer = open_model(model)
    if any(t >= config.vocab_size for t in sampling.token_ids()):
        raise InputError(f"--logit-bias or --stop-token-id names a token outside {config.name}'s vocabulary "
                         f"(0..{config.vocab_size - 1})")
    texts = [prompts[i].text if args.instruction is None else f"{args.instruction}\n\n{prompts[i].text}" for i in todo]
    ids = encode_texts(tokenizer, texts, args.chat, config.name, args.system)
    for i, prompt_ids in zip(todo, ids, strict=True):
        if not prompt_ids:
            raise InputError(f"the prompt at {prompts[i].where} has no tokens")
        if len(prompt_ids) + sampling.max_new_tokens > config.max_positions:
            raise InputError(
                f"the prompt at {prompts[i].where} has {len(prompt_ids)} tokens; with --max-new-tokens "
                f"{sampling.max_new_tokens} that exceeds the model's context of {config.context}: "
                "shorten it or generate fewer tokens")
    return model, config, ids


def _generate(args, prompts: list[Prompt], todo: list[int], sampling: SamplingConfig, output, progress,
              run: dict | None) -> None:
    from ..generation import FlexGenLite
    from ..planning.dtype_choice import explain_search
    from ..planning.layout import Workload
    from ..planning.policy_search import AutoPolicy
    from .breakdown_flags import recorder_for
    from .options import budgets_from_args, manual_dtype_reason, policy_from_args, resolve_share
    from .run_record import policy_record

    model, config, ids = encode_and_check(args, prompts, todo, sampling)
    policy = policy_from_args(args, default_batch=min(len(todo), 32))
    workload = None
    if isinstance(policy, AutoPolicy):  # plan for these prompts: their longest length, number, common prefix
        workload = Workload.of_prompts(ids, sampling.max_new_tokens)
    else:
        policy = resolve_share(args, model, Workload.of_prompts(ids, sampling.max_new_tokens), policy)
    recorder = recorder_for(args)
    overall = Overall(progress, len(todo), "prompts")
    with FlexGenLite(model, policy=policy, device=args.device, progress=overall.engine, workload=workload,
                     budgets=budgets_from_args(args), trace=recorder) as m:
        end_progress()
        dtype = str(m.dtype).removeprefix("torch.")
        if output is not None and run is not None:
            output.record_run({**run, "policy": policy_record(m.policy, dtype)})
            output.flush()
        if m.search is not None:
            print(f"auto policy: {m.policy.flags()} (predicted {m.search.prediction.throughput:.1f} tok/s with every "
                  f"prompt generating its {sampling.max_new_tokens} tokens)\n"
                  f"dtype: {explain_search(m.search, policy.base.dtype, getattr(args, 'dtype_kept', False))}",
                  file=sys.stderr)
        else:
            print(f"dtype: {manual_dtype_reason(m.policy, args.device, getattr(args, 'dtype_kept', False))}",
                  file=sys.stderr)
        chunk, tokens, empty, tic = m.policy.block_size * 4, 0, 0, time.perf_counter()
        overall.start()

        def save(finished: dict[int, list[int]], indices: list[int], prompt_ids: list[list[int]],
                 count: bool = True) -> None:
            nonlocal tokens, empty
            if output is None:
                end_progress()  # the completions go to stdout, maybe the same terminal
            for j, gen in sorted(finished.items()):
                text = m.decode(gen, sampling.stop, prompt_ids[j])
                _write(args, output, indices[j], prompts[indices[j]].text, text, gen)
                tokens, empty = tokens + len(gen), empty + (not text.strip())
            (output or sys.stdout).flush()
            if count:
                overall.advance(len(finished))

        parts = -(-len(todo) // chunk)
        for first in range(0, len(todo), chunk):  # chunks of 4 blocks: prompts sorted by length within each
            indices = todo[first:first + chunk]
            overall.part = f"part {first // chunk + 1}/{parts}, " if parts > 1 else ""
            # the --output file gets each block as it ends (a kill loses at most one block); stdout, each chunk in
            # the prompts' order
            per_block = (lambda finished: overall.advance(len(finished))) if output is None else (
                lambda finished, indices=indices, first=first: save({j: gen for j, (gen, _) in finished.items()},
                                                                    indices, ids[first:first + chunk]))
            generated = m.generate_ids(ids[first:first + chunk], sampling, indices=indices, on_block=per_block,
                                       carry_over=CARRY_OVER[args.carry_over])
            if output is None:
                save(dict(enumerate(generated)), indices, ids[first:first + chunk], count=False)
        elapsed = time.perf_counter() - tic
        end_progress()
        print(f"{tokens} tokens for {len(todo)} prompts in {elapsed:.1f} s: {tokens / elapsed:.1f} tok/s "
              f"({config.name.rsplit('/', 1)[-1]}, {m.device.device}, {dtype}, {m.policy.flags()})",
              file=sys.stderr)
        if (hint := chat_hint(args, m.tokenizer, empty, len(todo))) is not None:
            print(hint, file=sys.stderr)
        if recorder is not None:
            _breakdown(args, m, recorder, Workload.of_prompts(ids, sampling.max_new_tokens))


def chat_hint(args, tokenizer, empty: int, total: int) -> str | None:
    """An instruct model given raw text often ends at once (its real greedy answer: end of turn); when most
    answers are empty and the model has a chat template that --chat was not asked to apply, say so."""
    if args.chat or empty * 2 < total or not getattr(tokenizer, "chat_template", None):
        return None
    return (f"{empty} of {total} completions are empty: the model ended them at once. It has a chat template; "
            "--chat wraps each prompt in it as a user turn (what an instruct model expects)")


def _breakdown(args, m, recorder, workload) -> None:
    """--breakdown's table (on stderr: stdout holds the completions) and --trace's file."""
    from .breakdown_flags import build_context, finish, profile_or_none

    hw = getattr(m.search, "hardware", None) or profile_or_none(args, m.policy.offload_dir)
    context = build_context(recorder, m.config, m.policy, str(m.dtype).removeprefix("torch."), m.device.is_cuda, hw,
                            False, workload)
    finish(args, recorder, context, out=sys.stderr)


def _write(args, output: ResumableOutput | None, index: int, prompt: str, completion: str, gen: list[int]) -> None:
    if output is not None:
        output.write(index, prompt, completion, gen)
    elif args.json:
        print(json.dumps({"index": index, "prompt": prompt, "text": completion, "token_ids": gen}))
    elif args.chat:
        print(f"> {prompt}\n{completion.strip()}\n")
    else:
        print(f"{prompt}{completion}\n")
