"""FlexGen-Lite against llama.cpp (through llama-cpp-python) on one GGUF file, in one run.

Both systems load the same GGUF (default: the shipped SmolLM2-135M-Instruct, Q4_1), get the same random prompts
(fixed seed, token ids drawn from the vocabulary), decode greedily and generate exactly --gen-len tokens per
prompt, on the same threads. Each (system, batch) runs in its own subprocess (this script re-invoked with
--worker), so peak RSS is per run; the parent never imports torch or llama_cpp.

- llama.cpp: its batched decoding (`llama_decode` over several sequences of one context, as its `batched`
  example and its server's parallel slots do): one context of n_seq_max = batch, the prompts decoded in chunks of
  --n-batch tokens (logits only for each prompt's last token), then one `llama_decode` of `batch` tokens per step;
  argmax over the returned logits. Weights as stored in the file (Q4_1: its own 4-bit kernels, activations
  quantized to 8 bits for the dot products).
- FlexGen-Lite: `FlexGenLite(gguf, policy=Policy(gpu_batch_size=batch))`, the weights dequantized on load to the
  compute dtype this machine's profile picks (or --dtype), or `--compress-weight` (a Q4_0/Q4_1 file's decoder
  matrices kept in 4 bits as stored, its int4 kernel multiplying them), `generate_ids` with `stop_at_eos=False`.
- Both: one untimed warm-up (all rows, 8-token prompts, 2 new tokens). prefill s = the prompts' forward pass and
  the first token; decode s = the other gen-1 steps. total tok/s = batch x gen / (prefill + decode) (FlexGen's
  metric), decode tok/s = batch x (gen - 1) / decode. --repeat N: the run with the median total.
- --shared-prefix N: every prompt's first N tokens are the same (an instruction before each item). Each system
  computes them once per batch, as its users would: llama.cpp decodes them as sequence 0 and copies that
  sequence's cache to the others (`llama_memory_seq_cp`, as its `batched` example and server share a system
  prompt), then decodes each prompt's rest; FlexGen-Lite's prefill does by default (Policy.share_prefix). With
  --no-share both compute every prompt whole (the ablation).
- agreement: rows whose generated ids are identical between the two (and whose first token is): the two
  compute differently (llama.cpp rounds activations to 8 bits), so near-ties can differ; reported, not an error.

Needs llama-cpp-python (`pip install llama-cpp-python`: built from source, ~6 min on 2 cores; the parent says so
and runs FlexGen-Lite alone when it is missing).

    .venv/bin/python benchmarks/compare_llamacpp.py --batch 1 16 64 --prompt-len 64 --gen-len 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from compare_hf import agreement  # the same count of rows whose ids agree

RESULT = "RESULT "
WARMUP_PROMPT_LEN = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GGUF file (default: the shipped SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="FlexGen-Lite's compute dtype (default: its choice)")
    p.add_argument("--compress-weight", action="store_true", help="also run FlexGen-Lite with its 4-bit weights")
    p.add_argument("--n-batch", type=int, default=2048, help="llama.cpp: tokens per llama_decode of the prompts")
    p.add_argument("--n-ubatch", type=int, default=512, help="llama.cpp: tokens per compute pass (its default)")
    p.add_argument("--kv-unified", action="store_true",
                   help="llama.cpp: one KV buffer for all sequences (each attends over all of its cells, masked); "
                        "default: a stream per sequence, as llama.cpp's default")
    p.add_argument("--no-repack", action="store_true",
                   help="llama.cpp: no extra buffer types (its AMX / CPU repack of the weights): a native build "
                   "crashed in llama_decode with them on an AMX Xeon (2026-12-07, llama-cpp-python 0.3.36)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N", help="prompts share their first N tokens")
    p.add_argument("--no-share", action="store_true", help="with --shared-prefix: each system computes it per prompt")
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", choices=["llama.cpp", "flexgen-lite"], help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-compress", action="store_true", help=argparse.SUPPRESS)
    return p


def model_path(args) -> str:
    if args.model:
        return args.model
    from flexgen_lite.models.gguf_file import default_model_path

    return default_model_path()


def make_prompts(args, batch: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(3, vocab, (batch, args.prompt_len))
    prompts[:, :args.shared_prefix] = prompts[0, :args.shared_prefix]
    return prompts.tolist()


def peak_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    return 0.0


def result(args, system: str, batch: int, runs: list[tuple[float, float]], ids, **extra) -> dict:
    prefill_s, total_s = sorted(runs, key=lambda r: r[1])[(len(runs) - 1) // 2]
    decode_s, gen = total_s - prefill_s, args.gen_len
    return {"system": system, "batch": batch, "prompt_len": args.prompt_len, "gen_len": gen,
            "threads": args.threads, "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
            "decode_step_ms": round(1000 * decode_s / (gen - 1), 2) if gen > 1 else None,
            "decode_tok_s": round(batch * (gen - 1) / decode_s, 1) if gen > 1 and decode_s > 0 else None,
            "total_tok_s": round(batch * gen / total_s, 1), "repeat_total_s": [round(t, 3) for _, t in runs],
            "shared_prefix": args.shared_prefix, "shared": args.shared_prefix > 0 and not args.no_share,
            "peak_rss_gib": peak_rss_gib(), "ids": ids, **extra}


# ---- llama.cpp -------------------------------------------------------------------------------------------------
class LlamaCppBatch:
    """Greedy batched generation with llama.cpp's C API: one sequence id per prompt."""

    def __init__(self, path: str, batch: int, max_len: int, threads: int, n_batch: int, n_ubatch: int,
                 unified: bool, repack: bool = True) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.use_extra_bufts = repack
        self.model = L.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = batch * max_len, batch, unified
        cp.n_batch = max(n_batch, batch)
        cp.n_ubatch = min(cp.n_batch, n_ubatch)
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = cp.n_batch
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]):
        """entries of (token, position, sequence, wants logits); the logits asked for, in order."""
        import numpy as np

        b = self.batch
        for i, (token, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(e[3] for e in entries)
        if not n_out:
            return None
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def generate(self, prompts: list[list[int]], gen_len: int, shared: int = 0) -> tuple[list[list[int]], float, float]:
        """(generated ids per prompt, prefill s, total s). shared: the prompts' first `shared` tokens, the same in
        all, decoded once as sequence 0, whose cache is then copied to the others."""
        memory = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_clear(memory, True)
        tic = time.perf_counter()
        if shared:
            prefix = [(tok, pos, 0, False) for pos, tok in enumerate(prompts[0][:shared])]
            for first in range(0, shared, self.n_batch):
                self._decode(prefix[first:first + self.n_batch])
            for s in range(1, len(prompts)):
                self.L.llama_memory_seq_cp(memory, 0, s, -1, -1)
        flat = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)
                if pos >= shared]
        last = []
        for first in range(0, len(flat), self.n_batch):
            logits = self._decode(flat[first:first + self.n_batch])
            if logits is not None:
                last.extend(logits.argmax(1).tolist())
        out = [[t] for t in last]
        prefill_s = time.perf_counter() - tic
        for step in range(1, gen_len):
            logits = self._decode([(ids[-1], len(p) + step - 1, s, True)
                                   for s, (p, ids) in enumerate(zip(prompts, out, strict=True))])
            for ids, t in zip(out, logits.argmax(1).tolist(), strict=True):
                ids.append(t)
        return out, prefill_s, time.perf_counter() - tic


