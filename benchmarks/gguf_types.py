"""GGUF files as llama.cpp's own quantizer writes them (Q4_K_M, Q5_K_M, ...) through FlexGen-Lite and transformers.

Each --ftype is made from the shipped SmolLM2-135M-Instruct (Q4_1, requantized) by llama-cpp-python's
`llama_model_quantize`, the code behind llama.cpp's `llama-quantize`. SmolLM2's rows (576) are not whole K-quant
blocks (256), so llama.cpp falls back to Q5_0/Q5_1/Q4_0/IQ4_NL for most matrices: the files mix 4-6 types, as
real downloads do. For each file:
- the tensor types it holds;
- agreement with transformers (its GGUF loader, which dequantizes with the `gguf` package), both in fp32: greedy
  continuations of 4 English and code prompts (16 tokens) token for token, and the largest logit difference;
- FlexGen-Lite's load time (open + dequantize + place);
- `flexgen-lite bench` decode tok/s at --batch, prompt 64, gen 32, the compute dtype it picks, uncompressed and
  with --compress-weight (the file's Q4_0/Q4_1/Q4_K groups kept, other matrices rounded to 4 bits), each in its
  own process.

Needs llama-cpp-python (hand-installed in .venv, benchmarks only):

    .venv/bin/python benchmarks/gguf_types.py --json-out benchmarks/results/gguf-types-smollm2.json
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at"]


def quantize(source: str, ftype: str, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), True, 2
    if llama_cpp.llama_model_quantize(source.encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")


def tensor_types(path: Path) -> dict[str, int]:
    from flexgen_lite.models.gguf_reader import GGUFContents

    return dict(collections.Counter(t.tensor_type.name for t in GGUFContents(str(path)).tensors).most_common())


def transformers_greedy(path: Path, prompts: list[list[int]], new_tokens: int):
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)  # rebuilt per submodule otherwise
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"],
                          strict=False)
    model.tie_weights()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import hf_greedy

    return hf_greedy(model, prompts, new_tokens)


def agreement(path: Path) -> dict:
    from flexgen_lite import FlexGenLite, Policy, SamplingConfig
    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer

    tokenizer = gguf_tokenizer(path)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    want_ids, want_logits = transformers_greedy(path, prompts, 16)
    start = time.perf_counter()
    with FlexGenLite(str(path), policy=Policy(gpu_batch_size=len(prompts), dtype="float32")) as m:
        load_s = time.perf_counter() - start
        ids, logits = m.generate_ids(prompts, SamplingConfig(max_new_tokens=16, stop_at_eos=False),
                                     return_logits=True)
    return {"same_tokens": ids == want_ids, "rows_same": sum(a == b for a, b in zip(ids, want_ids, strict=True)),
            "max_logit_diff": max(float((a - b).abs().max()) for a, b in zip(logits, want_logits, strict=True)),
            "load_s": round(load_s, 2), "text": [p + tokenizer.decode(i) for p, i in zip(PROMPTS, ids, strict=True)]}


def bench(path: Path, batch: int, compress: bool) -> dict:
    cmd = [sys.executable, "-m", "flexgen_lite.cli", "bench", "--model", str(path), "--percent", "100", "0", "100",
           "0", "100", "0", "--gpu-batch-size", str(batch), "--prompt-len", "64", "--gen-len", "32"]
    run = subprocess.run(cmd + (["--compress-weight"] if compress else []), capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1]}
    record = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    notes = [line for line in run.stderr.splitlines() if line.startswith("note:")]
    return {key: record[key] for key in ("dtype", "decode_tok_s", "decode_step_ms", "model_gb", "peak_rss_gb")} | {
        "note": notes[0] if notes else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ftype", nargs="+", default=["Q4_K_M", "Q5_K_M", "Q3_K_M", "IQ4_XS"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    from flexgen_lite.models.gguf_file import default_model_path

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for ftype in args.ftype:
            path = Path(folder) / f"smollm2-{ftype}.gguf"
            quantize(default_model_path(), ftype, path)
            row = {"ftype": ftype, "file_mb": round(os.path.getsize(path) / 1e6, 1), "types": tensor_types(path)}
            row |= agreement(path)
            row["bench"] = {"plain": bench(path, args.batch, False), "compressed": bench(path, args.batch, True)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| file (llama.cpp ftype) | tensor types | same tokens as transformers (fp32) | max logit diff | "
          f"decode tok/s, batch {args.batch} | with --compress-weight |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in r["types"].items() if k != "F32")
        b = r["bench"]
        print(f"| {r['ftype']} ({r['file_mb']} MB) | {types} | {r['rows_same']}/{len(PROMPTS)} | "
              f"{r['max_logit_diff']:.1e} | {b['plain'].get('decode_tok_s')} | {b['compressed'].get('decode_tok_s')} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"batch": args.batch, "cpu": os.cpu_count(), "rows": rows},
                                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
