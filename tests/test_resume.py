"""`generate --output FILE` resumes without losing or repeating a prompt: lines carry the prompt's index and
a hash of its text; a cut last line is redone, a foreign file refused, a second writer locked out."""

from __future__ import annotations

import fcntl
import json

import pytest

from flexgen_lite import generation
from flexgen_lite.cli.batch_io import prompt_hash
from flexgen_lite.cli.main import main

from .conftest import ctrl_c_in_block

PROMPTS = ["w5 w6 w7", "w9", "w30 w31", "w40 w41 w42 w43", "w50"]


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return str(tiny_models["opt"][0])


@pytest.fixture(scope="module")
def input_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def run(opt_dir, input_file, output, *extra) -> None:
    main(["generate", "--model", opt_dir, "--dtype", "float32", "--policy", "manual", "--gpu-batch-size", "2",
          "--max-new-tokens", "4", "--temperature", "1", "--seed", "7", "--input", str(input_file),
          "--output", str(output), *extra])


@pytest.fixture(scope="module")
def made(opt_dir, input_file, tmp_path_factory) -> list[str]:
    """The lines of an uninterrupted run: first the run's record, then the results."""
    out = tmp_path_factory.mktemp("reference") / "reference.jsonl"
    run(opt_dir, input_file, out)
    return out.read_text().splitlines(keepends=True)


@pytest.fixture(scope="module")
def meta(made) -> str:
    assert "flexgen_lite_run" in json.loads(made[0])
    return made[0]


@pytest.fixture(scope="module")
def finished(made) -> list[str]:
    """The result lines of an uninterrupted run."""
    return made[1:]


