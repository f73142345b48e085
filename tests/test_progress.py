"""Long work shows progress: the prefill, decode step i/n and tokens per second so far, per block; on stderr
only when it is a terminal."""

from __future__ import annotations

import io
import json
import sys

import pytest

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.cli.options import progress

from .conftest import PROMPTS


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_generation_reports_each_step(tiny_models):
    seen: list[str] = []
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, dtype="float32")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=policy, progress=seen.append) as m:
        seen.clear()  # placement's messages
        m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=5, stop_at_eos=False))
    assert seen[0].startswith("block 1/2: prefill of 4 prompts")
    decode = [s for s in seen if s.startswith("block 1/2: decode step")]
    assert [s.split(",")[0] for s in decode] == [f"block 1/2: decode step {i}/4" for i in range(1, 5)]
    assert all("tok/s" in s for s in decode)
    assert "block 2/2: prefill of 3 prompts" in seen[len(decode) + 2]
    assert seen[-1] == "block 2/2 done"


def test_progress_only_on_a_terminal(monkeypatch):
    pipe, terminal = io.StringIO(), Terminal()
    monkeypatch.setattr(sys, "stderr", pipe)
    progress("decode step 3/31")
    assert pipe.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", terminal)
    progress("decode step 3/31")
    assert terminal.getvalue().endswith("decode step 3/31")


def progress_lines(terminal: Terminal) -> list[str]:
    return [m for m in terminal.getvalue().replace("\n", "\r").split("\r\033[K") if m.strip()]


def test_generate_counts_all_prompts_across_chunks_with_an_eta(tiny_models, tmp_path, monkeypatch, capsys):
    """Blocks of 1 prompt, chunks of 4 blocks: the engine's "block i/4" restarts with the second chunk, which the
    line names ("part 2/2"); the overall count and ETA in front of it do not restart."""
    from flexgen_lite.cli.main import main

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(["generate", "--model", str(tiny_models["opt"][0]), "--dtype", "float32", "--policy", "manual",
          "--gpu-batch-size", "1", "--max-new-tokens", "3", "--output", str(tmp_path / "out.jsonl"),
          *(f"w{5 + i} w{9 + i}" for i in range(5))])
    lines = [m for m in progress_lines(terminal) if " prompts" in m and "|" in m]
    counts = [int(m.split("/", 1)[0]) for m in lines]
    assert counts == sorted(counts) and counts[-1] == 5 and all(m.split(" prompts")[0].endswith("/5") for m in lines)
    assert any(m.startswith("4/5 prompts, ETA ") and "| part 2/2, block 1/1" in m for m in lines), lines
    assert any("| part 1/2, block 4/4" in m for m in lines), lines
    assert any("ETA" in m and "decode step" in m for m in lines)
    assert "tokens for 5 prompts" in terminal.getvalue()


def test_run_batch_progress_and_the_engines_share_one_line(tiny_models, tmp_path, monkeypatch):
    pytest.importorskip("pydantic")
    from flexgen_lite.cli.main import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                            "body": {"prompt": f"w{5 + i}", "max_tokens": 3}}) + "\n"
                                for i in range(3)))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    main(["run-batch", "-i", str(requests), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_models["opt"][0]),
          "--policy", "manual", "--gpu-batch-size", "1", "--dtype", "float32"])
    lines = progress_lines(terminal)
    decode = [m for m in lines if "decode step" in m]
    assert decode and all(" requests" in m.split("|")[0] for m in decode), decode
    assert any(m.startswith("1/3 requests, ETA") for m in lines)