def run_llamacpp(args, batch: int) -> dict:
    import llama_cpp

    path = model_path(args)
    tic = time.perf_counter()
    lc = LlamaCppBatch(path, batch, args.prompt_len + args.gen_len, args.threads, args.n_batch,
                       args.n_ubatch, args.kv_unified, not args.no_repack)
    load_s = time.perf_counter() - tic
    prompts = make_prompts(args, batch, lc.n_vocab)
    lc.generate([p[:WARMUP_PROMPT_LEN] for p in prompts], 2)
    runs, ids = [], None
    shared = 0 if args.no_share else args.shared_prefix
    for _ in range(args.repeat):
        ids, prefill_s, total_s = lc.generate(prompts, args.gen_len, shared)
        runs.append((prefill_s, total_s))
    return result(args, "llama.cpp", batch, runs, ids, load_s=round(load_s, 2), weights="as stored (file_types)",
                  kv_unified=args.kv_unified, n_ubatch=args.n_ubatch, version=llama_cpp.__version__)


# ---- FlexGen-Lite ----------------------------------------------------------------------------------------------
def run_flexgen(args, batch: int, compress: bool) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from flexgen_lite import FlexGenLite, Policy, SamplingConfig
    from flexgen_lite.model_source import kept_groups

    policy = Policy(gpu_batch_size=batch, num_gpu_batches=1, dtype=args.dtype, compress_weight=compress,
                    share_prefix=not args.no_share)
    tic = time.perf_counter()
    with FlexGenLite(model_path(args), policy=policy, device="cpu") as m:
        load_s = time.perf_counter() - tic
        prompts = make_prompts(args, batch, m.config.vocab_size)
        m.generate_ids([p[:WARMUP_PROMPT_LEN] for p in prompts], SamplingConfig(max_new_tokens=2, stop_at_eos=False))
        runs, ids = [], None
        for _ in range(args.repeat):
            ids = m.generate_ids(prompts, SamplingConfig(max_new_tokens=args.gen_len, stop_at_eos=False))
            times = m.engine.times
            runs.append((times.prefill, times.prefill + sum(times.decode)))
            assert times.shared == (0 if args.no_share or batch == 1 else args.shared_prefix), times.shared
        flags, dtype, kept = m.policy.flags(), str(m.dtype).removeprefix("torch."), m.kept_as_stored
        groups, types = kept_groups(m.policy, model_path(args)), m.source_quantized
    system = "flexgen-lite 4-bit" if compress else "flexgen-lite"
    partly = f"{'/'.join(groups[0])} as stored, {'/'.join(groups[1])} re-rounded to 4 bits" if groups[1] else ""
    return result(args, system, batch, runs, ids, load_s=round(load_s, 2), policy=flags, dtype=dtype,
                  weights=("4-bit as stored" if kept else partly or "its 4-bit (re-rounded)") if compress
                  else f"dequantized to {dtype}", file_types=types)


