"""Everyday mistakes on the command line: one `error:` line, exit code 2, no traceback, and before the model
(or the hardware profile) is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flexgen_lite import generation  # noqa: F401 - bench imported first, so it never binds the refusal below
from flexgen_lite.cli.main import build_parser, main


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model's weights or the profile would be loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model before checking the command line")

    monkeypatch.setattr(generation, "FlexGenLite", refuse)
    monkeypatch.setattr("flexgen_lite.profiling.measure.load_profile", refuse)


def fails(argv: list[str], capsys) -> str:
    """The error line of a command that must exit with code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def gen(opt_dir: str, *extra: str) -> list[str]:
    return ["generate", "--model", opt_dir, "--dtype", "float32", "--max-new-tokens", "2", *extra]


def test_missing_input_file(opt_dir, tmp_path, no_loading, capsys):
    assert "no such file" in fails(gen(opt_dir, "--input", str(tmp_path / "nope.txt")), capsys)


@pytest.mark.parametrize("where", ["directory", "missing-dir", "under-a-file"])
def test_unusable_output(opt_dir, tmp_path, no_loading, capsys, where):
    (tmp_path / "file").write_text("x")
    path = {"directory": tmp_path, "missing-dir": tmp_path / "nowhere" / "out.jsonl",
            "under-a-file": tmp_path / "file" / "out.jsonl"}[where]
    line = fails(gen(opt_dir, "--output", str(path), "w5 w6"), capsys)
    assert f"--output {path}" in line


@pytest.mark.parametrize("existed", [False, True])
def test_a_model_that_fails_to_load_leaves_no_output_file(tmp_path, capsys, existed):
    """The --output file is claimed (created and locked) before the model loads; when loading fails, a file this
    run made and never wrote to is removed again, and one that was there already is left as it was."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = tmp_path / "out.jsonl"
    if existed:
        out.write_bytes(b"")
    assert "'gpt2' is not supported" in fails(gen(str(bad), "--output", str(out), "w5 w6"), capsys)
    assert out.exists() == existed


@pytest.mark.parametrize(("content", "words"), [
    ('w5 w6\n{"text": "w7"}\n', "line 2 has no \"prompt\" string field"),
    ('w5 w6\n{"prompt": "w7"\n', "line 2 starts with '{' but is not valid JSON"),
    ('w5 w6\n\n{"prompt": ""}\n', "line 3 is empty"),
    (b"w5 w6\nw7\nw8 \xff\xfe\n", "line 3 is not valid UTF-8"),
    (b"w5 w6\n\0\0\0\n", "is a binary file (a NUL byte on line 2)"),  # it decodes as UTF-8 (helper-44)
    ("{x} is a placeholder\n", 'given as a JSON line: {"prompt": "..."}'),  # how to give such a prompt
])
def test_bad_input_lines_are_named(opt_dir, tmp_path, no_loading, capsys, content, words):
    path = tmp_path / "prompts.txt"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    line = fails(gen(opt_dir, "--input", str(path)), capsys)
    assert str(path) in line and words in line


def test_empty_prompt_argument(opt_dir, no_loading, capsys):
    assert "argument 2 is empty" in fails(gen(opt_dir, "w5", ""), capsys)


@pytest.mark.parametrize(("flags", "words"), [
    (["--temperature", "nan"], "--temperature: must be a finite number"),
    (["--top-p", "inf"], "--top-p: must be a finite number"),
    (["--gpu-batch-size", "0"], "--gpu-batch-size: must be at least 1"),
    (["--num-gpu-batches", "0"], "--num-gpu-batches: must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["--stop", ""], "--stop \"\" would end every output"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--device", "tpu"], "--device tpu"),
    (["--cpu-mem", "lots"], "--cpu-mem: cannot read 'lots' as a size: write e.g. 16GiB"),
])
def test_bad_flags(opt_dir, no_loading, capsys, flags, words):
    assert words in fails([*gen(opt_dir, "w5"), *flags], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu(opt_dir, no_loading, capsys):
    assert "no CUDA GPU" in fails([*gen(opt_dir, "w5"), "--device", "cuda"], capsys)


@pytest.mark.parametrize("command", ["generate", "bench", "plan", "profile"])
def test_unwritable_offload_dir(opt_dir, tmp_path, no_loading, capsys, command):
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "offload")
    argv = {"generate": gen(opt_dir, "w5"), "bench": ["bench"], "profile": ["profile", "--refresh"],
            "plan": ["plan", "--prompt-len", "8", "--gen-len", "2"]}[command]
    assert f"--offload-dir {bad} is not a writable directory" in fails([*argv, "--offload-dir", bad], capsys)


def test_too_long_prompt_is_named_by_its_line(opt_dir, tmp_path, no_loading, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("w5 w6\n\nw7\n" + " ".join(["w9"] * 70) + "\n")
    line = fails(gen(opt_dir, "--input", str(path)), capsys)
    assert f"{path} line 4 has 70 tokens" in line and "context of 64 positions" in line


def test_huge_prompt_exceeds_the_context_not_the_memory(opt_dir, no_loading, capsys):
    line = fails(gen(opt_dir, " ".join(["w9"] * 200_000)), capsys)
    assert "argument 1 has 200000 tokens" in line and "context" in line and "GiB" not in line


@pytest.mark.parametrize("command", ["plan", "bench"])
def test_workload_past_the_context_is_said_so(no_loading, capsys, command):
    line = fails([command, "--model", "facebook/opt-125m", "--prompt-len", "500000", "--gen-len", "32"], capsys)
    assert "exceed the context of facebook/opt-125m (2048 positions)" in line and "GiB" not in line


def test_help_shows_defaults():
    helps = {name: sub.format_help() for name, sub in
             build_parser()._subparsers._group_actions[0].choices.items()}
    for words in ("tokens to generate per prompt (default 32)", "(default 0)", "(default 1.0)", "seed of sampling"):
        assert words in " ".join(helps["generate"].split())
    assert "(default facebook/opt-1.3b)" in helps["bench"] and "tokens generated (default 32)" in helps["bench"]


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "generate", "--input", str(tmp_path / "no"),
                          "--temperature", "0.5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: --input") and len(run.stderr.strip().splitlines()) == 1


def test_json_input_lines_and_plain_lines_mix(opt_dir, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text('w5 w6\n{"prompt": "w7 w8", "id": 3}\n')
    main(gen(opt_dir, "--input", str(path), "--json", "--policy", "manual"))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["prompt"]) for r in records] == [(0, "w5 w6"), (1, "w7 w8")]


def test_a_closed_stdout_ends_generate_quietly(opt_dir):
    """helper-44: `generate ... | head -1` ended with a BrokenPipeError traceback and exit 1; as a Unix tool, it
    ends quietly with SIGPIPE's code."""
    cmd = [sys.executable, "-m", "flexgen_lite.cli", "generate", "--model", opt_dir, "--json", "--no-progress",
           "--max-new-tokens", "2", "--percent", "100", "0", "100", "0", "100", "0", "--gpu-batch-size", "4",
           "--dtype", "float32", *(f"w{i} w{i + 1}" for i in range(300, 340))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and json.loads(first)["index"] == 0
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
