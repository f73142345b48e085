"""FlexGen's throughput benchmark: one block of random prompts, prefill and decode timed separately, after an
untimed warm-up of the same block shape (as FlexGen's benchmark: kernels loaded, allocator pools filled)."""

from __future__ import annotations

import os
import time

import torch

from ..engine import decode_graph, layer_graph
from ..engine.policy import Policy
from ..engine.storage import DiskFile
from ..engine.trace import NULL
from ..engine.weights import weight_bytes
from ..generation import FlexGenLite
from ..kernels.sampling import SamplingConfig
from ..system.memory import peak_rss

GB = 1e9
WARMUP_STEPS = 2  # the prefill and one decode step: what the timed run's later steps do is then loaded


def run_benchmark(model: str, prompt_len: int, gen_len: int, policy: Policy, device: str | None = None,
                  progress=None, cold_disk: bool = False, trace=None, warmup: bool = True,
                  shared_prefix: int = 0) -> dict:
    """Generate gen_len tokens for gpu_batch_size x num_gpu_batches prompts of prompt_len random tokens.

    cold_disk: offload files are read from the disk itself, not from the page cache. trace: a trace.Recorder
    for the engine's spans (--breakdown, --trace). warmup: first the same block for WARMUP_STEPS steps, timed
    on its own ("warmup_s") and left out of everything else. shared_prefix: the prompts' first tokens, the same
    in all (an instruction before each item); the policy's share_prefix says whether the prefill shares them."""
    if not 0 <= shared_prefix < prompt_len:
        raise ValueError(f"a shared prefix of {shared_prefix} tokens must be shorter than the prompts ({prompt_len})")
    tic = time.perf_counter()
    DiskFile.page_cache = not cold_disk
    with FlexGenLite(model, policy=policy, device=device, progress=progress, trace=trace) as m:
        load_s = time.perf_counter() - tic
        n = policy.block_size
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, m.config.vocab_size, (n, prompt_len), generator=gen)
        prompts[:, :shared_prefix] = prompts[0, :shared_prefix]
        prompts = prompts.tolist()
        sampling = SamplingConfig(max_new_tokens=gen_len, stop_at_eos=False)
        warmup_s = warm_up(m, prompts, sampling) if warmup else None
        if cold_disk:  # after the warm-up, which read them into the page cache
            drop_offload_pages(m)
        m.generate_ids(prompts, sampling)
        times = m.engine.times
        report = _report(m, policy, prompt_len, gen_len, times.prefill, sum(times.decode), load_s)
        report["warmup_s"] = None if warmup_s is None else round(warmup_s, 3)
        report["shared_prefix"], report["prefill_shared"] = shared_prefix, times.shared
        report["prefill_attention_backend"] = _kernels(times.attention[:1])
        report["attention_backend"] = _kernels(times.attention[1:] or times.attention[:1])
        report["graph_captures"] = {"steps": m.engine.static.captures, "layers": m.engine.layer_graphs.captures}
        report["graph_failures"] = [*decode_graph.failures(), *layer_graph.failures()]
        return report


def warm_up(m: FlexGenLite, prompts: list[list[int]], sampling: SamplingConfig) -> float:
    """The timed run's block (same engine, same cache: made for the full gen_len) for WARMUP_STEPS steps, not
    traced; its seconds. CUDA's peak memory statistics start again after it."""
    def stop(block) -> None:
        if block.generated >= WARMUP_STEPS:
            block.finished[:] = True

    m._check_prompts(prompts, [sampling.max_new_tokens] * len(prompts))
    tic = time.perf_counter()
    with m.engine.tracing(NULL):
        m._run_block(prompts, sampling, label="warm-up", report=stop)
    m.device.synchronize()
    if m.device.is_cuda:
        torch.cuda.reset_peak_memory_stats(m.device.device)
    return time.perf_counter() - tic


def _kernels(per_step: list[str]) -> str | None:
    """The attention kernels that ran over some steps ("flash", "efficient+flash"), or None."""
    names = dict.fromkeys(name for step in per_step for name in step.split("+") if name)
    return "+".join(sorted(names)) or None


