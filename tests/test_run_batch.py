"""`flexgen-lite run-batch`: OpenAI batch lines in, OpenAI batch output lines out, equal to `generate`; bad lines
get error lines and the job goes on; a rerun after Ctrl-C or kill -9 answers each custom_id exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from flexgen_lite import generation
from flexgen_lite.cli.main import main
from flexgen_lite.engine.policy import Policy
from flexgen_lite.generation import FlexGenLite
from flexgen_lite.openai_api import runner
from flexgen_lite.openai_api.runner import run_jobs

from .conftest import ctrl_c_in_block

PROMPTS = ["w5 w6 w7", "w9", "w30 w31", "w40 w41 w42 w43", "w50"]
FLAGS = ["--policy", "manual", "--gpu-batch-size", "2", "--dtype", "float32"]


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


@pytest.fixture(scope="module")
def offline(opt_dir):
    """FlexGenLite.generate's greedy outputs: {(prompt, max_new_tokens): text}."""
    with FlexGenLite(opt_dir, policy=Policy(gpu_batch_size=4, dtype="float32")) as m:
        return {**{(p, 4): t for p, t in zip(PROMPTS, m.generate(PROMPTS, max_new_tokens=4), strict=True)},
                **{(p, 6): t for p, t in zip(PROMPTS, m.generate(PROMPTS, max_new_tokens=6), strict=True)}}


def line(custom_id, body, url="/v1/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def results(path) -> dict:
    """{custom_id: output line} (lines without one under None, in a list)."""
    out: dict = {None: []}
    for raw in path.read_text().splitlines():
        record = json.loads(raw)
        if "flexgen_lite_run" in record:  # the run's record, not a result
            continue
        if record["custom_id"] is None:
            out[None].append(record)
            continue
        assert record["custom_id"] not in out, f"{record['custom_id']} answered twice"
        out[record["custom_id"]] = record
    return out


def test_answers_equal_generate_and_bad_lines_get_errors(opt_dir, offline, tmp_path, capsys):
    good = [line(f"p{i}", {"model": "anything", "prompt": p, "max_tokens": 4, "temperature": 0})
            for i, p in enumerate(PROMPTS)]
    good += [line("list", {"prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0, "echo": True, "n": 2,
                           "unknown_field": 1})]
    bad = ["{not json", line("url", {"prompt": "w5"}, url="/v1/embeddings"),
           line("negative", {"prompt": "w5", "max_tokens": -1}),
           line("too_long", {"prompt": "w5 w6", "max_tokens": 63}),
           line("chat", {"messages": [{"role": "user", "content": "w5"}]}, url="/v1/chat/completions"),
           json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "w5"}}),
           line("ids_below", {"prompt": [-1], "max_tokens": 2}), line("ids_past", {"prompt": [[5], [10**12]]}),
           json.dumps({"custom_id": 10, "method": "POST", "url": "/v1/completions", "body": {"prompt": "w5"}})]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(good[:3] + bad + good[3:]) + "\n\n")
    out = tmp_path / "results.jsonl"
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS])
    assert "\r" not in capsys.readouterr().err  # no progress line: stderr is not a terminal
    got = results(out)
    for i, p in enumerate(PROMPTS):
        response = got[f"p{i}"]["response"]
        assert response["status_code"] == 200 and got[f"p{i}"]["error"] is None
        body = response["body"]
        assert body["object"] == "text_completion" and body["model"] == "anything"
        assert body["choices"][0]["text"] == offline[(p, 4)]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(p.split()) and usage["total_tokens"] == usage["prompt_tokens"] + 4
    choices = got["list"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [p + offline[(p, 6)] for p in PROMPTS[:2] for _ in range(2)]
    # lines that are no request: `error` only; requests refused: a 4xx response with an OpenAI error body
    invalid_json = got[None]  # and the line whose custom_id is a number: no request, its id null
    assert len(invalid_json) == 3 and all(r["response"] is None and r["error"]["message"] for r in invalid_json)
    assert got["url"]["response"] is None and "url" in got["url"]["error"]["message"]
    for custom_id, code in (("negative", "invalid_value"), ("too_long", "context_length_exceeded"),
                            ("chat", "no_chat_template"), ("ids_below", "invalid_value"),
                            ("ids_past", "invalid_value")):
        response = got[custom_id]["response"]
        assert response["status_code"] == 400 and response["body"]["error"]["code"] == code, response
        assert set(response["body"]["error"]) == {"message", "type", "param", "code"}
    assert got["negative"]["response"]["body"]["error"]["param"] == "max_tokens"


def test_finished_job_ends_before_loading_the_model(opt_dir, tmp_path, monkeypatch, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(line("a", {"prompt": "w5", "max_tokens": 2, "temperature": 0}) + "\n")
    out = tmp_path / "results.jsonl"
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS])
    before = out.read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(generation, "FlexGenLite", refuse)
    monkeypatch.setattr(generation, "open_model", refuse)
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS])
    assert "all 1 requests already answered" in capsys.readouterr().err and out.read_text() == before


