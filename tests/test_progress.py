"""Long work shows progress: the prefill, decode step i/n and tokens per second so far, per block; on stderr
only when it is a terminal."""

from __future__ import annotations

import io
import sys

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.cli import progress

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
