"""The OpenAI protocol as pydantic types, once, for every door: `run-batch` lines, the HTTP server, the Batch API.

Requests ignore unknown fields (as the OpenAI API does) and refuse invalid values (a 400 naming the field).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def new_id(prefix: str) -> str:
    sep = "-" if prefix in ("cmpl", "chatcmpl") else "_"  # OpenAI's ids: cmpl-..., file_..., batch_...
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Request(BaseModel):
    """The sampling fields completions and chat share (top_k is vLLM's extension)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's -1 (and 0): no top-k
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    # the logits' rules (kernels/logit_rules.py): OpenAI's ranges, vLLM's extensions
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> -100..100
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    # fields that change outputs and that this server does not do: a value other than these neutral ones is a 400
    # (unsupported()), never silently ignored
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's extensions of the same kind
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body: Any) -> Any:
        """OpenAI takes an explicit null for an optional field as its default (clients send one for None)."""
        if not isinstance(body, dict):
            return body
        return {k: v for k, v in body.items()
                if v is not None or k not in cls.model_fields or cls.model_fields[k].is_required()}

    def rules(self) -> dict[str, Any]:
        """The logits' rules as SamplingConfig's fields; ValueError naming the field for a bad logit_bias."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.strip().isascii() and key.strip().isdigit()) or not -100 <= value <= 100:
                raise ValueError(f"logit_bias maps token ids (as text: \"50256\") to numbers within -100..100, got "
                                 f"{key!r}: {value!r}")
            if int(key) in bias:
                raise ValueError(f"logit_bias names token {int(key)} twice")
            bias[int(key)] = value
        return dict(presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, min_p=self.min_p, min_tokens=self.min_tokens,
                    logit_bias=bias, stop_token_ids=tuple(self.stop_token_ids or ()), guided=self.guided())

    def guided(self) -> tuple:
        """The output's form (SamplingConfig.guided) from vLLM's guided_choice and guided_regex, or OpenAI's JSON
        mode; ValueError where more than one is asked."""
        forms = []
        if self.guided_choice is not None:
            forms.append(("choice", *self.guided_choice))
        if self.guided_regex is not None:
            forms.append(("regex", self.guided_regex))
        response = self.response_format or {}
        if response.get("type") == "json_object":
            forms.append(("json_object",))
        if response.get("type") == "json_schema":  # OpenAI's structured outputs
            schema = (response.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, an object")
            forms.append(("json_schema", json.dumps(schema)))
        if self.guided_json is not None:  # vLLM's: the schema, or its JSON text
            forms.append(("json_schema", self.guided_json if isinstance(self.guided_json, str)
                          else json.dumps(self.guided_json)))
        if len(forms) > 1:
            raise ValueError("guided_choice, guided_regex, guided_json and response_format json_object or "
                             "json_schema: give one at most")
        return forms[0] if forms else ()

    def unsupported(self) -> str | None:
        """The first field set to something this server would otherwise ignore, or None."""
        neutral = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
                   "include_stop_str_in_output": (None, False), "prompt_logprobs": (None,),
                   "use_beam_search": (None, False), "length_penalty": (None, 1), "truncate_prompt_tokens": (None,),
                   "allowed_token_ids": (None,), "bad_words": (None, []), "skip_special_tokens": (None, True),
                   "guided_grammar": (None,)}
        for name, values in neutral.items():
            if getattr(self, name) not in values:
                return name
        if (self.response_format or {}).get("type") not in (None, "text", "json_object", "json_schema"):
            return "response_format"
        return None


class CompletionRequest(Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 (with echo): score the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.best_of not in (None, self.n):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts of type "text" are joined (others refused by the caller)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None  # vLLM's: the last message echoed

    def unsupported(self) -> str | None:
        return "echo" if self.echo else super().unsupported()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict[str, Any] | None = None  # tokens, token_logprobs, top_logprobs, text_offset


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: dict[str, Any] | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flexgen-lite"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- batch files (run-batch and the Batch API) ---------------------------------------------------------
class BatchRequestInput(BaseModel):
    """One line of an OpenAI batch input file."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str
    method: Literal["POST"] = "POST"
    url: Literal["/v1/completions", "/v1/chat/completions"]
    body: dict[str, Any]


class BatchResponseData(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchRequestOutput(BaseModel):
    """One line of an OpenAI batch output (or error) file."""

    id: str
    custom_id: str | None
    response: BatchResponseData | None
    error: dict[str, Any] | None = None


# ---- the Batch API -----------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
