"""`flexgen-lite serve`, driven by the real `openai` client over loopback: completions and chat (streaming and
not) equal `FlexGenLite.generate`; concurrent requests share blocks; bad requests get OpenAI-shaped 4xx errors;
the Batch API runs a file end to end, and a batch survives kill -9 of the server."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import openai
import pytest
import torch

from flexgen_lite.engine.policy import Policy
from flexgen_lite.generation import FlexGenLite

KEY = "test-key"
NAME = "tiny-chat"
PROMPTS = ["w5 w6 w7", "w9", "w30 w31", "w40 w41 w42 w43", "w50"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"


@pytest.fixture(scope="module")
def chat_dir(tiny_models, tmp_path_factory) -> str:
    """The tiny OPT checkpoint with a chat template (its word tokenizer has none)."""
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_models["opt"][0], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return str(path)


@pytest.fixture(scope="module")
def offline(chat_dir):
    """FlexGenLite.generate's greedy texts, 6 new tokens: {"plain" | "chat": [text per prompt]}."""
    with FlexGenLite(chat_dir, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        return {"plain": m.generate(PROMPTS, max_new_tokens=6),
                "chat": m.generate(PROMPTS, max_new_tokens=6, chat=True)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw(url: str, body: bytes | None = None, key: str | None = KEY, content_type: str | None = "application/json"
        ) -> tuple[int, str]:
    """(status, response text) of a plain HTTP request (POST when there is a body), bypassing the client."""
    headers = {**({"Content-Type": content_type} if content_type else {}),
               **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    def __init__(self, model: str, state_dir: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "flexgen_lite.cli", "serve", "--model", model, "--served-model-name", NAME,
                "--port", str(self.port), "--api-key", KEY, "--state-dir", str(state_dir), "--policy", "manual",
                "--dtype", "float32", "--max-body-mb", "1", *flags]
        self.log = state_dir.parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))  # noqa: SIM115
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if raw(f"{self.url}/health", key=None)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024

    def stop(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(chat_dir, tmp_path_factory):
    s = Server(chat_dir, tmp_path_factory.mktemp("state") / "state", "--gpu-batch-size", "4",
               "--max-wait-ms", "20", "--max-upload-mb", "1", "--max-model-len", "64")
    yield s
    s.stop()


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [NAME]
    assert "planned for requests of up to 64 tokens" in server.log.read_text()
    status, text = raw(f"{server.url}/health", key=None)  # no key needed
    assert status == 200 and json.loads(text)["status"] == "ok"


def engine_runs(server) -> int:
    return json.loads(raw(f"{server.url}/health")[1])["engine_runs"]


def test_completions_equal_generate(server, offline):
    for prompt, text in zip(PROMPTS, offline["plain"], strict=True):
        r = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == text and r.object == "text_completion"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(prompt.split())
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = server.client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.text for c in r.choices] == offline["plain"] and [c.index for c in r.choices] == [0, 1, 2, 3, 4]


def test_chat_equals_generate_with_chat_template(server, offline):
    for prompt, text in zip(PROMPTS, offline["chat"], strict=True):
        r = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=6, temperature=0)
        assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens <= 6


