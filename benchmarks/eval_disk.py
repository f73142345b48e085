"""lm-eval `loglikelihood` with the weights on disk, within a host-RAM budget that lm-eval's `hf` model cannot load
the model in (issue 25).

    .venv/bin/python benchmarks/eval_disk.py                       # ~6.5-7.5 min on the 2-core VM, 7 GiB of /tmp
    .venv/bin/python benchmarks/eval_disk.py --layers 2 --docs 8 --budget 1GiB --check-docs 2   # smoke run

1. A random-weight Llama-architecture model (transformers' LlamaConfig, its tensor names and shapes from
   LlamaForCausalLM on the meta device; each tensor drawn and written as safetensors shards one at a time, so
   building it never holds the model in memory; SmolLM2's tokenizer) in a temporary folder under /tmp.
2. A local lm-eval multiple-choice task: `--docs` contexts cut from the repository's docs, four continuations
   each (the true next words and three others, as benchmarks/eval_throughput.py makes them): 4 x docs
   `loglikelihood` requests.
3. FlexGen-Lite's lm-eval model (`flexgen-lite`) runs the task through `lm_eval.simple_evaluate`, all decoder
   weights on the disk tier (`percent=0/0/100/0/100/0`) and `cpu_mem=BUDGET` (the whole process), in a child
   process; its peak RSS (VmHWM, the kernel's high-water mark of that child's resident memory) is checked
   against the budget. Blocks of 8 rows (8 x 1): FlexGen-Lite's lm-eval model checks an explicit policy against
   the budget at construction for a 512 + 32-token generation workload (KV cache included), and at 1.4 GiB that
   check refuses 8 x 2 and larger, though scoring these ~100-token rows would fit.
4. lm-eval's `hf` model, the same task and dtype, in a child process under the same budget enforced by the
   kernel (`--limit-kind`: RLIMIT_DATA, private writable memory, by default; RLIMIT_AS, address space,
   counts mapped files too): it dies while loading (transformers maps each checkpoint shard copy-on-write,
   which is private memory); its error is recorded.
5. Control and checks (`--check-docs` docs, 4 by default): hf under the same limit with a 2-layer model of the
   same width (the limit lets hf run a model that fits); hf with no limit in the run's dtype (its real resident
   peak; log-likelihoods against FlexGen-Lite's run above); both systems in float32 (FlexGen-Lite with the same
   disk placement, no budget): the largest difference of a log-likelihood, greedy flags, best choices.

FlexGen-Lite's budget is its resident memory (what `--cpu-mem` promises), checked against the kernel's high-water
mark. `--limit-ours` also runs it under the kernel limit: RLIMIT_DATA counts private address space, resident or
not, and with glibc told to keep freed memory (the package's keep_freed_memory: no mmap for large blocks, no heap
trimming) the heap's address space can pass the budget while its resident pages stay under it: on this VM one
such run held (peak RSS 1.07 of 1.40 GiB), the next died placing weights at 0.68 GiB resident. The peak VmData
is recorded for every child. Children get ARROW_DEFAULT_MEMORY_POOL=system (see run_child). RLIMIT_AS is no RAM
budget for either system: both map files (hf its checkpoint, FlexGen-Lite its disk tier) far past the limit
without making them resident, and both fail under it. JSON in benchmarks/results/eval_disk.json. The temporary
folder (model, task, offload files) is removed at the end unless `--keep`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "disk_mc"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1.5GiB)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def gib(n: float) -> float:
    return n / 2**30


# ---- the model and the task -----------------------------------------------------------------------------
def build_model(folder: Path, args) -> dict:
    """A random-weight Llama checkpoint in HF format; returns its facts. Tensors are drawn one at a time (std
    initializer_range, norms 1) and written into shards of about --shard-size bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flexgen_lite import default_model_path

    gguf = Path(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype=args.model_dtype)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embedding
    dtype = getattr(torch, args.model_dtype)
    gen = torch.Generator().manual_seed(args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards, shard, size, total = [], {}, 0, 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            shards.append((f"model-{len(shards) + 1:05d}.safetensors", shard))
            save_file(shard, folder / "tmp.safetensors", metadata={"format": "pt"})
            os.replace(folder / "tmp.safetensors", folder / shards[-1][0])
            shards[-1] = (shards[-1][0], list(shard))
            shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * config.initializer_range).to(dtype)
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= args.shard_size:
            flush()
    flush()
    count = len(shards)
    weight_map = {}
    for i, (tmp, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(folder / tmp, folder / final)
        weight_map.update(dict.fromkeys(names, final))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(_numel(s) for s in shapes.values())
    return {"architecture": "LlamaForCausalLM (random weights, tied embedding)", "hidden": args.hidden,
            "intermediate": args.intermediate, "layers": args.layers, "heads": args.heads,
            "kv_heads": args.kv_heads, "vocab": len(tokenizer), "dtype": args.model_dtype, "parameters": params,
            "checkpoint_bytes": total, "shards": count}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_task(folder: Path, docs: int, seed: int) -> int:
    """The local multiple-choice task (4 choices a doc, the true continuation first: label 0)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from eval_throughput import make_requests

    pairs = make_requests(4 * docs, seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": pairs[i][0], "choices": [c.lstrip() for _, c in pairs[i:i + 4]], "label": 0}
            for i in range(0, len(pairs), 4)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=folder / "docs.jsonl"))
    return len(rows)


# ---- the children -----------------------------------------------------------------------------------------
def child(spec: dict) -> None:
    """Run one system over the task; writes spec['result'] (JSON), errors included, then exits non-zero on one."""
    out: dict = {"system": spec["system"]}
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        out["rss_after_imports_bytes"] = rss_now()
        tic = time.perf_counter()
        if spec["system"] == "flexgen-lite":
            from flexgen_lite.eval.lm_eval_model import FlexGenLiteLM

            lm = FlexGenLiteLM(spec["model"], progress=True, **spec["model_args"])
            out["policy"] = lm.model.policy.flags()
        else:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=spec["model"], device="cpu", batch_size=spec["hf_batch"], **spec["model_args"])
        out["load_s"] = time.perf_counter() - tic
        out["rss_after_load_bytes"] = rss_now()
        out["offload_bytes"] = folder_bytes(spec.get("offload_dir"))
        io, faults = proc_io(os.getpid()), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        tic = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=spec["tasks"]),
                                      limit=spec.get("limit"), log_samples=True, bootstrap_iters=0)
        out["evaluate_s"] = time.perf_counter() - tic
        after = proc_io(os.getpid())
        # during the evaluation only: bytes this process had read from the block device (page faults included)
        # and through read calls, and major page faults (a mapped page that was not in the page cache)
        out["evaluate_io"] = {"device_read_bytes": after.get("read_bytes", 0) - io.get("read_bytes", 0),
                              "read_call_bytes": after.get("rchar", 0) - io.get("rchar", 0),
                              "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults}
        out["acc"] = res["results"][TASK].get("acc,none")
        samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
        out["logprobs"] = [[[float(r[0][0]), bool(r[0][1])] for r in s["resps"]] for s in samples]
        if spec["system"] == "flexgen-lite":
            st = lm.model.score_stats
            out["score"] = {"requests": st.rows, "tokens": st.tokens, "tokens_fed": st.fed, "seconds": st.seconds,
                            "blocks": len(st.blocks), "block_seconds": st.blocks,
                            "block_rows": lm.model.policy.block_size}
            lm.model.close()
    except BaseException as e:  # noqa: BLE001 (recorded, then re-raised)
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback_tail"] = traceback.format_exc()[-3000:]
        out["vmhwm_bytes"] = proc_status(os.getpid()).get("VmHWM", 0)
        Path(spec["result"]).write_text(json.dumps(out))
        raise
    out["rss_end_bytes"] = rss_now()
    out["vmhwm_bytes"] = proc_status(os.getpid()).get("VmHWM", 0)
    Path(spec["result"]).write_text(json.dumps(out))


def rss_now() -> int:
    return proc_status(os.getpid()).get("VmRSS", 0)


def proc_status(pid: int) -> dict[str, int]:
    """The byte counts of /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM, ...)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def proc_io(pid: int) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())}
    except OSError:
        return {}


