"""From an OpenAI request to the engine's work and back: checking, tokenizing, sampling settings, and the
completion objects made from the generated tokens. No HTTP here, and no generation: every door uses this."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from ..kernels.sampling import SamplingConfig
from .protocol import (
    CHAT,
    COMPLETIONS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    Usage,
    new_id,
    now,
)

CHAT_DEFAULT_MAX_TOKENS = 256  # chat without max_tokens: this many, or what the context leaves
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's, for completions


class RequestError(Exception):
    """A request that cannot be served as given: becomes an OpenAI-shaped error with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.kind, param=self.param,
                                               code=self.code)).model_dump()


def validation_error(e: ValidationError) -> RequestError:
    """The first problem pydantic found, as a 400 naming the field."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    where = f"'{param}': " if param else ""
    return RequestError(400, f"{where}{first['msg']}", param, "invalid_value" if param else "invalid_request")


@dataclass(frozen=True)
class Served:
    """The model a door serves: what requests are checked and tokenized against."""

    name: str  # the id clients send and see
    config: object  # ModelConfig
    tokenizer: object
    aliases: frozenset[str] | None = None  # other accepted model names; None: any name is accepted


@dataclass(frozen=True)
class Job:
    """One sequence to generate: prompt ids, its sampling settings, and its place (which seeds sampling)."""

    ids: tuple[int, ...]
    sampling: SamplingConfig
    index: int
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
    generates: bool = True  # False: max_tokens 0, the prompt scored alone


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    # per generated token, when asked: (its text, its log-probability, [(alternative's text, log-probability)])
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    # per prompt token, when asked (echo): the same, (its text, None, None) for the first
    prompt_logprobs: list[tuple[str, float | None, list[tuple[str, float]] | None]] | None = None


@dataclass
class Work:
    """A checked request: the jobs to run, and what is needed to answer once they have run."""

    url: str
    request: CompletionRequest | ChatCompletionRequest
    model: str
    jobs: list[Job]
    prompt_texts: list[str]
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=now)

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.url == CHAT else "cmpl")


def read_json(raw: bytes) -> object:
    """An HTTP request's body as JSON, whatever its Content-Type says; a 400 where it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