def test_penalties_bias_and_min_p_as_generate_takes_them(server, chat_dir):
    """OpenAI's fields through the openai client, vLLM's in extra_body: the texts FlexGenLite.generate gives."""
    rules = dict(frequency_penalty=1.2, presence_penalty=0.4, logit_bias={"77": 5.0, "6": -100.0})
    extra = dict(repetition_penalty=1.5, min_tokens=3, min_p=0.05)
    settings = dict(max_tokens=8, temperature=0.8, seed=11)
    got = [server.client.completions.create(model=NAME, prompt=p, **settings, **rules, extra_body=extra)
           .choices[0].text for p in PROMPTS]
    with FlexGenLite(chat_dir, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        expected = [m.generate(p, max_new_tokens=8, temperature=0.8, seed=11, logit_bias={77: 5.0, 6: -100.0},
                               **{k: v for k, v in (rules | extra).items() if k != "logit_bias"}) for p in PROMPTS]
        plain = m.generate(PROMPTS, max_new_tokens=8, temperature=0.8, seed=11)
    assert got == expected and got != plain
    assert not any("w6" in text.split() for text in got)  # banned by -100 (prompt 0 holds it)


def test_logprobs_of_greedy_tokens_are_the_top_ones(server, offline):
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == offline["plain"][0] and len(lp.tokens) == r.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and logprob <= 0 and abs(max(top.values()) - logprob) < 1e-5 and token in top
    r = server.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == offline["chat"][1][:len(r.choices[0].message.content)]
    assert len(content) == r.usage.completion_tokens
    assert all(c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 3 for c in content)


def test_echo_scores_the_prompt_as_transformers(server, tiny_models):
    """echo + logprobs (lm-eval's local-completions asks so, max_tokens 1; max_tokens 0 scores alone): each prompt
    token's log-probability and top alternatives are transformers' (fp32, within 1e-4), the first token's null."""
    hf = tiny_models["opt"][1]
    ids = [[2, 40, 41, 42, 43, 44], [2, 9, 300]]
    r = server.client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
    alone = server.client.completions.create(model=NAME, prompt=ids, max_tokens=0, logprobs=2, echo=True)
    for prompt, choice, scored in zip(ids, r.choices, alone.choices, strict=True):
        with torch.no_grad():
            reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        lp = choice.logprobs
        assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for n in range(1, len(prompt)):
            assert lp.token_logprobs[n] == pytest.approx(reference[n - 1, prompt[n]].item(), abs=1e-4)
            best = reference[n - 1].topk(2)
            assert list(lp.top_logprobs[n].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert lp.token_logprobs[-1] == pytest.approx(reference[-1].max().item(), abs=1e-4)  # the greedy token
        assert scored.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:-1], abs=1e-6)
        assert scored.text == choice.text[:len(scored.text)] and scored.finish_reason == "length"
        # the echoed text is the tokens' texts (the special token 2's ""), so tokens and text_offset follow it
        assert "".join(lp.tokens) == choice.text and "".join(scored.logprobs.tokens) == scored.text
        assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == lp.tokens
    assert alone.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:  # nothing to do
        server.client.completions.create(model=NAME, prompt="w5", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_logprobs_end_where_a_stop_string_cut_the_text(server, offline):
    words = offline["plain"][0].split()
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1,
                                         stop=[f" {words[2]}"])
    assert r.choices[0].text.split() == words[:2] and r.choices[0].finish_reason == "stop"
    assert "".join(r.choices[0].logprobs.tokens) == r.choices[0].text  # not the stop's token nor those after
    r = server.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1,
                                         stop=[words[2]])  # begins inside the token " w..", after its space
    text, tokens = r.choices[0].text, r.choices[0].logprobs.tokens
    assert text == offline["plain"][0][:offline["plain"][0].find(words[2])]
    # as docs/doors.md says: the token the stop string begins in is kept whole, the last one
    assert "".join(tokens).startswith(text) and len("".join(tokens[:-1])) < len(text) < len("".join(tokens))


def test_the_tokenizer_as_vllm_serves_it(server):
    """/tokenize, /detokenize, /tokenizer_info: what lm-eval's remote tokenizer reads, without a key as vLLM's."""
    status, text = raw(f"{server.url}/tokenize", json.dumps({"prompt": "w5 w6", "add_special_tokens": False}).encode(),
                       key=None)
    tokens = json.loads(text)["tokens"]
    assert status == 200 and len(tokens) == 2
    status, text = raw(f"{server.url}/detokenize", json.dumps({"tokens": tokens}).encode(), key=None)
    assert status == 200 and json.loads(text)["prompt"].split() == ["w5", "w6"]
    status, text = raw(f"{server.url}/tokenizer_info", key=None)
    assert status == 200 and json.loads(text)["chat_template"] == TEMPLATE
    chat = {"messages": [{"role": "user", "content": "w5"}]}
    status, text = raw(f"{server.url}/tokenize", json.dumps(chat).encode(), key=None)
    assert status == 200 and json.loads(text)["count"] == 2  # "w5 w3"
    for body in ({"tokens": [-1]}, {"tokens": [10**6]}):
        status, text = raw(f"{server.url}/detokenize", json.dumps(body).encode(), key=None)
        assert status == 400 and json.loads(text)["error"]["param"] == "tokens", text
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5"}]}]}  # as chat takes them
    status, text = raw(f"{server.url}/tokenize", json.dumps(parts).encode(), key=None)
    assert status == 200 and json.loads(text)["count"] == 2, text
    status, _ = raw(f"{server.url}/tokenize", b"{}", key=None)
    assert status == 400
    for kind in (None, "text/plain"):  # JSON whatever the Content-Type says, as the completion routes read it
        for url, body in (("tokenize", {"prompt": "w5 w6"}), ("v1/completions", {"model": NAME, "prompt": "w5",
                                                                                "max_tokens": 0, "echo": True})):
            status, text = raw(f"{server.url}/{url}", json.dumps(body).encode(), content_type=kind)
            assert status == 200, text
    status, text = raw(f"{server.url}/detokenize", b"[1, 2", key=None, content_type=None)
    assert status == 400 and json.loads(text)["error"]["code"] == "invalid_json"