def test_repeated_custom_id_is_refused(opt_dir, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(line("a", {"prompt": "w5"}) + "\n" + line("a", {"prompt": "w6"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--model", opt_dir, *FLAGS])
    assert e.value.code == 2 and "custom_id 'a' is used at" in capsys.readouterr().err


def kill_once_some_lines_are_written(argv, out) -> None:
    """Start run-batch in a process and kill -9 it once it has written some results (not all)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = len(out.read_text().splitlines())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(out.read_text().splitlines()) > before:
            break
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err


def test_resume_after_ctrl_c_and_kill_answers_each_request_once(opt_dir, offline, tmp_path, monkeypatch):
    n = 200
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(line(f"r{i}", {"prompt": PROMPTS[i % 5], "max_tokens": 4, "temperature": 0}) + "\n"
                                for i in range(n)))
    out = tmp_path / "results.jsonl"
    argv = ["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS]
    calls = []

    def ctrl_c_on_the_second_block_group(model, jobs, on_output=None):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_jobs(model, jobs, on_output=on_output)

    with monkeypatch.context() as mp:
        mp.setattr(runner, "run_jobs", ctrl_c_on_the_second_block_group)
        with pytest.raises(SystemExit) as e:
            main(argv)
    assert e.value.code == 130
    after_ctrl_c = len(out.read_text().splitlines()) - 1  # the first line records the run
    assert after_ctrl_c == calls[0] < n  # the first group of blocks, one job per request
    kill_once_some_lines_are_written([sys.executable, "-m", "flexgen_lite.cli", *argv], out)
    main(argv)  # finishes what is left
    got = results(out)  # asserts no custom_id twice
    assert got.pop(None) == [] and sorted(got) == sorted(f"r{i}" for i in range(n))
    for i in range(n):
        assert got[f"r{i}"]["response"]["body"]["choices"][0]["text"] == offline[(PROMPTS[i % 5], 4)]


def test_a_refused_request_fixed_in_the_input_is_tried_again_on_resume(opt_dir, offline, tmp_path, capsys):
    """helper-35: after a refused request was fixed in the input, the rerun stopped at its error line ("does not
    belong to this input") and the job could not resume; a wrong input file, every request refused, left a file
    that the right input could not resume either. Error lines are not results: dropped, their requests tried
    again, the answered ones kept."""
    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    good = [line(f"r{i}", {"prompt": PROMPTS[i], "max_tokens": 4, "temperature": 0}) for i in range(3)]
    requests.write_text("\n".join([good[0], line("r1", {"prompt": PROMPTS[1], "max_tokens": 0}), good[2]]) + "\n")
    argv = ["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS]
    main(argv)
    assert "1 of 3 requests refused" in capsys.readouterr().err
    first = results(out)
    assert first["r1"]["response"]["status_code"] == 400
    requests.write_text("\n".join(good) + "\n")  # the request fixed
    main(argv)
    err = capsys.readouterr().err
    assert "dropped the error lines of 1 refused requests" in err and "resuming: 2 of 3" in err
    got = results(out)
    assert got.pop(None) == [] and sorted(got) == ["r0", "r1", "r2"]
    assert got["r0"] == first["r0"] and got["r2"] == first["r2"]  # kept as they were, not redone
    assert got["r1"]["response"]["body"]["choices"][0]["text"] == offline[(PROMPTS[1], 4)]
    wrong = tmp_path / "prompts.txt"  # a plain prompts file for -i: every line refused, the job ends in an error
    wrong.write_text("\n".join(PROMPTS) + "\n")
    out2 = tmp_path / "results2.jsonl"
    with pytest.raises(SystemExit):
        main(["run-batch", "-i", str(wrong), "-o", str(out2), "--model", opt_dir, *FLAGS])
    main(["run-batch", "-i", str(requests), "-o", str(out2), "--model", opt_dir, *FLAGS])
    assert "dropped the error lines of 5 refused requests" in capsys.readouterr().err
    assert {k: v["response"]["body"]["choices"][0]["text"] for k, v in results(out2).items() if k} == \
        {f"r{i}": offline[(PROMPTS[i], 4)] for i in range(3)}


def test_a_run_stopped_mid_chunk_keeps_each_request_whose_choices_all_finished(opt_dir, offline, tmp_path,
                                                                               monkeypatch):
    """Blocks of 2 jobs, one chunk of 6 requests of 2 choices each (12 jobs; a request's choices have the same
    length, so they sort next to each other): a stop in the engine's fourth block has written the 3 requests
    of the first three blocks, each line with both its choices, and the rerun does only the other 3."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(line(f"r{i}", {"prompt": PROMPTS[i % 5], "max_tokens": 4, "temperature": 0,
                                                "n": 2}) + "\n" for i in range(6)))
    out = tmp_path / "results.jsonl"
    argv = ["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS]
    with monkeypatch.context() as mp:
        ctrl_c_in_block(mp, 4)
        with pytest.raises(SystemExit):
            main(argv)
    kept = results(out)
    assert kept.pop(None) == [] and len(kept) == 3
    for record in kept.values():
        assert len(record["response"]["body"]["choices"]) == 2
    main(argv)
    got = results(out)
    assert got.pop(None) == [] and sorted(got) == [f"r{i}" for i in range(6)]
    for i in range(6):
        for choice in got[f"r{i}"]["response"]["body"]["choices"]:
            assert choice["text"] == offline[(PROMPTS[i % 5], 4)]


def test_the_output_records_its_run_and_a_rerun_with_another_model_or_dtype_is_refused(opt_dir, tiny_models,
                                                                                      tmp_path, monkeypatch, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(line(f"r{i}", {"prompt": p, "max_tokens": 2}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "results.jsonl"
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS])
    first = json.loads(out.read_text().splitlines()[0])["flexgen_lite_run"]
    assert first["model"]["path"] == opt_dir and first["policy"]["dtype"] == "float32"
    assert first["settings"] == {"served_model_name": None}
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))  # as left by a stopped run
    before = out.read_text()
    capsys.readouterr()
    monkeypatch.setattr(generation, "open_model", lambda *a, **k: pytest.fail("loaded the model"))
    for flags, named in ((["--model", str(tiny_models["llama"][0]), *FLAGS], "another model"),
                         (["--model", opt_dir, *FLAGS[:-1], "bfloat16"], "--dtype float32, not bfloat16"),
                         (["--model", opt_dir, *FLAGS, "--served-model-name", "x"],
                          "--served-model-name (none), not x")):
        with pytest.raises(SystemExit) as e:
            main(["run-batch", "-i", str(requests), "-o", str(out), *flags])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: -o {out} was made with {named}"), err
        assert out.read_text() == before


def test_a_leading_bom_is_no_part_of_the_first_line_and_a_line_not_utf8_gets_an_error_line(opt_dir, offline,
                                                                                            tmp_path):
    """A BOM (Windows editors) made the first line invalid JSON; latin-1 bytes were answered from U+FFFD text."""
    latin = b'{"custom_id": "latin", "url": "/v1/completions", "body": {"prompt": "caf\xe9 w5", "max_tokens": 4}}'
    bad_id = b'{"custom_id": "caf\xe9", "url": "/v1/completions", "body": {"prompt": "w5", "max_tokens": 4}}'
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\xef\xbb\xbf" + line("p0", {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
                         .encode() + b"\n" + latin + b"\n" + bad_id + b"\n")
    out = tmp_path / "results.jsonl"
    main(["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS])
    got = results(out)
    assert got["p0"]["response"]["body"]["choices"][0]["text"] == offline[(PROMPTS[0], 4)]
    assert got["latin"]["response"] is None and got["latin"]["error"]["code"] == "invalid_utf8"
    assert f"{requests} line 2 is not valid UTF-8" in got["latin"]["error"]["message"]
    assert [r["error"]["code"] for r in got[None]] == ["invalid_utf8"]  # its custom_id unreadable: null


def test_dropping_error_lines_replaces_the_file_whole(tmp_path, monkeypatch):
    """helper-37: the error lines were dropped by truncating the file and writing the kept lines back, and a kill
    between the two lost every answer (19,999 of them, 3 kills of 3). The kept lines go to a new file renamed over
    the old one: stopped before the rename, the file is as it was; after it, the new file is the one locked."""
    import fcntl
    import os

    from flexgen_lite.cli.batch_io import InputError, Prompt, ResumableOutput, prompt_hash

    prompts = [Prompt(f"p{i}", f"line {i + 1}") for i in range(3)]

    def result(i: int, status: int = 200) -> str:
        return json.dumps({"index": i, "prompt_hash": prompt_hash(f"p{i}"), "custom_id": f"r{i}",
                           "response": {"status_code": status, "body": {}}})

    out = tmp_path / "out.jsonl"
    before = "\n".join([result(0), result(1, 400), result(2)]) + "\n"
    out.write_text(before)

    def killed(*args):
        raise KeyboardInterrupt

    output = ResumableOutput(str(out), prompts)
    try:
        assert output.done == {0, 2} and output.retried == 1 and out.read_text() == before  # rewritten at a write
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed)
            with pytest.raises(KeyboardInterrupt):
                output.write_record(1, "p1", {"custom_id": "r1"})
        assert out.read_text() == before and not (tmp_path / "out.jsonl.tmp").exists()
        output.write_record(1, "p1", {"custom_id": "r1"})
        output.flush()
        lines = out.read_text().splitlines()
        assert lines[:2] == [result(0), result(2)] and json.loads(lines[2])["custom_id"] == "r1"
        with open(out, "a+b") as other, pytest.raises(BlockingIOError):  # another process: refused
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another flexgen-lite process"):
            ResumableOutput(str(out), prompts)
    finally:
        output.close()


def test_a_refused_rerun_leaves_the_file_as_it_was(opt_dir, tmp_path, capsys):
    """helper-44: a rerun refused for its settings (another --served-model-name) had already dropped the file's
    error lines; the file is rewritten without them only once a run writes to it. The count of results an
    interrupted run says it kept leaves the error lines out (3664 "kept", 2000 of them errors); a line that is not
    JSON is named by its line in the input, not the decoder's "line 1"."""
    from flexgen_lite.cli.batch_io import results_in

    requests, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    requests.write_text("\n".join([line("r0", {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}),
                                   "{broken json", line("r2", {"prompt": PROMPTS[2], "max_tokens": 0})]) + "\n")
    argv = ["run-batch", "-i", str(requests), "-o", str(out), "--model", opt_dir, *FLAGS]
    main(argv)
    capsys.readouterr()
    before = out.read_bytes()
    assert f"{requests} line 2 is not valid JSON" in out.read_text()
    assert results_in(str(out)) == 1  # r0's answer; the two refusals are not kept results
    with pytest.raises(SystemExit):
        main(argv + ["--served-model-name", "other"])
    assert "--served-model-name" in capsys.readouterr().err and out.read_bytes() == before