def validated(body: object, kind: type[BaseModel]) -> BaseModel:
    """`body` (a JSON object) as `kind`; a 400 naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "body", "invalid_request")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def prepare(url: str, body: dict | BaseModel, served: Served) -> Work:
    """Check and tokenize a request for `url`; raises RequestError (status 400/404) for what cannot be served."""
    if url not in (COMPLETIONS, CHAT):
        raise RequestError(400, f"url must be {COMPLETIONS} or {CHAT}, got {url!r}", "url", "invalid_url")
    kind = CompletionRequest if url == COMPLETIONS else ChatCompletionRequest
    request = body if isinstance(body, BaseModel) else validated(body, kind)
    unsupported = request.unsupported()
    if unsupported is not None:
        raise RequestError(400, f"{unsupported} is not supported by this server (its outputs would not be what you "
                           "asked for): leave it out", unsupported, "unsupported_parameter")
    if url == CHAT and request.top_logprobs is not None and not request.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    model = request.model or served.name
    if served.aliases is not None and model != served.name and model not in served.aliases:
        raise RequestError(404, f"The model `{model}` does not exist; this server serves `{served.name}`",
                           "model", "model_not_found")
    if served.tokenizer is None:
        raise RequestError(400, f"{served.name} has no tokenizer (dummy weights, or none in its files): it cannot "
                           "take text requests",
                           "model", "no_tokenizer")
    texts, prompts = _prompts(request, served)
    max_tokens = request.max_tokens
    if url == CHAT:
        max_tokens = request.max_completion_tokens or request.max_tokens
    elif max_tokens is None:  # an explicit null: OpenAI's default for completions
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    elif max_tokens == 0 and not request.echo:
        raise RequestError(400, "max_tokens 0 asks for nothing unless echo is true (the prompt, scored with "
                           "logprobs)", "max_tokens", "invalid_value")
    scored_only = url == COMPLETIONS and max_tokens == 0
    context = served.config.max_positions
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(400, f"prompt {i} has no tokens", "prompt", "empty_prompt")
        check_vocabulary(i, ids, served)
        limit = 0 if scored_only else max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, context - len(ids))
        if len(ids) + limit > context or (limit < 1 and not scored_only):
            raise RequestError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} to generate). "
                               "Shorten the prompt or ask for fewer tokens.", "max_tokens", "context_length_exceeded")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    greedy = request.temperature == 0
    try:
        rules = request.rules()
    except ValueError as e:
        field = str(e).split()[0].strip(",:")  # each of rules()'s messages begins with its field
        raise RequestError(400, str(e), field, "invalid_value") from None
    for name in ("logit_bias", "stop_token_ids"):
        if any(not 0 <= int(i) < served.config.vocab_size for i in rules[name]):
            raise RequestError(400, f"{name} names a token outside the vocabulary (0..{served.config.vocab_size - 1})",
                               name, "invalid_value")
    if url == CHAT:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        logprobs = request.logprobs
    prompt_logprobs = logprobs if url == COMPLETIONS and request.echo else None
    jobs = []
    for ids in prompts:
        limit = 1 if scored_only else max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, context - len(ids))
        try:
            sampling = SamplingConfig(limit, request.temperature, max(request.top_k, 0), request.top_p,
                                      None if greedy else request.seed, stop, stop_at_eos=not request.ignore_eos,
                                      **rules)
        except ValueError as e:
            field = next((f for f in ("min_tokens", "stop", "guided") if f in str(e)), None)
            if field == "guided":  # the field that gave the form
                field = next((f for f in ("guided_choice", "guided_regex", "guided_json") if getattr(request, f)
                              is not None), "response_format")
            raise RequestError(400, str(e), field, "invalid_value") from None
        # seeded by its choice alone: a prompt of a list samples as it would sent alone (as vLLM's)
        jobs += [Job(tuple(ids), sampling, j, logprobs, prompt_logprobs, not scored_only) for j in range(request.n)]
    return Work(url, request, model, jobs, texts, sum(len(p) for p in prompts))


def chat_text(messages: list[ChatMessage], served: Served, add_generation_prompt: bool = True) -> str:
    """The messages through the served model's chat template (text content parts only); a 400 for what it
    cannot take."""
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, f"{served.name} has no chat template: use {COMPLETIONS}", "messages",
                           "no_chat_template")
    for m in messages:
        if not isinstance(m.content, str) and m.content is not None and \
                any(p.get("type") != "text" for p in m.content):
            raise RequestError(400, "only text content parts are supported", "messages", "invalid_value")
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (roles, order)
        raise RequestError(400, f"the chat template refused these messages: {e}", "messages",
                           "invalid_value") from None


def _prompts(request, served: Served) -> tuple[list[str], list[list[int]]]:
    """(texts to echo, token ids) of each prompt of the request."""
    tokenizer = served.tokenizer
    if isinstance(request, ChatCompletionRequest):
        text = chat_text(request.messages, served)
        return [text], [tokenizer(text, add_special_tokens=False)["input_ids"]]
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError(400, "prompt is empty", "prompt", "empty_prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        return list(prompt), [tokenizer(t)["input_ids"] for t in prompt]
    for i, ids in enumerate(prompt):
        check_vocabulary(i, ids, served)  # before decoding them: an id past a C integer fails there
    return [tokenizer.decode(p) for p in prompt], [list(p) for p in prompt]


def check_vocabulary(i: int, ids, served: Served) -> None:
    if ids and (max(ids) >= served.config.vocab_size or min(ids) < 0):
        raise RequestError(400, f"prompt {i} has token ids outside the vocabulary (0..{served.config.vocab_size - 1})",
                           "prompt", "invalid_value")


def respond(work: Work, outputs: list[Output]) -> CompletionResponse | ChatCompletionResponse:
    """The completion object of a request whose jobs gave `outputs` (in the order of work.jobs)."""
    usage = Usage(prompt_tokens=work.prompt_tokens, completion_tokens=sum(len(o.token_ids) for o in outputs),
                  total_tokens=work.prompt_tokens + sum(len(o.token_ids) for o in outputs))
    if work.url == CHAT:
        choices = [ChatChoice(index=k, message=AssistantMessage(content=o.text), finish_reason=o.finish_reason,
                              logprobs=_chat_logprobs(o.logprobs)) for k, o in enumerate(outputs)]
        return ChatCompletionResponse(id=work.id, created=work.created, model=work.model, choices=choices,
                                      usage=usage)
    n = work.request.n
    choices = []
    for k, o in enumerate(outputs):
        echo = work.prompt_texts[k // n] if work.request.echo else ""
        if o.prompt_logprobs is not None:  # the prompt's token texts: the text they join into, with text_offset
            echo = "".join(text for text, _, _ in o.prompt_logprobs)
        logprobs = o.logprobs if o.prompt_logprobs is None else o.prompt_logprobs + (o.logprobs or [])
        start = 0 if o.prompt_logprobs is not None else len(echo)
        choices.append(CompletionChoice(index=k, finish_reason=o.finish_reason, text=echo + o.text,
                                        logprobs=_completion_logprobs(logprobs, start)))
    return CompletionResponse(id=work.id, created=work.created, model=work.model, choices=choices, usage=usage)


def _completion_logprobs(logprobs, offset: int) -> dict | None:
    """The legacy completions form: parallel lists of tokens, their log-probabilities, top alternatives, and
    where each token starts in the text."""
    if logprobs is None:
        return None
    offsets = []
    for token, _, _ in logprobs:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": [t for t, _, _ in logprobs], "token_logprobs": [lp for _, lp, _ in logprobs],
            "top_logprobs": [None if top is None else dict(top) for _, _, top in logprobs], "text_offset": offsets}


def _chat_logprobs(logprobs) -> dict | None:
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top in logprobs]}