def test_streaming_joins_to_the_same_text(server, offline):
    events = list(server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == offline["chat"][0]
    assert events[0].choices[0].delta.role == "assistant"
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] in ("stop", "length")
    assert events[-1].usage.prompt_tokens > 0
    events = list(server.client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=6, temperature=0,
                                                   stream=True))
    assert "".join(e.choices[0].text for e in events) == offline["plain"][3]
    assert len([e for e in events if e.choices[0].text]) > 1  # sent step by step
    text = offline["plain"][3]
    stop = text.split()[2][:-1]  # the start of the third word: held back until it matches, then cut
    events = list(server.client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=6, temperature=0,
                                                   stream=True, stop=[stop, "never"]))
    assert "".join(e.choices[0].text for e in events) == text[:text.find(stop)]
    assert events[-1].choices[0].finish_reason == "stop"
    status, text = raw(f"{server.url}/v1/completions", b'{"prompt": "w9", "max_tokens": 2, "stream": true}')
    lines = [line for line in text.splitlines() if line]
    assert status == 200 and lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_all_equal_offline_and_memory_stays(server, offline):
    def ask(i: int) -> str:
        return server.client.completions.create(model=NAME, prompt=PROMPTS[i % 5], max_tokens=6,
                                                temperature=0).choices[0].text

    rss = []
    with ThreadPoolExecutor(64) as pool:
        for _ in range(2):
            runs = engine_runs(server)
            texts = list(pool.map(ask, range(64), timeout=120))
            assert texts == [offline["plain"][i % 5] for i in range(64)]
            assert engine_runs(server) - runs <= 32  # requests shared engine runs (blocks of 4)
            rss.append(server.rss())
    assert rss[1] <= rss[0] * 1.05 + (16 << 20), rss


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    c = server.client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="w5", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="w5 w6", max_tokens=63)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4o", prompt="w5", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    for body, expected in ((b"{not json", 400), (b'{"max_tokens": 2}', 400), (b'["w5"]', 400),
                           (b'{"prompt": "w5", "temperature": "hot"}', 400), (b"x" * (2 << 20), 413)):
        status, text = raw(f"{server.url}/v1/completions", body)
        assert status == expected, text
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    status, text = raw(f"{server.url}/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["message"]
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big.jsonl", b"x" * (2 << 20)), purpose="batch")
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        c.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file_missing", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).batches.list()
    for prompt in ([-1], [10**12], [[5], [-3]], [10**6]):  # token ids outside the vocabulary, even past a C long
        status, text = raw(f"{server.url}/v1/completions", json.dumps({"prompt": prompt}).encode())
        assert status == 400 and json.loads(text)["error"]["code"] == "invalid_value", text
    # fields that change outputs and are not done here: refused, not ignored; their neutral values pass
    for field, value in (("best_of", 3), ("suffix", "w9"), ("response_format", {"type": "json_schema"}),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]), ("guided_json", {"oneOf": []}),
                         ("guided_regex", "("), ("guided_choice", []),
                         ("prompt_logprobs", 1), ("use_beam_search", True), ("skip_special_tokens", False),
                         ("tool_choice", "required"),
                         # the logits' rules outside their ranges
                         ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                         ("min_p", 1.5), ("min_tokens", -1), ("logit_bias", {"w5": 1}), ("logit_bias", {"5": 101}),
                         ("logit_bias", {"512": 1}), ("stop_token_ids", [512]), ("stop_token_ids", [-1]),
                         ("min_tokens", 40)):
        status, text = raw(f"{server.url}/v1/completions", json.dumps({"prompt": "w5", field: value}).encode())
        assert status == 400 and json.loads(text)["error"]["param"] == field, text
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {"5": 0}, "best_of": 1, "suffix": "",
               "response_format": {"type": "text"}, "tools": [], "max_tokens": 2, "temperature": 0,
               "skip_special_tokens": True, "stop_token_ids": [], "tool_choice": "auto"}
    status, text = raw(f"{server.url}/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "w5"}], **neutral}).encode())
    assert status == 200, text
    assert c.completions.create(model=NAME, prompt="w5", max_tokens=2, temperature=0).usage.completion_tokens == 2
    sampled = dict(model=NAME, prompt="w5", max_tokens=4, temperature=1.0, seed=3)
    texts = [c.completions.create(**sampled, extra_body={"top_k": k}).choices[0].text for k in (-1, 0)]
    assert texts[0] == texts[1]  # vLLM's -1: no top-k, as 0
    listed = c.completions.create(**{**sampled, "prompt": ["w7 w8", "w5"], "n": 2}).choices
    alone = c.completions.create(**sampled, n=2).choices
    assert [ch.text for ch in listed[2:]] == [ch.text for ch in alone]  # a list's prompt samples as it would alone
    default = json.dumps({"prompt": "w5", "max_tokens": None, "temperature": 0, "ignore_eos": True}).encode()
    status, text = raw(f"{server.url}/v1/completions", default)
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 16, text  # null: OpenAI's default
    nulls = ("temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "stream_options", "ignore_eos",
             "presence_penalty", "frequency_penalty", "logit_bias", "user", "model")
    for field in (*nulls, "echo", "logprobs", "max_tokens", "best_of", "suffix"):  # null: OpenAI's default
        status, text = raw(f"{server.url}/v1/completions", json.dumps({"prompt": "w5", field: None}).encode())
        assert status == 200 and json.loads(text)["object"] == "text_completion", (field, text)
    for field in (*nulls, "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens"):
        body = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, field: None}
        status, text = raw(f"{server.url}/v1/chat/completions", json.dumps(body).encode())
        assert status == 200 and json.loads(text)["object"] == "chat.completion", (field, text)
    with pytest.raises(openai.BadRequestError) as e:  # as OpenAI: not silently without them
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w5"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    lower = urllib.request.Request(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"})
    with urllib.request.urlopen(lower, timeout=60) as r:  # the scheme is case-insensitive (RFC 7235)
        assert r.status == 200