def folder_bytes(folder: str | None) -> int | None:
    if not folder or not Path(folder).exists():
        return None
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def run_child(spec: dict, limit: int | None, kind: str, log: Path, timeout: float) -> dict:
    """One child process, under RLIMIT_<kind> = limit when given: its result JSON, exit status, peak RSS (the
    kernel's high-water mark of its resident memory, VmHWM: read by the child as it ends and polled every 0.1 s;
    not wait4's ru_maxrss, which keeps the forking parent's RSS across exec), the most RssAnon / RssFile seen by
    polling, block-device reads (ru_inblock) and /proc/PID/io at its last poll."""
    result = log.with_suffix(".json")
    spec = {**spec, "result": str(result)}
    result.unlink(missing_ok=True)

    def limit_me() -> None:
        if limit is not None:
            which = getattr(resource, f"RLIMIT_{kind}")
            resource.setrlimit(which, (limit, limit))

    # pyarrow (under lm-eval's `datasets`) otherwise reserves 1 GiB of address space for mimalloc at import:
    # never touched, not resident, but private writable, so RLIMIT_DATA would count it against the budget
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ARROW_DEFAULT_MEMORY_POOL": "system"}
    tic = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=err, stderr=err,
                                preexec_fn=limit_me, env=env, cwd=ROOT)
        peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "VmData": 0}
        io: dict[str, int] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                status = proc_status(proc.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))
                io.update(proc_io(proc.pid))
                stop.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.2)
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    out = json.loads(result.read_text()) if result.exists() else {}
    peak = max(peaks["VmHWM"], out.get("vmhwm_bytes", 0))
    out.update(exit_code=proc.returncode, wall_s=time.perf_counter() - tic, peak_rss_bytes=peak,
               peak_rss_anon_polled_bytes=peaks["RssAnon"], peak_rss_file_polled_bytes=peaks["RssFile"],
               peak_vmdata_polled_bytes=peaks["VmData"],
               block_reads_bytes=usage.ru_inblock * 512, io=io or None, log=str(log))
    if limit is not None:
        out["kernel_limit"] = {"kind": f"RLIMIT_{kind}", "bytes": limit}
    if "error" not in out and proc.returncode != 0:
        out["error"] = f"exit code {proc.returncode} (no result: see {log})"
    if "error" in out:
        out["log_tail"] = log.read_text()[-1500:]
    return out


