"""The OpenAI doors against offline `generate`, on the same prompts, in one run.

1. offline: `FlexGenLite.generate` over all prompts (greedy, exactly --gen-len tokens each), timed after load;
2. run-batch: the same prompts as a batch file through `flexgen-lite run-batch` (its own tok/s line);
3. serve: the same prompts as --concurrency concurrent requests through the real `openai` client, timed
   from the first request to the last answer.
Every answer must equal the offline text. The three run in turn, --rounds times (the model and the server stay
loaded); prints each round's tok/s and each door's ratio to offline in the same round, and their medians.

    .venv/bin/python benchmarks/doors_vs_generate.py --prompts 64 --gen-len 16 --gpu-batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ["the", "a", "cat", "dog", "sky", "sea", "river", "mountain", "city", "house", "quick", "brown", "lazy",
         "jumps", "over", "under", "near", "far", "tree", "bird"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="default: SmolLM2-135M-Instruct (GGUF)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--gpu-batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=50)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three doors, interleaved")
    args = p.parse_args()
    from flexgen_lite.engine.policy import Policy
    from flexgen_lite.generation import FlexGenLite
    from flexgen_lite.kernels.sampling import SamplingConfig
    from flexgen_lite.models.gguf_file import default_model_path

    model = args.model or default_model_path()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(args.prompts)]
    flags = ["--policy", "manual", "--gpu-batch-size", str(args.gpu_batch_size), "--dtype", "float32"]
    tokens = args.prompts * args.gen_len

    with FlexGenLite(model, policy=Policy(gpu_batch_size=args.gpu_batch_size, dtype="float32")) as m, \
            tempfile.TemporaryDirectory() as tmp, _server(model, flags, Path(tmp) / "state", args.max_wait_ms) as port:
        batch, out = Path(tmp) / "requests.jsonl", Path(tmp) / "results.jsonl"
        body = {"max_tokens": args.gen_len, "temperature": 0, "ignore_eos": True}
        batch.write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                             "body": {"prompt": t, **body}}) + "\n" for i, t in enumerate(prompts)))
        rates: dict[str, list[float]] = {"offline": [], "run-batch": [], "serve": []}
        m.generate_ids(m.encode(prompts), SamplingConfig(2, stop_at_eos=False))  # warm-up (its buffers), not timed
        for r in range(args.rounds):  # interleaved, so that a busy spell slows every door of a round alike
            tic = time.perf_counter()
            ids = m.generate_ids(m.encode(prompts), SamplingConfig(args.gen_len, stop_at_eos=False))
            rates["offline"].append(tokens / (time.perf_counter() - tic))
            texts = [m.decode(i) for i in ids]
            out.unlink(missing_ok=True)
            rates["run-batch"].append(_run_batch(batch, out, model, flags, len(prompts), texts))
            serve_s, got = _load(port, prompts, body, args.concurrency)
            assert got == texts, "serve differs from offline"
            rates["serve"].append(tokens / serve_s)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()), flush=True)
    print(f"\n{args.prompts} prompts, gen {args.gen_len}, gpu batch {args.gpu_batch_size}, {args.rounds} rounds; "
          "all answers equal offline")
    for door in ("run-batch", "serve"):
        ratios = [d / o for d, o in zip(rates[door], rates["offline"], strict=True)]
        print(f"{door}: median {statistics.median(rates[door]):.1f} tok/s, ratio to offline in each round "
              f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f})")
    print(f"offline: median {statistics.median(rates['offline']):.1f} tok/s")


def _run_batch(batch: Path, out: Path, model: str, flags: list[str], n: int, texts: list[str]) -> float:
    """One `flexgen-lite run-batch` process; its own tok/s line (generation only, load excluded)."""
    run = subprocess.run([sys.executable, "-m", "flexgen_lite.cli", "run-batch", "-i", str(batch), "-o", str(out),
                          "--model", model, *flags], capture_output=True, text=True, check=True)
    answers = {int(r["custom_id"]): r["response"]["body"]["choices"][0]["text"]
               for r in map(json.loads, out.read_text().splitlines())}
    assert [answers[i] for i in range(n)] == texts, "run-batch differs from offline"
    return float(re.search(r"s: ([\d.]+) tok/s", run.stderr).group(1))


@contextlib.contextmanager
def _server(model: str, flags: list[str], state: Path, max_wait_ms: float):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "flexgen_lite.cli", "serve", "--model", model, "--port",
                               str(port), "--state-dir", str(state), "--max-wait-ms", str(max_wait_ms), *flags],
                              stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _load(port: int, prompts: list[str], body: dict, concurrency: int) -> tuple[float, list[str]]:
    import openai

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def ask(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=body["max_tokens"], temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(concurrency) as pool:
        tic = time.perf_counter()
        got = list(pool.map(ask, prompts))
        return time.perf_counter() - tic, got


if __name__ == "__main__":
    main()