def batch_file(requests: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in requests).encode()


def request(custom_id: str, prompt: str, url: str = "/v1/completions", **body) -> dict:
    if url == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": prompt}], **body}
    else:
        body = {"prompt": prompt, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"max_tokens": 6, "temperature": 0, **body}}


def wait_for_batch(client, batch_id: str,
                   until=lambda b: b.status in ("completed", "failed", "cancelled", "expired")):
    deadline = time.monotonic() + 120
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def lines_by_id(client, file_id: str) -> dict:
    out = {}
    for raw in client.files.content(file_id).text.splitlines():
        record = json.loads(raw)
        assert record["custom_id"] not in out, f"{record['custom_id']} twice"
        out[record["custom_id"]] = record
    return out


def test_batch_api_end_to_end_with_bad_lines(server, offline):
    c = server.client
    good = [request(f"chat-{i}", p, "/v1/chat/completions") for i, p in enumerate(PROMPTS)]
    bad = [request("negative", "w5", "/v1/chat/completions", max_tokens=-2),
           request("wrong-url", "w5", "/v1/completions"), {**request("number", "w5"), "custom_id": 7}]
    not_utf8 = b'{"custom_id": "latin", "url": "/v1/chat/completions", "body": {"messages": [], "x": "caf\xe9"}}\n'
    data = b"\xef\xbb\xbf" + batch_file(good[:2] + bad + good[2:]) + b"{not json\n" + not_utf8  # a BOM: not line 1's
    file = c.files.create(file=("requests.jsonl", data), purpose="batch")
    assert c.files.retrieve(file.id).bytes == len(data)
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status in ("validating", "in_progress")
    batch = wait_for_batch(c, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 5, 5)
    outputs = lines_by_id(c, batch.output_file_id)
    assert sorted(outputs) == sorted(f"chat-{i}" for i in range(5))
    for i, text in enumerate(offline["chat"]):
        body = outputs[f"chat-{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text
    errors = c.files.content(batch.error_file_id).text.splitlines()
    assert len(errors) == 5
    by_id = {json.loads(e)["custom_id"]: json.loads(e) for e in errors}
    assert by_id["latin"]["error"]["code"] == "invalid_utf8" and "line 10" in by_id["latin"]["error"]["message"]
    assert by_id[None]["error"]["code"]  # the invalid JSON and the numeric custom_id: no request, its id null
    assert by_id["negative"]["response"]["status_code"] == 400 and by_id["wrong-url"]["error"]["code"]
    assert batch.id in [b.id for b in c.batches.list().data]
    with pytest.raises(openai.BadRequestError):
        c.batches.cancel(batch.id)  # already completed
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_missing")
    assert c.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(file.id)


def test_files_and_batches_list_page_as_the_openai_client_reads_them(server):
    """The client's iterator asks for the page after the last id until has_more is false: an `after` ignored (and
    no has_more) paged forever."""
    c = server.client
    uploaded = [c.files.create(file=(f"f{i}.jsonl", batch_file([request("a", "w5")])), purpose="batch").id
                for i in range(3)]
    for i in range(2):
        c.batches.create(input_file_id=uploaded[i], endpoint="/v1/completions", completion_window="24h")
    everything = c.files.list()
    assert not everything.has_more and everything.data[:3] == [c.files.retrieve(f) for f in uploaded[::-1]]
    ids = [f.id for f in everything.data]
    assert [f.id for f in islice(c.files.list(limit=2), len(ids) + 1)] == ids  # pages of 2, each after the last
    page = c.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in islice(c.files.list(purpose="batch", limit=1), len(ids) + 1)] == [
        f.id for f in everything.data if f.purpose == "batch"]
    batches = [b.id for b in c.batches.list(limit=100).data]
    assert len(batches) >= 2 and [b.id for b in islice(c.batches.list(limit=1), len(batches) + 1)] == batches
    for url in ("files?after=file_missing", "batches?after=batch_missing"):
        status, text = raw(f"{server.url}/v1/{url}")
        assert status == 404 and json.loads(text)["error"]["param"] == "after", text