# ---- the parent ------------------------------------------------------------------------------------------------
def call_worker(args, system: str, batch: int, compress: bool = False) -> dict:
    argv = [sys.executable, __file__, "--worker", system, "--worker-batch", str(batch),
            "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--threads", str(args.threads),
            "--repeat", str(args.repeat), "--seed", str(args.seed), "--n-batch", str(args.n_batch),
            "--n-ubatch", str(args.n_ubatch), "--shared-prefix", str(args.shared_prefix)]
    argv += ["--no-share"] if args.no_share else []
    argv += ["--model", args.model] if args.model else []
    argv += ["--dtype", args.dtype] if args.dtype else []
    argv += ["--worker-compress"] if compress else []
    argv += ["--kv-unified"] if args.kv_unified else []
    argv += ["--no-repack"] if args.no_repack else []
    proc = subprocess.run(argv, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"system": system, "batch": batch, "error": tail[:300]}


def machine() -> dict:
    import platform

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def have_llamacpp() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def report(results: list[dict]) -> str:
    lines = ["| batch | system | weights | prefill s | decode ms/step | decode tok/s | total tok/s | peak RSS GiB "
             "| vs llama.cpp total | same ids as llama.cpp |", "|" + "---|" * 10]
    by_batch: dict[int, dict[str, dict]] = {}
    for r in results:
        by_batch.setdefault(r["batch"], {})[r["system"]] = r
    for batch, runs in sorted(by_batch.items()):
        peer = runs.get("llama.cpp", {})
        for r in runs.values():
            if "error" in r:
                lines.append(f"| {batch} | {r['system']} | error: {r['error']} |" + " |" * 7)
                continue
            ratio = f"{r['total_tok_s'] / peer['total_tok_s']:.2f}x" if peer.get("total_tok_s") else "-"
            lines.append(f"| {batch} | {r['system']} | {r['weights']} | {r['prefill_s']} | {r['decode_step_ms']} "
                         f"| {r['decode_tok_s']} | {r['total_tok_s']} | {r['peak_rss_gib']} | {ratio} "
                         f"| {agreement(r, peer) if r is not peer else '-'} |")
    best = {}
    for r in results:
        if "total_tok_s" in r:
            best[r["system"]] = max(best.get(r["system"], (0, 0)), (r["total_tok_s"], r["batch"]))
    lines.append("")
    lines.append("best of each: " + ", ".join(f"{s} {t} tok/s (batch {b})" for s, (t, b) in best.items()))
    if "llama.cpp" in best:
        for s, (t, _) in best.items():
            if s != "llama.cpp":
                lines.append(f"{s} / llama.cpp, best against best: {t / best['llama.cpp'][0]:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        batch = args.worker_batch
        r = run_llamacpp(args, batch) if args.worker == "llama.cpp" else run_flexgen(args, batch, args.worker_compress)
        print(RESULT + json.dumps(r), flush=True)
        return
    peer = have_llamacpp()
    if not peer:
        print("llama_cpp is not importable (pip install llama-cpp-python); FlexGen-Lite runs alone", file=sys.stderr)
    results = []
    for batch in args.batch:
        runs = [("llama.cpp", False)] * peer + [("flexgen-lite", False)]
        runs += [("flexgen-lite", True)] * args.compress_weight
        for system, compress in runs:
            results.append(r := call_worker(args, system, batch, compress))
            shown = {k: v for k, v in r.items() if k != "ids"}
            print(json.dumps(shown), file=sys.stderr, flush=True)
    print(report(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"setting": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                       "machine": machine(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
