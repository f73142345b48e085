"""flexgen_lite.ray: the replica's rows equal `FlexGenLite.generate`; two replicas on a local Ray give the same
greedy outputs; `run-batch --ray` writes what `run-batch` writes and resumes; a replica killed mid-job has its
requests run again and each custom_id is written exactly once. One local Ray (2 CPUs) for the module."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

import numpy as np
import pytest
import ray
import ray.data

from flexgen_lite.cli.main import main
from flexgen_lite.engine.policy import Policy
from flexgen_lite.generation import FlexGenLite
from flexgen_lite.ray import ProcessorConfig, Sampling, build_processor, run_batch_ray
from flexgen_lite.ray.replica import PromptReplica

POLICY = Policy(gpu_batch_size=2, dtype="float32")
FLAGS = ["--policy", "manual", "--gpu-batch-size", "2", "--dtype", "float32"]
PROMPTS = [" ".join(f"w{5 + (7 * i + k) % 400}" for k in range(1 + i % 4)) for i in range(24)]


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


@pytest.fixture(scope="module")
def reference(opt_dir):
    """FlexGenLite.generate's greedy texts in one process, {(prompt, max_new_tokens): text}, and {prompt: its
    number of tokens}."""
    with FlexGenLite(opt_dir, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        texts = {**{(p, 4): t for p, t in zip(PROMPTS, m.generate(PROMPTS, max_new_tokens=4), strict=True)},
                 **{(p, 6): t for p, t in zip(PROMPTS, m.generate(PROMPTS, max_new_tokens=6), strict=True)}}
        return texts, {p: len(ids) for p, ids in zip(PROMPTS, m.encode(PROMPTS), strict=True)}


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for all Ray tests: 2 CPUs (a replica each), a small object store, no dashboard; its
    session folder in a temporary folder of its own (short: Ray's socket paths must stay under 108 bytes), removed
    after, so the tests leave nothing under /tmp/ray."""
    temp = tempfile.mkdtemp(prefix="fgl-ray-")
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, logging_level=logging.WARNING,
             _temp_dir=temp)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield temp
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_keeps_its_session_in_the_tests_folder(local_ray):
    from ray._private.worker import _global_node

    assert _global_node.get_session_dir_path().startswith(local_ray + os.sep)


def test_replica_rows_equal_generate_without_ray(opt_dir, tmp_path):
    """The callable class alone: text and chat rows, per-row sampling columns over the defaults, nulls as absent."""
    chat_dir = tmp_path / "chat"
    shutil.copytree(opt_dir, chat_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_dir))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(str(chat_dir))
    with FlexGenLite(str(chat_dir), policy=POLICY) as m:
        full = m.generate(PROMPTS[5], max_new_tokens=6)
        stop = full.split()[2]
        expected = [m.generate(PROMPTS[0], max_new_tokens=3), m.generate(PROMPTS[5], max_new_tokens=6, stop=[stop]),
                    m.generate(PROMPTS[7], max_new_tokens=3, chat=True)]
        ids = m.encode([PROMPTS[7]], chat=True)[0]
    replica = PromptReplica(ProcessorConfig(str(chat_dir), POLICY).replica(), Sampling(max_tokens=3))
    batch = {"prompt": np.array([PROMPTS[0], PROMPTS[5], None], dtype=object),
             "messages": np.array([None, None, [{"role": "user", "content": PROMPTS[7]}]], dtype=object),
             "max_tokens": np.array([np.nan, 6, np.nan]), "stop": np.array([None, [stop], None], dtype=object)}
    out = replica(batch)
    assert out["generated_text"] == expected
    assert out["finish_reason"] == ["length", "stop", "length"]
    assert out["num_input_tokens"] == [len(m.encode([PROMPTS[0]])[0]), len(m.encode([PROMPTS[5]])[0]), len(ids)]
    assert out["num_generated_tokens"] == [len(t) for t in out["generated_tokens"]]
    assert out["prompt"] == [PROMPTS[0], PROMPTS[5], None] and out["stop"] == [None, [stop], None]  # kept
    with pytest.raises(ValueError, match="row 0 of the batch has neither"):
        replica({"prompt": np.array([None], dtype=object)})


def test_two_replicas_equal_generate(opt_dir, reference, local_ray):
    """Rows spread over two replicas: each row's greedy text equals generate's, beside its own input columns."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    try:
        rows = [{"id": i, "prompt": p} | ({"max_tokens": 6} if i % 3 == 0 else {}) for i, p in enumerate(PROMPTS)]
        processor = build_processor(ProcessorConfig(opt_dir, POLICY, concurrency=2, threads=1, batch_size=4,
                                                    sampling=Sampling(max_tokens=4)))
        out = processor(ray.data.from_items(rows, override_num_blocks=6)).take_all()
    finally:
        context.execution_options.preserve_order = False
    texts, tokens = reference
    assert [r["id"] for r in out] == list(range(len(PROMPTS)))
    for r in out:
        new = 6 if r["id"] % 3 == 0 else 4
        assert r["prompt"] == PROMPTS[r["id"]] and r["generated_text"] == texts[(r["prompt"], new)]
        assert r["num_generated_tokens"] == len(r["generated_tokens"]) == new  # the tiny model never emits eos
        assert r["finish_reason"] == "length" and r["num_input_tokens"] == tokens[r["prompt"]]
        assert r["max_tokens"] == (6 if r["id"] % 3 == 0 else None)  # the rows' own column: ints, not 6.0 / nan
        assert type(r["max_tokens"]) is (int if r["id"] % 3 == 0 else type(None))


def batch_file(path, n: int) -> None:
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {
        "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4 + 2 * (i % 2), "temperature": 0}}) + "\n"
        for i in range(n)))


def answers(path) -> dict[str, dict]:
    """{custom_id: its output line}, with each request's random ids and times taken out; asserts no id twice."""
    out = {}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        if "flexgen_lite_run" in record:  # the run's record, not a result
            continue
        assert record["custom_id"] not in out, f"{record['custom_id']} answered twice"
        record.pop("id")
        record["response"].pop("request_id")
        body = record["response"]["body"]
        body.pop("id"), body.pop("created")
        out[record["custom_id"]] = record
    return out