def records(path) -> list[dict]:
    """The result lines of an output file."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "index" in r]


def refuse_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(generation, "FlexGenLite", refuse)
    monkeypatch.setattr(generation, "open_model", refuse)


def test_lines_carry_index_and_prompt_hash(finished):
    got = sorted((json.loads(line) for line in finished), key=lambda r: r["index"])  # written block by block
    assert [r["index"] for r in got] == list(range(len(PROMPTS)))
    assert [r["prompt_hash"] for r in got] == [prompt_hash(p) for p in PROMPTS]
    assert all(len(r["token_ids"]) == 4 for r in got)


def test_finished_job_exits_before_loading_the_model(opt_dir, input_file, meta, finished, tmp_path, monkeypatch,
                                                     capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + "".join(finished))
    refuse_loading(monkeypatch)
    run(opt_dir, input_file, out)
    assert "all 5 prompts already answered" in capsys.readouterr().err
    assert out.read_text() == meta + "".join(finished)


def test_resume_after_a_cut_last_line_redoes_that_prompt(opt_dir, input_file, meta, finished, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + "".join(finished[:2]) + finished[2][:25])  # killed while writing prompt 2's line
    run(opt_dir, input_file, out)
    err = capsys.readouterr().err
    assert "dropped a last line cut short" in err and "resuming: 2 of 5" in err
    # the same lines as an uninterrupted run: sampling depends on the seed and the prompt's place only
    assert out.read_text() == meta + "".join(finished)


def test_a_whole_last_line_without_its_newline_is_kept(opt_dir, input_file, meta, finished, tmp_path, capsys,
                                                       monkeypatch):
    """helper-35: a result line whole but for its newline (written by hand, or cut just before it) was dropped as
    cut short and its prompt redone; it is kept, its newline added."""
    out = tmp_path / "out.jsonl"
    out.write_text(meta + "".join(finished[:4]) + finished[4].rstrip("\n"))
    refuse_loading(monkeypatch)  # nothing left to do: the model is not even opened
    run(opt_dir, input_file, out)
    err = capsys.readouterr().err
    assert "dropped" not in err and "all 5 prompts already answered" in err
    assert out.read_text() == meta + "".join(finished)


def test_resume_skips_what_is_done_in_any_order(opt_dir, input_file, meta, finished, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + finished[3] + finished[0])
    run(opt_dir, input_file, out)
    assert sorted(r["index"] for r in records(out)) == list(range(len(PROMPTS)))
    assert sorted(out.read_text().splitlines(keepends=True)) == sorted([meta, *finished])


def fails(argv_runner, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        argv_runner()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize("foreign", ["text", "other-input", "too-many"])
def test_a_file_of_another_input_is_refused(opt_dir, input_file, finished, tmp_path, monkeypatch, capsys, foreign):
    out = tmp_path / "out.jsonl"
    other = json.loads(finished[1])
    out.write_text({
        "text": "".join(f"line {i}\n" for i in range(200)),
        "other-input": json.dumps({**other, "prompt_hash": prompt_hash("something else")}) + "\n",
        "too-many": json.dumps({**other, "index": 9}) + "\n",
    }[foreign])
    before = out.read_text()
    refuse_loading(monkeypatch)
    err = fails(lambda: run(opt_dir, input_file, out), capsys)
    assert f"error: --output {out} line 1 does not belong to this input" in err
    assert "choose another --output file" in err
    assert out.read_text() == before  # left as it was


def test_a_foreign_last_line_without_newline_is_not_truncated(opt_dir, input_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes, no newline at the end")
    refuse_loading(monkeypatch)
    assert "does not belong to this input" in fails(lambda: run(opt_dir, input_file, out), capsys)
    assert out.read_text() == "my notes, no newline at the end"


def test_a_second_writer_fails_fast(opt_dir, input_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    refuse_loading(monkeypatch)
    with open(out, "ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # another run writing this file
        err = fails(lambda: run(opt_dir, input_file, out), capsys)
    assert "is being written by another flexgen-lite process" in err
    assert out.read_text() == ""


def test_a_run_stopped_mid_chunk_keeps_the_blocks_it_finished(opt_dir, input_file, finished, tmp_path, monkeypatch,
                                                              capsys):
    """Blocks of 2 prompts, all 5 in one chunk: each block's lines are written when it ends, so a run stopped in
    the third block keeps the first four completions, says so and how to go on, and the rerun does only the
    last."""
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as patch:
        ctrl_c_in_block(patch, 3)
        with pytest.raises(SystemExit) as e:
            run(opt_dir, input_file, out)
    assert e.value.code == 130
    assert f"interrupted; offload files removed; 4 results kept in {out}: rerun the same command to resume" in \
        capsys.readouterr().err
    assert len(records(out)) == 4
    assert set(out.read_text().splitlines(keepends=True)[1:]) <= set(finished)
    run(opt_dir, input_file, out)
    assert sorted(records(out), key=lambda r: r["index"]) == sorted(map(json.loads, finished), key=lambda r: r["index"])


# ---- the file records what made it ----------------------------------------------------------------------------
def test_the_file_records_model_settings_and_numerics(meta, opt_dir):
    run_record = json.loads(meta)["flexgen_lite_run"]
    assert run_record["model"]["path"] == opt_dir and len(run_record["model"]["fingerprint"]) == 16
    assert run_record["settings"] == {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 7,
                                      "stop": [], "ignore_eos": False, "chat": False, "instruction": None,
                                      "system": None}
    assert run_record["policy"]["dtype"] == "float32" and run_record["policy"]["gpu_batch_size"] == 2
    assert run_record["policy"]["compress_weight"] is False


@pytest.mark.parametrize(("extra", "named"), [
    (["--max-new-tokens", "5"], "--max-new-tokens 4, not 5"),
    (["--temperature", "0.5"], "--temperature 1, not 0.5"),
    (["--seed", "8"], "--seed 7, not 8"),
    (["--chat"], "--chat off, not on"),
    (["--stop", "w9"], '--stop [], not ["w9"]'),
    (["--dtype", "bfloat16"], "--dtype float32, not bfloat16"),
    (["--compress-weight"], "--compress-weight off, not on"),
])
def test_a_resume_with_other_settings_is_refused(opt_dir, input_file, meta, finished, tmp_path, monkeypatch, capsys,
                                                 extra, named):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + finished[0])
    before = out.read_text()
    refuse_loading(monkeypatch)
    err = fails(lambda: run(opt_dir, input_file, out, *extra), capsys)
    assert err.startswith(f"error: --output {out} was made with {named}") and "--force-resume" in err, err
    assert "\n" not in err
    assert out.read_text() == before


def test_a_resume_with_another_model_is_refused(opt_dir, tiny_models, input_file, meta, finished, tmp_path,
                                                monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + finished[0])
    refuse_loading(monkeypatch)
    other = str(tiny_models["llama"][0])
    err = fails(lambda: run(other, input_file, out), capsys)
    assert err.startswith(f"error: --output {out} was made with another model (it was made with {opt_dir}, this run "
                          f"uses {other})")
    err = fails(lambda: run("facebook/opt-125m", input_file, out), capsys)
    assert "another model" in err


def test_force_resume_appends_anyway(opt_dir, input_file, meta, finished, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(meta + finished[0])
    run(opt_dir, input_file, out, "--max-new-tokens", "3", "--force-resume")
    assert "--force-resume: appending" in capsys.readouterr().err
    assert sorted(len(r["token_ids"]) for r in records(out)) == [3, 3, 3, 3, 4]
    assert out.read_text().startswith(meta)  # the first run's record stays


def test_a_resumed_job_keeps_the_first_runs_dtype_and_policy(opt_dir, input_file, meta, finished, tmp_path, capsys):
    """Resumed without any policy flag (auto would search its own): the recorded dtype and batch are reused, so
    the rest is computed as the first run computed it."""
    out = tmp_path / "out.jsonl"
    out.write_text(meta + "".join(finished[:2]))
    main(["generate", "--model", opt_dir, "--max-new-tokens", "4", "--temperature", "1", "--seed", "7",
          "--input", str(input_file), "--output", str(out)])
    err = capsys.readouterr().err
    assert "keeping the first run's numerics" in err
    last = err.strip().splitlines()[-1]
    assert "float32" in last and "--gpu-batch-size 2" in last, last
    assert sorted(out.read_text().splitlines(keepends=True)) == sorted([meta, *finished])


def test_a_resume_keeps_the_first_runs_weight_groups(opt_dir, input_file, tmp_path, capsys):
    """Compressed weights in groups of 32: a resume without the flags takes them (and the dtype, said so) from the
    record, and gives what an uninterrupted run gives; another group size is refused (it was ignored)."""
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    run(opt_dir, input_file, whole, "--compress-weight", "--weight-group-size", "32")
    lines = whole.read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["flexgen_lite_run"]["policy"]["weight_group_size"] == 32
    out.write_text("".join(lines[:3]))
    capsys.readouterr()
    main(["generate", "--model", opt_dir, "--max-new-tokens", "4", "--temperature", "1", "--seed", "7",
          "--input", str(input_file), "--output", str(out)])
    err = capsys.readouterr().err
    assert "keeping the first run's numerics: --dtype float32 --compress-weight --weight-group-size 32" in err, err
    assert "float32 (kept from the first run of --output)" in err, err
    assert sorted(out.read_text().splitlines(keepends=True)) == sorted(lines)
    err = fails(lambda: run(opt_dir, input_file, out, "--weight-group-size", "64"), capsys)
    assert "was made with --weight-group-size 32, not 64" in err, err


def test_a_file_of_an_older_version_resumes_unchecked(opt_dir, input_file, finished, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(finished[0])
    run(opt_dir, input_file, out)
    assert "does not record what made it" in capsys.readouterr().err
    assert len(records(out)) == 5


def test_greedy_ignores_the_seed(opt_dir, input_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    main(["generate", "--model", opt_dir, "--dtype", "float32", "--max-new-tokens", "2", "--seed", "1", "w5",
          "--output", str(out)])
    main(["generate", "--model", opt_dir, "--dtype", "float32", "--max-new-tokens", "2", "--seed", "2", "w5", "w6",
          "--output", str(out)])
    assert "resuming: 1 of 2" in capsys.readouterr().err