def test_cancelled_batch_keeps_what_was_done(server):
    c = server.client
    n = 400
    file = c.files.create(file=("many.jsonl", batch_file([request(f"r{i}", PROMPTS[i % 5]) for i in range(n)])),
                          purpose="batch")
    batch = c.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    assert c.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_for_batch(c, batch.id)
    assert batch.status == "cancelled" and batch.request_counts.completed < n, batch
    if batch.output_file_id:
        assert len(lines_by_id(c, batch.output_file_id)) == batch.request_counts.completed


def test_batch_past_its_window_expires_keeping_what_was_done(chat_dir, offline, tmp_path):
    n = 400
    s = Server(chat_dir, tmp_path / "state", "--gpu-batch-size", "1", "--batch-expiry-s", "1")
    try:
        file = s.client.files.create(file=("big.jsonl", batch_file([request(f"r{i}", PROMPTS[i % 5])
                                                                   for i in range(n)])), purpose="batch")
        batch = s.client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        assert batch.expires_at == batch.created_at + 1
        batch = wait_for_batch(s.client, batch.id)
        assert batch.status == "expired" and batch.expired_at >= batch.expires_at, batch
        counts = batch.request_counts
        assert counts.completed < n and counts.completed + counts.failed == counts.total == n
        done = lines_by_id(s.client, batch.output_file_id) if batch.output_file_id else {}
        expired = lines_by_id(s.client, batch.error_file_id)
        assert len(done) == counts.completed and len(expired) == counts.failed
        assert set(done) | set(expired) == {f"r{i}" for i in range(n)}
        assert {r["error"]["code"] for r in expired.values()} == {"batch_expired"}
        for custom_id, record in done.items():  # what ran before the window closed is a real answer
            i = int(custom_id[1:])
            assert record["response"]["body"]["choices"][0]["text"] == offline["plain"][i % 5]
    finally:
        s.stop()


