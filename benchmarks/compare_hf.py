"""FlexGen-Lite against transformers' `generate` on one workload, in one run.

Both systems load the same checkpoint directory (random weights of a preset's shape, saved once with
`save_pretrained` as safetensors under --workdir), in the same dtype, with the same random prompts
(fixed seed), greedy, generating exactly --gen-len tokens per prompt. FlexGen-Lite so exercises its
checkpoint loader. Each system runs in its own subprocess (this script re-invoked with --worker), so
peak RSS is per system; the parent never imports torch.

Timing, per batch size:
- transformers: one warm-up `generate` (all rows, 8-token prompts, 2 new tokens); then prefill = one
  timed forward over the prompts with use_cache=True and logits_to_keep=1 (what `generate` computes
  for its first token); then a timed `generate(max_new_tokens=gen, min_new_tokens=gen,
  do_sample=False, eos_token_id=None)`; decode ms/step = (generate s - prefill s) / (gen - 1).
- FlexGen-Lite: one FlexGenLite per batch size (its policy), one warm-up `generate_ids` (same
  warm-up), then the timed `generate_ids`; prefill = engine.times.prefill, decode = sum(engine.times.decode).
- --repeat N times the timed part N times in the same process and shows the run with the median total.
- total tok/s = batch * gen / (prefill + decode); decode tok/s = batch * (gen - 1) / decode.
- peak RSS = VmHWM of the worker process (ru_maxrss where /proc is missing), GiB.
- agreement: rows whose generated ids are identical (and rows whose first generated token is);
  bf16 runs may diverge after a near-tie, which is reported, not an error.

Weights on disk (e.g. `--percent 0 0 100 0 100 0`): transformers runs with accelerate's disk offload,
`from_pretrained(dir, device_map="auto", max_memory={"cpu": --hf-cpu-memory}, offload_folder=...)`,
which needs `accelerate` (`pip install accelerate`; without it the peer is skipped). Such rows also
show the weights moved per decode step and the bound they imply at --disk-gb-s (see
../shared/ANCHORS.md beside the checkout: decode tok/s <= batch / (GB moved per step / disk GB/s)).
Freshly written files are usually served from the page cache, so that bound is only a reference there.

--cold-disk reads from the disk itself, for both systems: FlexGen-Lite drops each offload extent from
the page cache after use (bench's --cold-disk); transformers gets a forward pre-hook that drops the
checkpoint's and accelerate's offload files (posix_fadvise DONTNEED) before every forward pass.

The checkpoint is written tensor by tensor into 2 GB safetensors shards (never the whole model in
memory), so a model larger than RAM can be prepared: e.g. OPT-6.7B in float32 is 26.8 GB.

Memory allocator: FlexGen-Lite keeps freed memory (mallopt) itself. transformers runs with glibc's
defaults unless --hf-malloc-tuned, which sets MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12 in its
worker (ANCHORS: this VM's slow page faults make that 2x on large-batch decode); without the flag
those variables are removed from its environment.

    .venv/bin/python benchmarks/compare_hf.py --model facebook/opt-125m --prompt-len 32 --gen-len 8 --batch 4
    .venv/bin/python benchmarks/compare_hf.py --model facebook/opt-1.3b --prompt-len 128 --gen-len 8 --batch 8 \\
        --percent 0 0 100 0 100 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
GB = 1e9
RESULT = "RESULT "
MALLOC_TUNING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
WARMUP_PROMPT_LEN = 8


# ---- arguments -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="facebook/opt-125m",
                   help="a preset's name (facebook/opt-1.3b, mixtral-8x7b) or a config.json of a supported family")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[4], help="batch sizes, one run each")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0],
                   metavar=("W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"),
                   help="FlexGen-Lite placement (default all on the compute tier)")
    p.add_argument("--gpu-batch-size", type=int, help="FlexGen-Lite GPU batch (default: batch / num-gpu-batches)")
    p.add_argument("--num-gpu-batches", type=int, help="FlexGen-Lite GPU batches per block (default 1)")
    p.add_argument("--offload-dir", default="", help="disk tier of FlexGen-Lite, offload folder of accelerate")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flexgen_lite_compare"),
                   help="where the random checkpoint is saved once and reused (default: %(default)s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present)")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed runs per system and batch (after the warm-up); the median by total time is shown")
    p.add_argument("--skip-hf", action="store_true", help="run FlexGen-Lite only")
    p.add_argument("--skip-flexgen", action="store_true", help="run transformers only")
    p.add_argument("--hf-malloc-tuned", action="store_true",
                   help="run transformers with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12")
    p.add_argument("--hf-cpu-memory", default="1GiB",
                   help="accelerate max_memory for the cpu when weights are on disk (default %(default)s)")
    p.add_argument("--disk-gb-s", type=float,
                   help="disk read GB/s for the bound of disk rows (default: measured here, a cold O_DIRECT read "
                   "of up to 2 GB of the checkpoint)")
    p.add_argument("--timeout", type=float, help="seconds per worker before it is killed")
    p.add_argument("--cold-disk", action="store_true",
                   help="both systems read disk-homed weights from the disk, not the page cache")
    p.add_argument("--cpu-mem", help="FlexGen-Lite's host memory budget (e.g. 4GiB) for its whole process, as the "
                   "CLI's --cpu-mem: the runtime (Python, torch, transformers) is taken off before planning")
    p.add_argument("--compress-weight", action="store_true", help="FlexGen-Lite keeps weights 4-bit")
    p.add_argument("--json-out", help="also write all results to this JSON file")
    p.add_argument("--worker", choices=("prepare", "hf", "flexgen"), help=argparse.SUPPRESS)
    return p


def block_shape(args, batch: int) -> tuple[int, int]:
    """(gpu_batch_size, num_gpu_batches) for FlexGen-Lite; their product must be the batch."""
    gbs, nb = args.gpu_batch_size, args.num_gpu_batches
    if gbs and not nb:
        nb = batch // gbs
    elif nb and not gbs:
        gbs = batch // nb
    elif not gbs:
        gbs, nb = batch, 1
    if gbs * nb != batch or gbs < 1:
        raise SystemExit(f"error: batch {batch} is not gpu-batch-size x num-gpu-batches ({gbs} x {nb})")
    return gbs, nb


def weights_on_disk(args) -> bool:
    return args.percent[0] + args.percent[1] < 100


def checkpoint_dir(args) -> Path:
    key = args.model.lower().rsplit("/", 1)[-1].removesuffix(".json")
    return Path(args.workdir) / f"{key}-{args.dtype}-seed{args.seed}"


def worker_argv(args, kind: str, batch: int | None = None) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", args.model,
            "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--dtype", args.dtype,
            "--percent", *(f"{x:g}" for x in args.percent), "--workdir", args.workdir, "--seed", str(args.seed),
            "--hf-cpu-memory", args.hf_cpu_memory, "--repeat", str(args.repeat)]
    argv += [flag for flag, on in (("--cold-disk", args.cold_disk), ("--compress-weight", args.compress_weight)) if on]
    if batch is not None:
        gbs, nb = block_shape(args, batch)
        argv += ["--batch", str(batch), "--gpu-batch-size", str(gbs), "--num-gpu-batches", str(nb)]
    for flag, value in (("--offload-dir", args.offload_dir), ("--device", args.device),
                        ("--threads", args.threads), ("--cpu-mem", args.cpu_mem)):
        if value:
            argv += [flag, str(value)]
    return argv


# ---- workers (each in its own process) ------------------------------------------------------------
def rss_now_gib() -> dict:
    """Current anonymous and file-backed (e.g. memory-mapped checkpoint) resident memory, GiB."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    out[f"{line.split(':')[0].lower()}_end_gib"] = round(int(line.split()[1]) * 1024 / GIB, 3)
    except OSError:
        pass
    return out


