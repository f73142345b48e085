"""Blocks whose last prompts still generate while others wait: kept whole, or ended early with those prompts going
on in a later block (`generate --carry-over`), on prompts whose answers end at very different lengths.

Runs `flexgen-lite generate --chat` in a fresh process per setting, round robin (a slow spell of the machine
hits every setting alike), on SmolLM2-135M-Instruct (the GGUF the package ships) and prints the wall time of
generation, the tokens generated, useful tok/s, and how many answers equal the never-carried run's.

    .venv/bin/python benchmarks/carry_over.py                                   # weights on disk, blocks of 8
    .venv/bin/python benchmarks/carry_over.py --policy "--percent 100 0 100 0 100 0 --gpu-batch-size 8"
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# of one length in tokens (21 with the chat template's, at indices 10-99), so that blocks (cut by prompt length)
# hold both
SHORT = "Reply with one word only. What color is the sky on a clear day? ({})"
LONG = "Explain in great detail, step by step, how to bake a loaf of bread. ({})"
SETTINGS = ("never", "auto", "always")


def prompts(n: int) -> list[str]:
    """n prompts, one long answer to three short ones, interleaved so that every block gets both."""
    return [(LONG if i % 4 == 0 else SHORT).format(10 + i) for i in range(n)]


def run(setting: str, path: Path, args) -> dict:
    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    cmd = [sys.executable, "-m", "flexgen_lite.cli", "generate", "--chat", "--input", str(path), "--output",
           str(out), "--max-new-tokens", str(args.max_new_tokens), "--carry-over", setting, "--no-progress",
           *args.policy.split()]
    tic = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"(\d+) tokens for (\d+) prompts in ([\d.]+) s", done.stderr)
    answers = {r["index"]: r["token_ids"] for r in map(json.loads, out.read_text().splitlines()) if "index" in r}
    return {"setting": setting, "tokens": int(found[1]), "generation_s": float(found[3]), "wall_s": round(wall, 2),
            "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--policy", default="--percent 0 0 100 0 100 0 --gpu-batch-size 8 --dtype bfloat16",
                   help="policy flags of every run (default: weights on disk, read back from the page cache)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args()
    path = Path(tempfile.mkdtemp()) / "prompts.txt"
    path.write_text("\n".join(prompts(args.prompts)) + "\n")
    runs = [run(s, path, args) for _ in range(args.repeat) for s in SETTINGS]
    base = next(r for r in runs if r["setting"] == "never")["answers"]
    print(f"{args.prompts} prompts, --max-new-tokens {args.max_new_tokens}, {args.policy}; generation s (range), "
          "tokens, useful tok/s, answers equal to the first never-carried run's")
    print("| --carry-over | generation s | tokens | tok/s | same answers |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        mine = [r for r in runs if r["setting"] == s]
        best = min(mine, key=lambda r: r["generation_s"])
        spread = f" ({min(r['generation_s'] for r in mine)}-{max(r['generation_s'] for r in mine)})"
        same = sum(best["answers"][i] == base[i] for i in base)
        print(f"| {s} | {best['generation_s']}{spread} | {best['tokens']} | "
              f"{best['tokens'] / best['generation_s']:.1f} | {same}/{len(base)} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in runs],
                                              indent=1))


if __name__ == "__main__":
    main()