# ---- the run ---------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the checkpoint's dtype, and the dtype both systems run in")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GiB"))
    p.add_argument("--budget", type=parse_size, default=parse_size("1.4GiB"),
                   help="host RAM of each process, runtime included (FlexGen-Lite's cpu_mem; the kernel limit)")
    p.add_argument("--limit-kind", default="DATA", choices=["DATA", "AS"])
    p.add_argument("--limit-ours", action="store_true",
                   help="run FlexGen-Lite under the kernel limit too (RLIMIT_DATA counts private address space, not "
                        "residence: a stricter test that can fail on the heap's untouched pages, see the docstring)")
    p.add_argument("--docs", type=int, default=250, help="multiple-choice docs: 4 loglikelihood requests each")
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--hf-batch", type=int, default=4, help="lm-eval hf's batch size (small: its logits are "
                   "batch x length x vocab in fp32)")
    p.add_argument("--check-docs", type=int, default=4, help="docs of the float32 check against hf (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a new folder under /tmp, removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the workdir (model, task)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/eval_disk.json"))
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="flexgen-eval-disk-", dir="/tmp"))
    if ROOT in work.resolve().parents:
        p.error("--workdir must be outside the repository")
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(result)


def run(args, work: Path) -> dict:
    import torch

    started = time.strftime("%Y-%m-%d %H:%M %Z")
    tic = time.perf_counter()
    model_dir, task_dir, offload = work / "model", work / "task", work / "offload"
    wanted = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "model_dtype",
                                             "seed")}
    stamp = model_dir / "eval_disk_model.json"
    if stamp.exists() and json.loads(stamp.read_text())["wanted"] == wanted:  # --keep'd from an earlier run
        facts = json.loads(stamp.read_text())["facts"]
    else:
        shutil.rmtree(model_dir, ignore_errors=True)
        facts = build_model(model_dir, args)
        stamp.write_text(json.dumps({"wanted": wanted, "facts": facts}))
    build_s = time.perf_counter() - tic
    docs = write_task(task_dir, args.docs, args.seed)
    print(f"model: {facts['parameters'] / 1e9:.2f} B parameters, {gib(facts['checkpoint_bytes']):.2f} GiB of "
          f"{facts['dtype']} in {model_dir} ({build_s:.0f} s); task: {docs} docs = {4 * docs} requests; budget "
          f"{gib(args.budget):.2f} GiB", file=sys.stderr, flush=True)
    result = {"issue": 25, "date": started, "machine": machine(), "torch": torch.__version__,
              "transformers": _version("transformers"), "lm_eval": _version("lm_eval"), "model": facts,
              "build_s": build_s, "budget_bytes": args.budget, "kernel_limit": f"RLIMIT_{args.limit_kind}",
              "docs": docs, "requests": 4 * docs, "load_average_start": os.getloadavg(), "runs": {}}
    base = {"model": str(model_dir), "tasks": str(task_dir)}
    ours_args = {"percent": "0/0/100/0/100/0", "cpu_mem": str(args.budget), "offload_dir": str(offload),
                 "dtype": args.model_dtype, "gpu_batch_size": args.gpu_batch_size,
                 "num_gpu_batches": args.num_gpu_batches}
    save = make_saver(args.output, result)

    print("flexgen-lite: weights on disk, within the budget ...", file=sys.stderr, flush=True)
    ours = run_child({**base, "system": "flexgen-lite", "model_args": ours_args, "offload_dir": str(offload)},
                     args.budget if args.limit_ours else None, args.limit_kind, work / "ours.log", args.timeout)
    summarize_ours(ours, args.budget)
    result["runs"]["flexgen_lite"] = ours
    save()

    print("lm-eval hf: the same task, the same budget ...", file=sys.stderr, flush=True)
    hf = run_child({**base, "system": "hf", "model_args": {"dtype": args.model_dtype}, "hf_batch": args.hf_batch},
                   args.budget, args.limit_kind, work / "hf_limited.log", args.timeout)
    hf["loaded"] = "load_s" in hf
    result["runs"]["hf_within_budget"] = hf
    save()

    if args.check_docs:
        # the limit itself lets hf run a model that fits: the same architecture with 2 layers, the same task
        small = argparse.Namespace(**{**vars(args), "layers": 2, "seed": args.seed + 1})
        result["control_model"] = build_model(work / "control_model", small)
        print(f"control: lm-eval hf under the same limit with a {gib(result['control_model']['checkpoint_bytes']):.2f}"
              f" GiB model of the same width, {args.check_docs} docs ...", file=sys.stderr, flush=True)
        control = run_child({**base, "model": str(work / "control_model"), "system": "hf", "limit": args.check_docs,
                             "model_args": {"dtype": args.model_dtype}, "hf_batch": args.hf_batch},
                            args.budget, args.limit_kind, work / "hf_control.log", args.timeout)
        result["runs"]["hf_control_small_model_within_budget"] = control
        save()
        print(f"check: hf without a limit, {args.model_dtype} and float32, and FlexGen-Lite in float32 (same disk "
              f"placement, no budget), on {args.check_docs} docs ...", file=sys.stderr, flush=True)
        hf_same = run_child({**base, "system": "hf", "limit": args.check_docs,
                             "model_args": {"dtype": args.model_dtype}, "hf_batch": args.hf_batch}, None,
                            args.limit_kind, work / "hf_unlimited.log", args.timeout)
        result["runs"]["hf_no_limit"] = hf_same
        check_ours = run_child({**base, "system": "flexgen-lite", "limit": args.check_docs,
                                "model_args": {**{k: v for k, v in ours_args.items() if k != "cpu_mem"},
                                               "dtype": "float32"},
                                "offload_dir": str(offload)}, None, args.limit_kind, work / "check_ours.log",
                               args.timeout)
        check_hf = run_child({**base, "system": "hf", "limit": args.check_docs, "model_args": {"dtype": "float32"},
                              "hf_batch": args.hf_batch}, None, args.limit_kind, work / "check_hf.log", args.timeout)
        result["runs"]["check_flexgen_lite_fp32"] = check_ours
        result["runs"]["check_hf_fp32"] = check_hf
        result["check_fp32"] = compare(check_ours, check_hf)
        first = {**ours, "logprobs": (ours.get("logprobs") or [])[:args.check_docs]}
        result[f"check_{args.model_dtype}"] = compare(first, hf_same, acc=False)
    result["load_average_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - tic
    for run_ in result["runs"].values():  # per-request log-likelihoods: the check keeps what it needs
        lps = run_.pop("logprobs", None)
        if lps is not None:
            run_["requests_scored"] = sum(len(d) for d in lps)
    save()
    return result


def make_saver(output: str, result: dict):
    def save() -> None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        slim = {**result, "runs": {k: {kk: vv for kk, vv in v.items() if kk != "logprobs"}
                                   for k, v in result["runs"].items()}}
        Path(output).write_text(json.dumps(slim, indent=1) + "\n")
    return save


def summarize_ours(ours: dict, budget: int) -> None:
    score = ours.get("score")
    if not score:
        return
    ours["requests_per_s"] = score["requests"] / score["seconds"]
    ours["tokens_per_s"] = score["tokens"] / score["seconds"]
    ours["tokens_fed_per_s"] = score["tokens_fed"] / score["seconds"]
    ours["within_budget"] = ours["peak_rss_bytes"] <= budget
    if ours.get("offload_bytes"):
        # each block runs every layer once, so the disk tier's files are read (mapped pages faulted in) once a
        # block: from the page cache where it still holds them; evaluate_io.device_read_bytes is what actually
        # came from the device during the evaluation
        ours["disk_tier_bytes_through_blocks"] = ours["offload_bytes"] * score["blocks"]
        ours["disk_tier_bytes_per_request"] = ours["disk_tier_bytes_through_blocks"] / score["requests"]
        ours["end_to_end_requests_per_s"] = score["requests"] / (ours["load_s"] + ours["evaluate_s"])


def compare(ours: dict, hf: dict, acc: bool = True) -> dict:
    a, b = ours.get("logprobs"), hf.get("logprobs")
    if not a or not b:
        return {"error": "a check run failed", "ours": ours.get("error"), "hf": hf.get("error")}
    pairs = [(x, y) for da, db in zip(a, b, strict=True) for x, y in zip(da, db, strict=True)]
    diffs = [abs(x[0] - y[0]) for x, y in pairs]
    rel = [abs(x[0] - y[0]) / max(abs(y[0]), 1e-9) for x, y in pairs]
    return {"requests": len(pairs), "max_abs_logprob_difference": max(diffs), "max_rel_logprob_difference": max(rel),
            "greedy_flags_equal": sum(x[1] == y[1] for x, y in pairs),
            "same_best_choice": sum(max(range(len(da)), key=lambda j: da[j][0]) == max(range(len(db)),
                                    key=lambda j: db[j][0]) for da, db in zip(a, b, strict=True)),
            "docs": len(a), **({"same_acc": ours.get("acc") == hf.get("acc")} if acc else {}), "example": pairs[0]}


def machine() -> str:
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{name}, {os.cpu_count()} cores, {gib(mem):.1f} GiB RAM"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def print_table(result: dict) -> None:
    budget = result["budget_bytes"]
    m = result["model"]
    print(f"\n{m['parameters'] / 1e9:.2f} B-parameter Llama, {gib(m['checkpoint_bytes']):.2f} GiB of {m['dtype']}; "
          f"budget {gib(budget):.2f} GiB per process ({result['kernel_limit']} in the kernel); "
          f"{result['requests']} loglikelihood requests")
    print("| run | outcome | load s | evaluate s | requests/s | tokens/s | peak RSS GiB (budget) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["runs"].items():
        outcome = "ok" if "error" not in r else r["error"].splitlines()[0][:90]
        lim = f"{gib(r['kernel_limit']['bytes']):.2f}" if r.get("kernel_limit") else "none"
        print(f"| {name} | {outcome} | {_f(r.get('load_s'))} | {_f(r.get('evaluate_s'))} | "
              f"{_f(r.get('requests_per_s'), 2)} | {_f(r.get('tokens_per_s'))} | "
              f"{gib(r['peak_rss_bytes']):.2f} ({lim}) |")
    ours = result["runs"].get("flexgen_lite", {})
    if ours.get("score"):
        s = ours["score"]
        print(f"flexgen-lite: {s['requests']} requests, {s['tokens']} tokens ({s['tokens_fed']} fed) in "
              f"{s['blocks']} blocks of {s['block_rows']} rows, {s['seconds']:.1f} s scoring; disk tier "
              f"{gib(ours.get('offload_bytes') or 0):.2f} GiB, "
              f"{(ours.get('disk_tier_bytes_per_request') or 0) / 2**20:.1f} MiB through the blocks per request "
              f"({(ours.get('evaluate_io') or {}).get('device_read_bytes', 0) / 2**20:.0f} MiB from the device in "
              f"all); end to end (load + lm-eval) {_f(ours.get('end_to_end_requests_per_s'), 2)} requests/s; "
              f"within budget: {ours.get('within_budget')}")
    for key in [k for k in result if k.startswith("check_")]:
        print(f"{key}: {json.dumps(result[key])}")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    main()