def peak_rss_gib() -> float:
    """Peak resident memory of this process: VmHWM (ru_maxrss can include the parent's peak after exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def setup_torch(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch, torch.device(device)


def hf_config(model: str):
    """A transformers config with the shape of a flexgen_lite preset (any family), or read from a config.json
    (a shape of a supported family, e.g. a small mixture of experts)."""
    from transformers import AutoConfig

    from flexgen_lite.models.presets import _hf_dict, find_preset

    if model.endswith(".json"):
        fields = json.loads(Path(model).read_text())
    else:
        cfg = find_preset(model)
        if cfg is None:
            raise SystemExit(f"error: {model!r} is neither a preset of flexgen_lite nor a config.json")
        fields = _hf_dict(model.lower().rsplit("/", 1)[-1].removesuffix("-hf"))
    fields = {k: v for k, v in fields.items() if v is not None}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def prepare(args) -> dict:
    """Save random weights of the preset's shape once (reused while the directory is complete), tensor by
    tensor into 2 GB shards: only one shard is ever in memory."""
    path = checkpoint_dir(args)
    done = path / "COMPLETE"
    if done.exists():
        return {"checkpoint": str(path), "created": False}
    torch, _ = setup_torch(args)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tic = time.perf_counter()
    config = hf_config(args.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    gen = torch.Generator().manual_seed(args.seed)
    shards, shard, size, index = [], {}, 0, {}
    # as a checkpoint stores them (transformers keeps a MoE's experts as one tensor in memory)
    for name, p in revert_weight_conversion(model, model.state_dict()).items():
        if name in tied:
            continue
        if "norm" in name and name.endswith("weight"):
            t = torch.ones(p.shape)
        elif p.dim() == 1 or "embed" in name:
            t = torch.randn(p.shape, generator=gen) * 0.02
        else:  # larger than HF's init (0.02), so that greedy output does not repeat one token forever
            t = torch.randn(p.shape, generator=gen) * (2 / p.shape[-1] ** 0.5)
        shard[name] = t.to(p.dtype)
        size += shard[name].numel() * shard[name].element_size()
        if size >= 2 * GB:
            shards.append(_save_shard(save_file, path, shard, len(shards), index))
            shard, size = {}, 0
    if shard:
        shards.append(_save_shard(save_file, path, shard, len(shards), index))
    total = sum(os.path.getsize(path / f) for f in shards)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": index}))
    config.save_pretrained(str(path))
    done.write_text("")
    return {"checkpoint": str(path), "created": True, "seconds": round(time.perf_counter() - tic, 1),
            "gb": round(total / GB, 2)}


def _save_shard(save_file, path: Path, shard: dict, i: int, index: dict) -> str:
    name = f"model-{i:05d}.safetensors"
    save_file(shard, str(path / name), metadata={"format": "pt"})
    index.update(dict.fromkeys(shard, name))
    return name


def measure_disk_gb_s(path: Path, limit: int = 2 * 10**9) -> float:
    """Sequential cold read rate of the checkpoint's files: O_DIRECT in 64 MiB reads (buffered after dropping
    the pages where O_DIRECT is refused)."""
    import mmap

    drop_from_page_cache([str(path)])
    buf, done = mmap.mmap(-1, 64 << 20), 0
    tic = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(f, os.O_RDONLY)
        try:
            offset, size = 0, os.path.getsize(f) // 4096 * 4096
            while offset < size and done < limit:
                n = os.preadv(fd, [memoryview(buf)[:min(64 << 20, size - offset)]], offset)
                offset, done = offset + n, done + n
        finally:
            os.close(fd)
        if done >= limit:
            break
    return done / (time.perf_counter() - tic) / GB


def drop_from_page_cache(paths: list[str]) -> None:
    """posix_fadvise(DONTNEED) every file under `paths`: the next reads come from the disk."""
    for root in paths:
        for directory, _, files in os.walk(root):
            for f in files:
                try:
                    fd = os.open(os.path.join(directory, f), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def make_prompts(args, batch: int, vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()


def base_result(args, system: str, torch) -> dict:
    return {"system": system, "model": args.model, "dtype": args.dtype, "batch": args.batch[0],
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "threads": torch.get_num_threads()}


def throughput(r: dict, prefill_s: float, decode_s: float) -> dict:
    n, gen = r["batch"], r["gen_len"]
    steps = gen - 1
    r.update(prefill_s=round(prefill_s, 3), decode_s=round(decode_s, 3),
             decode_step_ms=round(1000 * decode_s / steps, 1) if steps else None,
             decode_tok_s=round(n * steps / decode_s, 2) if steps and decode_s > 0 else None,
             total_tok_s=round(n * gen / (prefill_s + decode_s), 2))
    return r


def median_run(r: dict, runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (prefill s, total s) of the run with the median total; all totals go into r when repeated."""
    if len(runs) > 1:
        r["repeat_total_s"] = [round(t, 3) for _, t in runs]
    return sorted(runs, key=lambda x: x[1])[(len(runs) - 1) // 2]


def run_hf(args) -> dict:
    torch, device = setup_torch(args)
    from transformers import AutoModelForCausalLM

    path = checkpoint_dir(args)
    dtype = getattr(torch, args.dtype)
    r = base_result(args, "transformers", torch)
    r["malloc_tuned"] = all(os.environ.get(k) == v for k, v in MALLOC_TUNING.items())
    offload = None
    tic = time.perf_counter()
    if weights_on_disk(args):
        try:
            import accelerate  # noqa: F401
        except ImportError:
            return {**r, "skipped": "the disk-offload peer needs accelerate (pip install accelerate)"}
        offload = tempfile.mkdtemp(prefix="hf_offload_", dir=args.offload_dir or None)
        max_memory = {"cpu": args.hf_cpu_memory}
        if device.type == "cuda":
            max_memory[device.index or 0] = args.hf_cpu_memory
        shown = f"accelerate disk offload, max_memory={max_memory}"
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="auto",
                                                     max_memory=max_memory, offload_folder=offload)
        on_disk = [name for name, where in model.hf_device_map.items() if where == "disk"]
        disk_bytes = sum(p.numel() * p.element_size() for name in on_disk
                         for p in (model.get_submodule(name).parameters() if name else model.parameters()))
        total = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        r["placement"] = f"{shown}: {disk_bytes / GB:.2f} of {total / GB:.2f} GB of weights on disk"
        r["weights_moved_per_step_gb"] = round(disk_bytes / GB, 3)
        device = torch.device("cpu") if model.device.type == "meta" else model.device  # inputs go here
        if args.cold_disk:
            model.register_forward_pre_hook(lambda *_: drop_from_page_cache([str(path), offload]))
            r["placement"] += "; page cache dropped before every forward"
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        r["placement"] = f"all on {device.type}"
    model.eval()
    if device.type == "cpu" and dtype != torch.float32:
        contiguous_linear_inputs(model, torch)
        r["placement"] += "; Linear inputs made contiguous (torch's CPU bf16/fp16 slow path)"
    r["load_s"] = round(time.perf_counter() - tic, 2)
    cfg = model.config
    ids = torch.tensor(make_prompts(args, args.batch[0], cfg.vocab_size), device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with torch.inference_mode():
            w = min(WARMUP_PROMPT_LEN, args.prompt_len)
            model.generate(ids[:, :w], attention_mask=mask[:, :w], max_new_tokens=2, min_new_tokens=2, **kw)
            runs = []
            for _ in range(args.repeat):
                sync()
                tic = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                sync()
                prefill_s = time.perf_counter() - tic
                tic = time.perf_counter()
                out = model.generate(ids, attention_mask=mask, max_new_tokens=args.gen_len,
                                     min_new_tokens=args.gen_len, **kw)
                sync()
                runs.append((prefill_s, time.perf_counter() - tic))
    finally:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
    prefill_s, total_s = median_run(r, runs)
    r = throughput(r, prefill_s, total_s - prefill_s)
    r["generate_s"] = round(total_s, 3)
    r["peak_rss_gib"] = round(peak_rss_gib(), 3)
    r.update(rss_now_gib())
    r["ids"] = out[:, args.prompt_len:].tolist()
    return r


def contiguous_linear_inputs(model, torch) -> None:
    """torch's CPU `Linear` on a non-contiguous 3-D bf16/fp16 input goes through bmm with the weight expanded per
    sequence and copied (60x slower for a 5120x5120 weight at batch 64); OPT's attention hands it such inputs.
    A pre-hook per Linear gives the peer contiguous inputs, so it is measured at its fair speed."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))


def run_flexgen(args) -> dict:
    torch, device = setup_torch(args)
    from flexgen_lite import FlexGenLite, Policy, SamplingConfig, Workload
    from flexgen_lite.cli.bench import _report, drop_offload_pages
    from flexgen_lite.cli.options import budgets_from_args
    from flexgen_lite.engine.storage import DiskFile
    from flexgen_lite.system.memory import parse_size

    w_g, w_c, c_g, c_c, a_g, a_c = args.percent
    policy = Policy(gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
                    weight_gpu_percent=w_g, weight_cpu_percent=w_c, cache_gpu_percent=c_g, cache_cpu_percent=c_c,
                    act_gpu_percent=a_g, act_cpu_percent=a_c, offload_dir=args.offload_dir, dtype=args.dtype,
                    compress_weight=args.compress_weight)
    r = base_result(args, "flexgen-lite", torch)
    r["placement"] = policy.flags() + (f" --cpu-mem {args.cpu_mem}" if args.cpu_mem else "")
    if args.cold_disk:
        DiskFile.page_cache = False
        r["placement"] += " --cold-disk"
    budgets = budgets_from_args(argparse.Namespace(gpu_mem=None, cpu_mem=parse_size(args.cpu_mem), disk_mem=None)) \
        if args.cpu_mem else None
    tic = time.perf_counter()
    workload = Workload(args.prompt_len, args.gen_len, args.batch[0])
    with FlexGenLite(str(checkpoint_dir(args)), policy=policy, device=str(device), budgets=budgets,
                     workload=workload) as m:
        load_s = time.perf_counter() - tic
        if args.cold_disk:
            drop_offload_pages(m)
        prompts = make_prompts(args, args.batch[0], m.config.vocab_size)
        w = min(WARMUP_PROMPT_LEN, args.prompt_len)
        m.generate_ids([p[:w] for p in prompts], SamplingConfig(max_new_tokens=2, stop_at_eos=False))
        runs = []
        for _ in range(args.repeat):
            ids = m.generate_ids(prompts, SamplingConfig(max_new_tokens=args.gen_len, stop_at_eos=False))
            runs.append((m.engine.times.prefill, m.engine.times.prefill + sum(m.engine.times.decode)))
        prefill_s, total_s = median_run(r, runs)
        report = _report(m, policy, args.prompt_len, args.gen_len, prefill_s, total_s - prefill_s, load_s)
        r.update(rss_now_gib())
    r = throughput(r, prefill_s, total_s - prefill_s)
    r["load_s"] = round(load_s, 2)
    r["weights_moved_per_step_gb"] = report["weights_moved_per_step_gb"]
    if "weight_gb_s" in report:
        r["weight_gb_s"] = report["weight_gb_s"]
    r["peak_rss_gib"] = round(peak_rss_gib(), 3)
    r["ids"] = ids
    return r


def worker_main(args) -> None:
    fn = {"prepare": prepare, "hf": run_hf, "flexgen": run_flexgen}[args.worker]
    print(RESULT + json.dumps(fn(args)), flush=True)


# ---- the parent: run workers, compare, report ---------------------------------------------------------
def call_worker(args, kind: str, batch: int | None = None) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)  # flexgen_lite from this checkout
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if kind == "hf":
        for k, v in MALLOC_TUNING.items():
            if args.hf_malloc_tuned:
                env[k] = v
            else:
                env.pop(k, None)
    label = f"{kind}" + (f" batch {batch}" if batch else "")
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(worker_argv(args, kind, batch), env=env, stdout=subprocess.PIPE, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{label}: timed out after {args.timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        return {"error": f"{label}: worker exited with {proc.returncode}"}
    return json.loads(lines[-1][len(RESULT):])


def agreement(a: dict, b: dict) -> str:
    if "ids" not in a or "ids" not in b:
        return "-"
    same = sum(x == y for x, y in zip(a["ids"], b["ids"], strict=True))
    first = sum(x[:1] == y[:1] for x, y in zip(a["ids"], b["ids"], strict=True))
    return f"{same}/{len(a['ids'])} rows identical, {first}/{len(a['ids'])} first tokens"


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def bound(args, r: dict) -> tuple[str, str]:
    """(bound decode tok/s from disk reads, measured fraction of it) for rows that read weights from disk."""
    moved = r.get("weights_moved_per_step_gb") or 0
    if not moved or not r.get("decode_tok_s"):
        return "-", "-"
    limit = r["batch"] * args.disk_gb_s / moved
    return f"{limit:.2f}", f"{r['decode_tok_s'] / limit:.0%}"


def report(args, results: list[dict]) -> str:
    out = ["| system | model | dtype | batch | prompt | gen | prefill s | decode ms/step | decode tok/s | "
           "total tok/s | peak RSS GiB | weights GB moved/step | bound decode tok/s | of bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        b, frac = bound(args, r)
        out.append(
            f"| {r['system']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['prompt_len']} | {r['gen_len']} | "
            f"{fmt(r['prefill_s'], '.3f')} | {fmt(r['decode_step_ms'], '.1f')} | {fmt(r['decode_tok_s'], '.2f')} | "
            f"{r['total_tok_s']:.2f} | {r['peak_rss_gib']:.2f} | {fmt(r.get('weights_moved_per_step_gb'))} | "
            f"{b} | {frac} |")
    notes = [f"- {r['error']}" for r in results if "error" in r]
    notes += [f"- transformers batch {r['batch']}: skipped, {r['skipped']}" for r in results if "skipped" in r]
    by = {(r["system"], r["batch"]): r for r in results if "error" not in r and "skipped" not in r}
    ratio_rows = []
    for n in args.batch:
        f, h = by.get(("flexgen-lite", n)), by.get(("transformers", n))
        if f and h:
            d = f"{f['decode_tok_s'] / h['decode_tok_s']:.2f}x" if f["decode_tok_s"] and h["decode_tok_s"] else "-"
            ratio_rows.append(f"| {n} | {d} | {f['total_tok_s'] / h['total_tok_s']:.2f}x | {agreement(f, h)} |")
    if ratio_rows:
        out += ["", "| batch | FlexGen-Lite / transformers decode tok/s | total tok/s | greedy outputs agree |",
                "|---|---|---|---|", *ratio_rows]
    out.append("")
    bests = {}
    for system in ("flexgen-lite", "transformers"):
        rows = [r for (s, _), r in by.items() if s == system]
        if rows:
            best = max(rows, key=lambda r: r["total_tok_s"])
            bests[system] = best
            out.append(f"best total tok/s, {system}: {best['total_tok_s']:.2f} at batch {best['batch']}")
    if len(bests) == 2:
        out.append(f"ratio of the bests (FlexGen-Lite / transformers): "
                   f"{bests['flexgen-lite']['total_tok_s'] / bests['transformers']['total_tok_s']:.2f}x")
    placements = {(r["system"], r.get("placement")) for r in by.values()}
    out.append("\n" + "\n".join(f"- {s}: {p}" for s, p in sorted(placements, key=str)))
    if any(r["system"] == "transformers" for r in by.values()):
        malloc = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12" if args.hf_malloc_tuned else "glibc defaults"
        out.append(f"- transformers malloc: {malloc}; FlexGen-Lite keeps freed memory itself (mallopt)")
    threads = {r["threads"] for r in by.values()}
    how = "measured here, cold" if args.disk_measured else "given"
    out.append(f"- threads: {', '.join(map(str, sorted(threads)))}; disk bound at {args.disk_gb_s} GB/s ({how})"
               + ("; --cold-disk: every step read from the disk" if args.cold_disk else "; page cache warm"))
    return "\n".join(out + notes)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if args.gen_len < 2:
        raise SystemExit("error: --gen-len must be at least 2 (decode is timed from the second token on)")
    for n in args.batch:
        block_shape(args, n)
    prep = call_worker(args, "prepare")
    if "error" in prep:
        raise SystemExit(f"error: could not save the checkpoint ({prep['error']})")
    if prep["created"]:
        print(f"saved random weights to {prep['checkpoint']} in {prep['seconds']} s", file=sys.stderr)
    args.disk_measured = args.disk_gb_s is None
    if args.disk_gb_s is None:
        args.disk_gb_s = round(measure_disk_gb_s(Path(prep["checkpoint"])), 2)
        print(f"disk read, cold, O_DIRECT: {args.disk_gb_s} GB/s", file=sys.stderr)
    results = []
    for n in args.batch:
        if not args.skip_flexgen:
            results.append(call_worker(args, "flexgen", n))
        if not args.skip_hf:
            results.append(call_worker(args, "hf", n))
    print(f"\n{args.model}, checkpoint {prep['checkpoint']}\n")
    print(report(args, results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