def drop_offload_pages(m: FlexGenLite) -> None:
    """Write the offload files out and drop them from the page cache: the next reads come from the disk."""
    os.sync()
    for f in list(m.disk.files):
        os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _report(m: FlexGenLite, policy: Policy, prompt_len: int, gen_len: int, prefill_s: float, decode_s: float,
            load_s: float) -> dict:
    n, cfg, itemsize = policy.block_size, m.config, m.dtype.itemsize
    weights = m.engine.weights
    off_device = weight_bytes(weights, "cpu") + weight_bytes(weights, "disk")
    if not m.device.host_is_separate:  # host RAM is the compute memory: only disk weights move
        off_device = weight_bytes(weights, "disk")
    steps = gen_len - 1
    peak = m.memory_report()["peak"]
    cache_moved = _cache_bytes_read_per_step(m, prompt_len + gen_len / 2)
    report = {
        "model": cfg.name, "device": str(m.device.device), "dtype": str(m.dtype).replace("torch.", ""),
        "policy": policy.flags(), "prompt_len": prompt_len, "gen_len": gen_len, "batch": n,
        "load_s": round(load_s, 2),
        "prefill_s": round(prefill_s, 3),
        "decode_s": round(decode_s, 3),
        "prefill_tok_s": round(n * prompt_len / prefill_s, 1),
        "decode_tok_s": round(n * steps / decode_s, 2) if steps else None,
        "total_tok_s": round(n * gen_len / (prefill_s + decode_s), 2),
        "decode_step_ms": round(1000 * decode_s / steps, 1) if steps else None,
        "model_gb": round(cfg.num_params() * itemsize / GB, 3),
        "cache_gb": round(n * cfg.cached_length(prompt_len + gen_len) * cfg.kv_bytes_per_token(itemsize)
                          / cfg.num_layers / GB, 3),
        "hidden_gb": round(n * prompt_len * cfg.hidden_size * itemsize / GB, 3),
        "weights_moved_per_step_gb": round(off_device / GB, 3),
        "cache_moved_per_step_gb": round(cache_moved / GB, 3),
        "peak_gpu_gb": round(peak["gpu"] / GB, 3), "peak_cpu_gb": round(peak["cpu"] / GB, 3),
        "peak_disk_gb": round(peak["disk"] / GB, 3),
        "peak_rss_gb": round(peak_rss() / GB, 3),
    }
    link, disk = _link_and_disk_bytes_per_step(m, prompt_len + gen_len / 2)
    report["link_moved_per_step_gb"], report["disk_read_per_step_gb"] = round(link / GB, 3), round(disk / GB, 3)
    if m.device.is_cuda:
        report["peak_cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated(m.device.device) / GB, 3)
        report["peak_cuda_reserved_gb"] = round(torch.cuda.max_memory_reserved(m.device.device) / GB, 3)
        report["cuda_runtime_gb"] = round(m.device.runtime_bytes() / GB, 3)  # the context: --gpu-mem covers it
    if steps and off_device:
        report["weight_gb_s"] = round(off_device * steps / decode_s / GB, 2)
    return report


def _cache_bytes_read_per_step(m: FlexGenLite, mean_len: float) -> float:
    """Bytes of KV cache loaded per decode step: parts read from disk, or copied to the compute device."""
    cache = m.engine.cache
    total = 0.0
    for per_batch in cache.parts:
        for b, parts in enumerate(per_batch):
            for i, p in enumerate(parts):
                if p.tier == "disk" or not p.direct:
                    total += p.nbytes_at(min(mean_len, p.capacity)) * _read_share(m, b, i, mean_len)
    return total


def _read_share(m: FlexGenLite, b: int, i: int, mean_len: float) -> float:
    """The share of part i of batch b's positions a load moves: where its rows share a prompt prefix read for one
    row (KVCache.prefix_reads, the last block's), less than all."""
    prefix = m.engine.prefix_reads.get(b, {}).get(i)
    return 1.0 if prefix is None else prefix.moved(mean_len)


def _link_and_disk_bytes_per_step(m: FlexGenLite, mean_len: float) -> tuple[float, float]:
    """Bytes per decode step over the host-to-device link (CUDA, cpu+link) and read from disk: weights outside
    compute memory, and cache parts loaded to the compute device (parts attended on the CPU stay off the link)."""
    weights, cache, cuda = m.engine.weights, m.engine.cache, m.device.host_is_separate
    disk = float(weight_bytes(weights, "disk"))
    link = weight_bytes(weights, "cpu") + disk if cuda else 0.0
    for per_batch in cache.parts:
        for b, parts in enumerate(per_batch):
            for i, p in enumerate(parts):
                nbytes = p.nbytes_at(min(mean_len, p.capacity))
                disk += nbytes if p.tier == "disk" else 0
                link += nbytes * _read_share(m, b, i, mean_len) if cuda and p.tier != "gpu" and not p.on_cpu else 0
    return link, disk


def format_report(r: dict) -> str:
    lines = [
        f"model {r['model']} on {r['device']} ({r['dtype']}), policy {r['policy']}",
        f"prompt {r['prompt_len']} gen {r['gen_len']} batch {r['batch']}; "
        f"model {r['model_gb']} GB, cache {r['cache_gb']} GB, hidden {r['hidden_gb']} GB",
        f"prefill {r['prefill_s']} s ({r['prefill_tok_s']} tok/s); decode {r['decode_tok_s']} tok/s "
        f"({r['decode_step_ms']} ms/step); total {r['total_tok_s']} tok/s",
        f"peak memory: gpu {r['peak_gpu_gb']} GB, cpu {r['peak_cpu_gb']} GB, disk {r['peak_disk_gb']} GB, "
        f"process RSS {r['peak_rss_gb']} GB",
    ]
    if r.get("shared_prefix"):
        lines.append(f"prompts share their first {r['shared_prefix']} tokens; the prefill computed "
                     + (f"{r['prefill_shared']} of them once for all rows" if r["prefill_shared"] else "them per row"))
    if r.get("attention_backend"):
        lines.append(f"attention kernels: prefill {r['prefill_attention_backend']}, decode {r['attention_backend']}")
    if any((r.get("graph_captures") or {}).values()) or r.get("graph_failures"):
        lines.append(f"CUDA graphs: {graphs_line(r)}")
    if r.get("warmup_s") is not None:
        lines.append(f"warm-up (prefill and {WARMUP_STEPS - 1} decode step, not timed above) {r['warmup_s']} s")
    if "weight_gb_s" in r:
        lines.append(f"weights moved per decode step {r['weights_moved_per_step_gb']} GB at {r['weight_gb_s']} GB/s")
    if r["cache_moved_per_step_gb"]:
        lines.append(f"KV cache read per decode step {r['cache_moved_per_step_gb']} GB")
    return "\n".join(lines)


def graphs_line(report: dict) -> str:
    """The CUDA graphs a bench captured (whole decode steps, decode layers) and why capturing failed."""
    captures = report.get("graph_captures") or {}
    return (f"{captures.get('steps', 0)} whole decode steps, {captures.get('layers', 0)} decode layers captured"
            + "".join(f"; failed: {why}" for why in report.get("graph_failures") or []))

