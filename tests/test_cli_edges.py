"""The last rough edges of the command line: a full disk under --output, plan's defaults and help, --version,
serve's port, report's output and input, run-batch on a binary file, --percent in the flag's words, --input -,
one cache folder; each failure one `error:` line with exit code 2."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import pytest

from flexgen_lite.cli import batch_io
from flexgen_lite.cli.generate import read_texts
from flexgen_lite.cli.main import build_parser, main
from flexgen_lite.system import paths, profile_store

from .test_cli_errors import fails, gen


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


# ---- item 5: a full disk -----------------------------------------------------------------------------------------
class FullDisk:
    """The output file, on a disk that fills up: a write puts half its bytes in the file, then fails as a full
    disk does (the rest is written to /dev/full, which answers ENOSPC)."""

    def __init__(self, file) -> None:
        self.file, self.full = file, open("/dev/full", "wb", buffering=0)  # noqa: SIM115

    def write(self, data: bytes) -> int:
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        return self.full.write(data[len(data) // 2:])

    def close(self) -> None:
        self.full.close()
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_under_output_is_one_error_line_and_the_rerun_resumes(opt_dir, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\nw7\nw8 w9 w10\nw11\n")
    out = tmp_path / "out.jsonl"
    argv = gen(opt_dir, "--policy", "manual", "--gpu-batch-size", "2", "--input", str(prompts), "--output", str(out))
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as e:
        full.write(b"x")
    assert e.value.errno == errno.ENOSPC
    real_open = batch_io._open_output
    with monkeypatch.context() as mp:
        mp.setattr(batch_io, "_open_output", lambda path, flag="--output": FullDisk(real_open(path, flag)))
        with pytest.raises(SystemExit) as stop:
            main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err  # the model ran: its lines come first
    line = errors[0]
    assert line.startswith(f"error: --output {out}: cannot write results (the disk is full)")
    assert "rerun the same command to resume" in line
    main(argv)  # room again: the cut line is dropped and everything is answered once
    assert "dropped a last line cut short" in capsys.readouterr().err
    results = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert sorted(r["index"] for r in results if "index" in r) == [0, 1, 2, 3]


# ---- item 8: plan's defaults and help, --version --------------------------------------------------------------
def test_plan_has_bench_defaults(capsys):
    main(["plan", "--model", "facebook/opt-1.3b", "--cpu-mem", "8GiB", "--json"])
    workload = json.loads(capsys.readouterr().out)["workload"]
    assert workload["prompt_len"] == 64 and workload["gen_len"] == 32


@pytest.mark.parametrize("command", ["plan", "profile", "generate", "bench", "run-batch", "serve", "report"])
def test_every_flag_has_help(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from flexgen_lite import __version__

    assert capsys.readouterr().out.strip() == f"flexgen-lite {__version__}"


# ---- item 10: failures that were tracebacks or exit 0 ----------------------------------------------------------
def test_serve_on_a_port_out_of_range(capsys):
    assert "a TCP port is 1..65535, got 99999" in fails(["serve", "--port", "99999"], capsys)


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [
        {"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "compute"}},
        {"ph": "X", "name": "compute", "tid": 1, "ts": 0, "dur": 1000, "args": {}}],
        "otherData": {"model": "tiny", "policy": "", "dtype": "float32", "cuda": False, "rates": {},
                      "predicted": None}}))
    return path


def test_report_into_a_missing_folder(trace, tmp_path, capsys):
    out = tmp_path / "nowhere" / "report.png"
    assert "does not exist; create it first" in fails(["report", str(trace), "-o", str(out)], capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_into_a_read_only_folder(trace, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert "is not writable" in fails(["report", str(trace), "-o", str(folder / "r.png")], capsys)
    finally:
        folder.chmod(0o700)


def test_report_where_the_write_fails(trace, capsys):
    pytest.importorskip("matplotlib")
    line = fails(["report", str(trace), "-o", "/proc/report.png"], capsys)  # /proc takes no new files, not even root's
    assert "-o /proc/report.png cannot be written" in line


@pytest.mark.parametrize("content", ['{"traceEvents": []}', "", "[]", "{}"])
def test_report_of_an_empty_trace(tmp_path, capsys, content):
    pytest.importorskip("matplotlib")
    path = tmp_path / "trace.json"
    path.write_text(content)
    line = fails(["report", str(path), "-o", str(tmp_path / "r.png")], capsys)
    assert str(path) in line and ("holds no timed spans" in line or "is not a trace" in line)
    assert not (tmp_path / "r.png").exists()


def test_run_batch_on_a_binary_file(opt_dir, tmp_path, capsys):
    pytest.importorskip("pydantic")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    line = fails(["run-batch", "-i", str(binary), "-o", str(tmp_path / "out.jsonl"), "--model", opt_dir], capsys)
    assert line.startswith(f"error: -i {binary} is a binary file")


def test_run_batch_whose_every_request_is_refused(opt_dir, tmp_path, capsys):
    pytest.importorskip("pydantic")
    requests = tmp_path / "requests.txt"
    requests.write_text("just some text\nnot a request either\n")
    line = fails(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--model", opt_dir], capsys)
    assert line.startswith(f"error: all 2 requests of -i {requests} were refused") and "line 1" in line


# ---- item 11 -----------------------------------------------------------------------------------------------------
def test_an_error_starts_its_own_line_without_a_blank_one(tmp_path):
    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "generate", "--input", str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: --input"), repr(run.stderr)


@pytest.mark.parametrize(("percent", "words"), [
    ("70 40 100 0 100 0", "--percent: weights 70 on gpu + 40 on cpu = 110 exceeds 100"),
    ("100 0 100 0 50 60", "--percent: activations 50 on gpu + 60 on cpu = 110 exceeds 100"),
    ("100 0 -5 0 100 0", "--percent C_GPU must be within 0..100, got -5"),
])
def test_percent_errors_in_the_flags_words(opt_dir, capsys, percent, words):
    line = fails([*gen(opt_dir, "w5"), "--percent", *percent.split()], capsys)
    assert words in line and "_percent" not in line


def test_input_dash_reads_standard_input(opt_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'w5 w6\n{"prompt": "w7"}\n')))
    main(gen(opt_dir, "--input", "-", "--json", "--policy", "manual"))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["prompt"]) for r in records] == [(0, "w5 w6"), (1, "w7")]


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(opt_dir, tmp_path, capsys):
    """Windows editors start UTF-8 files with a BOM: prompts files (text and JSON lines) and --instruction @FILE
    read without it."""
    (tmp_path / "plain.txt").write_bytes("\ufeffw5 w6\nw7\n".encode())
    (tmp_path / "lines.jsonl").write_bytes("\ufeff{\"prompt\": \"w5 w6\"}\n".encode())
    (tmp_path / "instruction.txt").write_bytes("\ufeffw9\n".encode())
    for name in ("plain.txt", "lines.jsonl"):
        main(gen(opt_dir, "--input", str(tmp_path / name), "--json", "--policy", "manual"))
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert records[0]["prompt"] == "w5 w6"
    args = build_parser().parse_args(gen(opt_dir, "--instruction", f"@{tmp_path / 'instruction.txt'}", "w5"))
    read_texts(args)
    assert args.instruction == "w9"


def test_an_output_that_is_not_a_regular_file_is_refused(opt_dir, capsys):
    """/dev/full read back for resuming gave zeros forever (a MemoryError after all of RAM)."""
    assert "--output /dev/full is not a regular file" in fails(gen(opt_dir, "--output", "/dev/full", "w5"), capsys)


def test_one_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXGEN_LITE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / "flexgen-lite" == profile_store.cache_dir()
    from flexgen_lite.models.gguf_tokenizer import _tokenizer_cache_dir

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert _tokenizer_cache_dir(str(model)).startswith(str(tmp_path / "flexgen-lite") + os.sep)
    monkeypatch.setenv("FLEXGEN_LITE_CACHE", str(tmp_path / "elsewhere"))
    assert profile_store.cache_dir() == tmp_path / "elsewhere"


def test_plan_says_when_its_peaks_pass_what_this_machine_has(capsys, monkeypatch):
    """Budgets may describe another machine: the plan stands, with a note for each tier this one lacks."""
    from flexgen_lite.planning import budgets

    main(["plan", "--model", "facebook/opt-1.3b", "--cpu-mem", "8GiB"])
    assert "note: this plan peaks" not in capsys.readouterr().out
    real = budgets.free_bytes
    monkeypatch.setattr(budgets, "free_bytes", lambda *a: {**real(*a), "cpu": 2**20})
    main(["plan", "--model", "facebook/opt-1.3b", "--cpu-mem", "8GiB"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: this plan peaks")]
    assert len(notes) == 1 and "of host RAM, where this machine has 1.00 MiB free" in notes[0]


def test_json_prompt_lines_say_which_of_their_fields_are_not_read(tmp_path, capsys):
    """helper-35: {"prompt": "a", "max_tokens": 3} ran with the default 32 tokens without a word: the fields beside
    "prompt" are named once, where first seen; lines of "prompt" alone say nothing."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "max_tokens": 3}\n{"prompt": "b"}\n{"prompt": "c", "foo": 1, "max_tokens": 4}\n')
    assert [p.text for p in batch_io.read_prompts([], str(path))] == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "'max_tokens' (line 1), 'foo' (line 3)" in err and "run-batch" in err
    path.write_text('{"prompt": "a"}\nplain text\n')
    batch_io.read_prompts([], str(path))
    assert capsys.readouterr().err == ""


def test_checking_an_offload_dir_leaves_no_folders_behind(tmp_path):
    """helper-35: `--offload-dir a/b/c` left a, b and c behind, empty, after the run: the check that the folders can
    be made and written removes those it made (the offload store makes them again, and removes them on close)."""
    from flexgen_lite.cli.checks import check_offload_dir

    check_offload_dir(str(tmp_path / "a" / "b" / "c"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    check_offload_dir(str(tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()
