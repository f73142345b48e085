"""Peak memory per tier of a policy, component by component, as the engine allocates it."""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..engine.cache_store import component_specs
from ..engine.kv_cache import batch_parts
from ..engine.policy import Policy
from ..engine.storage import TIERS
from ..engine.weight_reading import chunk_rows, read_chunk_rows
from ..engine.weight_sources import ROUNDED_ROWS
from ..engine.weights import rounded_to_8_bits
from ..kernels.compression import compressed_nbytes
from ..kernels.int8_weight import int8_nbytes
from ..models.config import ModelConfig
from ..system.host_memory import padded
from .layout import Layout, Setup, Workload

MiB = 2**20
RESERVE = 64 * MiB  # allocator slack and small buffers not modelled one by one


def memory_plan(s: Setup, lay: Layout) -> dict[str, dict[str, float]]:
    """Bytes per tier and component, as the engine allocates them; "load" is the host's transient while
    weights are placed (source rows read as fp32 before the cast)."""
    c, w = s.config, s.workload
    gpu, cpu, disk = {}, {}, {}
    gpu["weights"], cpu["weights"], disk["weights"] = (lay.placed[t] for t in TIERS)
    slots, weight_staging, direct = 0.0, 0.0, 0.0
    for kind, spec in s.kinds.items():
        extent = 0.0  # a layer's disk-homed weights: read whole into staging (CUDA); on a CPU mapped, or read
        for sp in spec.weights:  # into a buffer per parity (WeightSlots._read_extent), counted either way
            slots += lay.weight_slots(kind, sp) * math.prod(sp.shape) * s.e
            slots += lay.code_slots(kind, sp) * s.tensor_bytes(sp)
            if lay.weight(kind, sp)[2]:
                extent += s.tensor_bytes(sp)
        if s.cuda:
            weight_staging = max(weight_staging, extent)
        else:
            direct += 2 * extent
    gpu["weight slots"] = slots
    if direct:
        gpu["disk reads"] = direct
    per_seq = s.seq_layer * s.cached
    for d, tier in zip((gpu, cpu, disk), lay.cache_rows, strict=True):
        d["kv cache"] = tier * per_seq
    if s.cuda and lay.exact is not None and lay.cache_rows[1]:  # one arena: each part's arrays at aligned offsets
        kept = Counter(c.cached_positions(layer, w.max_len) for layer in range(c.num_layers))  # layers by length
        host = [(rows, on_cpu) for b in range(s.nb) for t, rows, on_cpu in _batch_parts(s, lay, b) if t == "cpu"]
        cpu["kv cache"] = sum(layers * _host_part_bytes(s, rows, n, on_cpu) for n, layers in kept.items()
                              for rows, on_cpu in host)
    gpu["cache slots"], on_host = _cache_slots(s, lay)
    if on_host:
        cpu["cache slots"] = on_host
    cache_staging = 0.0
    if lay.cache_rows[2] and s.cuda:  # a CPU reads files straight into its slots, or maps them
        rows = max((r.stop - r.start for b in range(s.nb) for t, r, _ in _batch_parts(s, lay, b)
                    if t == "disk"), default=0) if lay.exact else s.gbs
        longest = max(c.cached_positions(layer, w.max_len) for layer in range(c.num_layers))
        cache_staging = rows * s.seq_layer / 2 * longest  # one of k, v of a part
    hidden = s.gbs * w.prompt_len * c.hidden_size * s.e  # a GPU batch's hidden states after prefill layers
    act_staging = (1 + s.threads) * hidden if s.cuda and lay.act_batches[2] else 0  # writes on each I/O thread
    # storage.Staging (CUDA): two buffers per lane for loads, one per I/O thread for stores
    cpu["staging"] = 2 * weight_staging + (2 + s.threads) * cache_staging + act_staging
    for d, batches in zip((gpu, cpu, disk), lay.act_batches, strict=True):
        d["activations"] = batches * hidden
    rows = s.gbs * w.prompt_len
    h, f, q_kv = c.hidden_size, c.mlp_width, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    # a MoE's (row, expert) pairs: rows gathered, outputs, weighted outputs in fp32; the sum; router scores (fp32)
    routing = (c.experts_per_token * h * (2 + 4 / s.e) + h + 3 * c.num_experts * 4 / s.e) if c.moe else 0
    working = rows * s.e * max(6 * h + 2 * q_kv, 3 * h + (4 if c.gated_mlp else 2) * f + routing)
    inputs = s.n * (w.prompt_len * w.prompt_len + 8 * w.max_len) + 2 * s.n * w.prompt_len * c.head_dim * s.e
    logits = s.gbs * c.vocab_size * (s.e + 8)
    gather = 2 * s.gbs * c.num_kv_heads * w.max_len * c.head_dim * s.e  # a part's k, v for rows still generating
    gpu["working set"] = max(working, gather) + inputs + logits + 2 * hidden
    # sources yield rows in fp32 at most, cast into place (or quantized: fp32 copy, codes) a chunk at a time
    # (weight_reading.py; a GGUF's rotary q and k whole: their rows are permuted); an fp32 tensor kept in host
    # RAM is the source's own (the cast is a no-op), so only the read counts
    cast = 0 if s.dtype == torch.float32 and not s.cuda else s.e
    load = 0.0
    for sp, _ in s.groups:
        numel = math.prod(sp.shape)
        read = min(numel, read_chunk_rows(sp, s.dtype) * numel // sp.shape[0])
        if s.compressed(sp):  # a chunk of rows quantized, the whole one's bytes twice at most
            step = chunk_rows(sp, s.dtype, s.wcomp, packed=True)
            read = numel if step is None else min(numel, step * numel // sp.shape[0])
            load = max(load, read * (9 + cast) + 2 * compressed_nbytes(sp.shape, s.wcomp))
        load = max(load, read * (4 + cast))
        if rounded_to_8_bits(sp, s.wcomp, s.cpu_rows > 0):  # fp32 rows rounded a chunk at a time, codes beside
            load = max(load, 4 * 4 * min(numel, ROUNDED_ROWS) + int8_nbytes(sp.shape))  # rows, their rounding's
    if c.rotary_rows_permuted:  # a GGUF's rotary q, whole
        load = max(load, c.num_heads * c.head_dim * c.hidden_size * (4 + cast))
    cpu["load"] = load
    cpu["reserve"] = RESERVE
    return {"gpu": gpu, "cpu": cpu, "disk": disk}


def _batch_parts(s: Setup, lay: Layout, b: int) -> list[tuple[str, slice, bool]]:
    """kv_cache.batch_parts of an exact layout's batch b, as KVCache splits it."""
    return batch_parts(b, s.gbs, lay.cache_rows, lay.host_attended())


def _host_part_bytes(s: Setup, rows: slice, positions: int, on_cpu: bool) -> int:
    """Arena bytes of a cpu-tier part's K and V across the link, as KVCache._host_bytes takes them."""
    c, dtype = s.config, s.cpu_dtype if on_cpu else s.dtype
    shape = (rows.stop - rows.start, c.num_kv_heads, positions, c.head_dim)
    return 2 * sum(padded(math.prod(sh) * dt.itemsize) for sh, dt in component_specs(shape, dtype, s.ccomp))


def _cache_slots(s: Setup, lay: Layout) -> tuple[float, float]:
    """CacheSlots buffers (compute memory, host RAM): per distinct (part index, rows, attended on the CPU) of
    parts not used in place, 2 parities x k and v, in the dtype and memory where that part is attended (CPU
    attention's in host RAM across the link); a CPU's memory-mapped disk parts count the same (their pages are
    in the process while used)."""
    c, max_len = s.config, s.workload.max_len
    codes_row = s.seq_layer / 2 * max_len if s.ccomp is not None else 0

    def dense_row(e: int) -> float:
        return c.num_kv_heads * max_len * c.head_dim * e

    if lay.exact is None:  # the LP's: per kind of part, slots for a whole GPU batch of it
        out = [0.0, 0.0]
        for t, rows, on_cpu in lay.cache_parts():
            if rows and (not lay.part_direct(t, on_cpu) or lay.part_mapped(t)):
                out[on_cpu] = 4 * s.gbs * (dense_row((s.cpu_dtype if on_cpu else s.dtype).itemsize) + codes_row)
        return out[0], out[1]
    if s.workload.gen_len < 2:
        return 0.0, 0.0
    # Engine._prefetch_cache alternates two parities load by load, so over a run (a last block with fewer
    # batches, batches that finish early) each distinct (part index, rows, where) can take both
    keys: dict[tuple, bool] = {}  # (index, rows, in host RAM, dtype) -> codes read into scratch (across the link)
    for b in range(s.nb):
        for i, (t, rows, on_cpu) in enumerate(_batch_parts(s, lay, b)):
            if not lay.part_direct(t, on_cpu) or lay.part_mapped(t):
                key = (i, rows.stop - rows.start, on_cpu, s.cpu_dtype if on_cpu else s.dtype)
                keys[key] = keys.get(key, False) or (s.cuda and t != "gpu")
    out = [0.0, 0.0]
    codes_mapped = s.ccomp is not None and lay.part_direct("disk", False)  # a mapped part's pages: its codes alone
    for (_, r, host, dtype), across in keys.items():
        row = codes_row if codes_mapped else dense_row(dtype.itemsize) + (codes_row if across else 0)
        out[host] += 2 * 2 * r * row
    return out[0], out[1]


def tier_peaks(plan: dict[str, dict[str, float]], cuda: bool) -> dict[str, float]:
    """Peak bytes: "gpu" the compute tier, "cpu" all host RAM the engine takes, "disk" offload files.
    Without CUDA the compute tier is host RAM too, so "cpu" includes it."""
    gpu = sum(plan["gpu"].values())
    host_run = sum(v for k, v in plan["cpu"].items() if k != "load")
    host_load = plan["cpu"]["weights"] + plan["cpu"]["load"] + plan["cpu"]["reserve"]
    if not cuda:
        host_run += gpu
        host_load += plan["gpu"]["weights"]
    return {"gpu": gpu, "cpu": max(host_run, host_load), "disk": sum(plan["disk"].values())}


def peak_memory(config: ModelConfig, workload: Workload, policy: Policy,
                cuda: bool) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(bytes per tier and component, peak bytes per tier) of running `workload` with `policy`."""
    s = Setup(config, workload, policy, None, cuda=cuda)
    plan = memory_plan(s, Layout.of_policy(s, policy))
    return plan, tier_peaks(plan, cuda)