def test_run_batch_on_ray_equals_run_batch_and_resumes(opt_dir, local_ray, tmp_path, capsys):
    requests, plain, on_ray = tmp_path / "requests.jsonl", tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    batch_file(requests, 40)
    main(["run-batch", "-i", str(requests), "-o", str(plain), "--model", opt_dir, *FLAGS])
    on_ray.write_text("".join(plain.read_text().splitlines(keepends=True)[:11]))  # the record, 10 results
    capsys.readouterr()
    # one replica: two are the killed-replica test's (each replica opens the model: ~4 s of the suite's time)
    main(["run-batch", "-i", str(requests), "-o", str(on_ray), "--model", opt_dir, *FLAGS, "--ray", "--replicas", "1"])
    err = capsys.readouterr().err
    assert "resuming: 10 of 40 requests already answered" in err and "30 requests" in err and "1 replica of" in err
    assert answers(on_ray) == answers(plain) and len(answers(plain)) == 40


def test_killed_replica_requests_run_again_once(opt_dir, reference, local_ray, tmp_path, monkeypatch):
    """kill -9 of the replica that answered first, while it holds more chunks: Ray restarts it, runs its chunks
    again, and every custom_id is written once with generate's text. The output's record holds the policy the
    replicas ran (as run-batch's holds its engine's), so a resume keeps it."""
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    n = 64  # chunks of 8 requests (4 blocks of 2): 8 chunks over 2 replicas, up to 2 in flight on each
    batch_file(requests, n)
    write, seen = run_batch_ray.write_answers, []

    def kill_the_first_answerer(batch, *args):
        pid = int(batch["pid"][0])
        if not seen:
            os.kill(pid, signal.SIGKILL)
        seen.append(pid)
        return write(batch, *args)

    monkeypatch.setattr(run_batch_ray, "write_answers", kill_the_first_answerer)
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS, "--ray", "--replicas", "2"])
    with pytest.raises(ProcessLookupError):
        os.kill(seen[0], 0)
    assert len(seen) > 1  # answers came after the kill
    got = answers(out)
    assert sorted(got) == sorted(f"r{i}" for i in range(n))
    for i in range(n):
        text = got[f"r{i}"]["response"]["body"]["choices"][0]["text"]
        assert text == reference[0][(PROMPTS[i % len(PROMPTS)], 4 + 2 * (i % 2))]
    monkeypatch.undo()
    plain, few = tmp_path / "plain.jsonl", tmp_path / "few.jsonl"
    batch_file(few, 2)
    main(["run-batch", "-i", str(few), "-o", str(plain), "--model", opt_dir, *FLAGS])
    records = [json.loads(path.read_text().splitlines()[0])["flexgen_lite_run"] for path in (plain, out)]
    assert records[1]["policy"] == records[0]["policy"] and records[1]["policy"]["flags"]


def test_an_address_where_no_ray_answers_is_refused_at_once(opt_dir, tmp_path, capsys):
    """Not a minute of ray.init's own retries: a clear error, and nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: nothing listens there
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    batch_file(requests, 2)
    tic = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS, "--ray", address])
    assert stop.value.code == 2 and time.perf_counter() - tic < 20
    assert f"--ray {address}: cannot reach a Ray cluster there" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""


def test_more_replicas_than_this_machines_cpus_are_refused_before_anything_is_written(opt_dir, tmp_path, capsys):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    batch_file(requests, 2)
    requests.write_text(requests.read_text() + "not json\n")  # a bad line, whose error line is not written either
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(SystemExit) as stop:
        main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS, "--ray", "--replicas",
              str(too_many)])
    assert stop.value.code == 2
    assert f"--replicas {too_many} needs a CPU each" in capsys.readouterr().err
    assert not out.exists()


def test_a_row_that_cannot_be_served_is_named_by_its_id(opt_dir):
    """helper-43: a prompt past the context failed the job as "row 1 of the batch", its place in a batch of 3, not
    the dataset's row 7; its id column names it where it has one."""
    from types import SimpleNamespace

    from flexgen_lite.model_source import open_model
    from flexgen_lite.openai_api.requests import Served

    config, _, tokenizer = open_model(opt_dir)
    replica = SimpleNamespace(defaults={"max_tokens": 4}, served=Served("opt", config, tokenizer))
    long = " ".join(["w300"] * (config.max_positions + 1))
    columns = {"prompt": ["a", long], "custom_id": ["r6", "r7"]}
    with pytest.raises(ValueError, match="custom_id 'r7' .* cannot be served"):
        PromptReplica._work(replica, columns, 1)
    with pytest.raises(ValueError, match="row 1 of a batch .* cannot be served"):
        PromptReplica._work(replica, {"prompt": ["a", long]}, 1)
