"""Run `flexgen-lite bench` in a fresh process (its own peak RSS) and return its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys


def run_bench(model: str, prompt_len: int, gen_len: int, flags: list[str], cold_disk: bool = False,
              timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", model, "--prompt-len", str(prompt_len),
           "--gen-len", str(gen_len), *flags]
    if cold_disk:
        cmd.append("--cold-disk")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