def test_batch_resumes_after_kill_9(chat_dir, offline, tmp_path):
    n = 240
    state = tmp_path / "state"
    s = Server(chat_dir, state, "--gpu-batch-size", "1")
    try:
        file = s.client.files.create(file=("big.jsonl", batch_file([request(f"r{i}", PROMPTS[i % 5])
                                                                   for i in range(n)])), purpose="batch")
        batch = s.client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        killed_at = wait_for_batch(s.client, batch.id, lambda b: b.request_counts.completed > 0)
        assert killed_at.request_counts.completed < n
    finally:
        s.stop(signal.SIGKILL)
    s = Server(chat_dir, state, "--gpu-batch-size", "4")
    try:
        done = wait_for_batch(s.client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == n, done
        outputs = lines_by_id(s.client, done.output_file_id)  # asserts each custom_id once
        assert sorted(outputs) == sorted(f"r{i}" for i in range(n))
        for i in range(n):
            assert outputs[f"r{i}"]["response"]["body"]["choices"][0]["text"] == offline["plain"][i % 5]
    finally:
        s.stop(signal.SIGKILL)
    # killed after the batch was "finalizing" and its output file listed, before "completed": the next start
    # completes it with one output file (it stayed finalizing, and each start listed one more)
    with sqlite3.connect(state / "batches.sqlite3") as db:
        db.execute("UPDATE batches SET status = 'finalizing', completed_at = NULL, output_file_id = NULL")
    s = Server(chat_dir, state, "--gpu-batch-size", "4")
    try:
        again = wait_for_batch(s.client, batch.id)
        assert again.status == "completed" and again.request_counts.completed == n, again
        listed = [f.id for f in s.client.files.list() if f.filename == f"{batch.id}_output.jsonl"]
        assert listed == [again.output_file_id]  # the one listed before the kill replaced
        assert lines_by_id(s.client, again.output_file_id) == outputs
    finally:
        s.stop()


def test_address_in_use_and_bad_state_dir_end_before_loading(chat_dir, tmp_path, capsys):
    from flexgen_lite.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", chat_dir, "--port", str(taken.getsockname()[1]), "--state-dir", str(tmp_path)])
    assert e.value.code == 2 and "cannot listen on" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", chat_dir, "--port", str(free_port()), "--state-dir", str(tmp_path / "file")])
    assert e.value.code == 2 and "--state-dir" in capsys.readouterr().err


def test_each_request_is_logged(server):
    raw(f"{server.url}/health", key=None)
    raw(f"{server.url}/v1/models", key="wrong key")
    deadline = time.monotonic() + 10
    while '"GET /v1/models" 401' not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log.read_text()
    assert '127.0.0.1 "GET /health" 200' in log and '"GET /v1/models" 401' in log, log


def test_state_goes_to_the_cache_folder_by_default(chat_dir, tmp_path, monkeypatch):
    """Not into the current folder: ~/.cache/flexgen-lite/serve-PORT (here under FLEXGEN_LITE_CACHE)."""
    from flexgen_lite.cli.main import main
    from flexgen_lite.openai_api import batch_lines

    class Loading(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loading

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("FLEXGEN_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(batch_lines, "served_model", stop)
    port = free_port()
    with pytest.raises(Loading):
        main(["serve", "--model", chat_dir, "--port", str(port)])
    assert (tmp_path / "cache" / f"serve-{port}").is_dir()
    assert not list((tmp_path / "cwd").iterdir())


def test_token_texts_join_into_the_text():
    """logprobs' token texts (and so text_offset): a character whose bytes span tokens is the last one's, a
    special token is "", and they join into the decoded text (each token alone decodes to a replacement mark)."""
    from flexgen_lite import default_model_path
    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer
    from flexgen_lite.openai_api.runner import token_texts

    tokenizer = gguf_tokenizer(default_model_path())

    class Decoder:
        def decode(self, ids):
            return tokenizer.decode(ids, skip_special_tokens=True)

    for text in ["café ☃ 日本語", "<|im_start|>user\nHi<|im_end|>", "Hello world"]:
        ids = tokenizer(text)["input_ids"]
        texts = token_texts(Decoder(), ids)
        assert "".join(texts) == Decoder().decode(ids) and "\ufffd" not in "".join(texts), texts
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in tokenizer("日本語")["input_ids"])  # what it mends


def test_max_model_len_plans_for_a_block_of_the_longest_requests(tmp_path):
    """--max-model-len: auto plans a block of requests that long (the longest prompt's prefill, the longest cache);
    planned for 512 + 32 (the default), a block of 990-token prompts would pass the budget (helper-21: a burst of
    587-token requests all 400): they run in narrower blocks (block_shapes.py); past the context, a usage error."""
    from flexgen_lite import SamplingConfig
    from flexgen_lite.cli.checks import UsageError
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.policy_search import AutoPolicy
    from flexgen_lite.serve.server import planned_workload

    from .conftest import make_checkpoint, synthetic_profile

    path = tmp_path / "m"
    make_checkpoint(path, "llama", max_position_embeddings=1024)
    config, long = model_config(str(path)), [[5] * 990] * 3
    for workload, shapes in ((None, 2), (planned_workload(1000, config), 1)):
        with FlexGenLite(str(path), policy=AutoPolicy(Policy(dtype="float32")), budgets=Budgets(None, 80 << 20),
                         workload=workload, hardware=synthetic_profile()) as m:
            assert [len(ids) for ids in m.generate_ids(long, SamplingConfig(max_new_tokens=8))] == [8] * 3
            assert len(m.shapes.engines) == shapes  # the planned block's shape, and a narrower one where needed
    with pytest.raises(UsageError, match="past the model's context"):
        planned_workload(1025, config)
