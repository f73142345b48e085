"""The served model's tokenizer over HTTP, as vLLM serves it (`/tokenize`, `/detokenize`, `/tokenizer_info`): what
clients that count or build prompts in token ids need (lm-eval's `local-completions` uses these instead of a local
copy of the tokenizer)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..openai_api.protocol import ChatMessage
from ..openai_api.requests import RequestError, chat_text, read_json, validated


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # a chat, through the model's chat template
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


def add_tokenizer_routes(app: FastAPI, state) -> None:
    served = state.served

    def tokenizer():
        if served.tokenizer is None:
            raise RequestError(400, f"{served.name} has no tokenizer (dummy weights, or none in its files)",
                               "model", "no_tokenizer")
        return served.tokenizer

    # the bodies read as JSON whatever their Content-Type (as the completion routes read theirs); the work on the
    # thread pool: a long text is not tokenized on the event loop
    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await run_in_threadpool(tokenized, validated(read_json(await request.body()), TokenizeRequest))

    def tokenized(body: TokenizeRequest) -> dict:
        tok = tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise RequestError(400, "give exactly one of prompt (text) or messages (a chat)", "prompt",
                               "invalid_value")
        if body.messages is not None:
            text = chat_text(body.messages, served, body.add_generation_prompt)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": served.config.max_positions}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await run_in_threadpool(detokenized, validated(read_json(await request.body()), DetokenizeRequest))

    def detokenized(body: DetokenizeRequest) -> dict:
        vocab = served.config.vocab_size
        if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
            raise RequestError(400, f"tokens holds ids outside the vocabulary (0..{vocab - 1})", "tokens",
                               "invalid_value")
        return {"prompt": tokenizer().decode(body.tokens)}

    @app.get("/tokenizer_info")
    def tokenizer_info():
        tok = tokenizer()
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": served.config.max_positions, "vocab_size": served.config.vocab_size}

