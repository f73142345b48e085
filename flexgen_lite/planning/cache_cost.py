"""The KV cache's part of a layer's predicted time: a decode step's loads of the parts not used in place and the
attention over every part (GPU, CPU, 4-bit as stored, a shared prompt prefix read once), and a prefill's store of
the prompt's k, v home. Mirrors engine/cache_attention.py and engine/transfers.py."""

from __future__ import annotations

from ..engine.block import MIN_SHARED
from ..engine.storage import PAGE
from ..models.config import ModelConfig
from .layout import Layout, Setup
from .segments import Seg, cpu_worker, disk_write, mapped_cache, on_host

OPS_PER_PART = 10  # torch ops of decode attention over one more cache part of a batch


def attention_per_byte(s: Setup, rate: float, on_a_cpu: bool, length: float, dtype: str) -> float:
    """Seconds per byte of a row's cache that decode attention goes over: on a CPU, the positions of a shared
    prompt prefix at the rate measured for reading them from one row (shared_prefix.shared_rows), the rest at
    `rate`."""
    shared = min(shared_positions(s), length) / length if on_a_cpu else 0.0
    return (1 - shared) / rate + shared / s.hw.shared_attention_rate(dtype, rate)


def link_cache_bytes(s: Setup, tier: str, rows: float, loads: float, stored: float, length: float) -> float:
    """Cache bytes a decode step's loads of a tier's parts bring over the link: from host RAM, a shared prompt
    prefix's positions for one row of each part (KVCache.prefix_reads), the others' rest."""
    shared = min(shared_positions(s), length) if tier == "cpu" else 0
    return rows * stored * (1 - shared / length) + loads * stored * shared / length


def shared_positions(s: Setup) -> int:
    """Prompt positions the prefill computes once per block (the engine shares MIN_SHARED or more)."""
    shared = s.workload.shared_len
    return shared if s.policy.share_prefix and shared >= MIN_SHARED else 0


def decode_cache(s: Setup, lay: Layout, length: float) -> Seg:
    """KVCache.load of every part not usable in place, and attention over every part (one layer, all batches)."""
    seg, hw = Seg(), s.hw
    seen = attended_share(s.config, length) * length  # positions kept and read: a windowed layer's window alone
    dense, stored = s.seq_layer_dense * seen, s.seq_layer * seen  # per sequence
    elements = dense / s.e
    cpu_dtype = str(s.cpu_dtype).removeprefix("torch.")  # float16 maybe bfloat16 (Policy.cpu_attention_dtype)
    kv_heads = s.config.num_kv_heads
    group = s.config.num_heads // kv_heads
    gpu_att = hw.decode_attention(s.dname, group, s.config.head_dim)
    cpu_att = hw.decode_attention(cpu_dtype, group, s.config.head_dim, on_cpu=True)
    parts = s.nb  # about one part per batch, more where tiers meet
    worker = cpu_worker(s)
    for tier, rows, on_cpu in lay.cache_parts():
        if not rows:
            continue
        parts += tier != "gpu"
        if lay.part_mapped(tier):  # used in place (dequantized from in place when compressed): a part's pages
            # over max_len mapped in and out, the new token's k and v written on a page per row and head each
            kept = attended_share(s.config, s.workload.max_len) * s.workload.max_len
            pages = rows * s.seq_layer * kept / PAGE
            mapped_cache(s, seg, rows * s.seq_layer * kept, min(pages, 2 * rows * s.config.num_kv_heads),
                         s.nb * rows / s.n)
        if not lay.part_direct(tier, on_cpu):  # KVCache.load into a slot, costed as measured through it
            in_place = tier == "gpu" or (tier == "cpu" and (not s.cuda or on_cpu))
            loads = s.nb * rows / s.n  # parts of this tier, about one per batch holding its rows
            if tier == "disk" and s.cuda:  # read into staging (from the page cache), as measured through it
                fixed, rate = hw.cache_disk_load[s.dname]
                on_host(s, seg, "cache load", loads * fixed + rows * stored / rate)
                if not s.disk_cached:
                    seg.add("disk", rows * stored / hw.disk_read, waits=True)
            if s.cuda and not on_cpu and not in_place:  # position-major prefixes, page-locked: one DMA each
                seg.add("link", link_cache_bytes(s, tier, rows, loads, stored, length) / hw.h2d_pinned, waits=True)
            if s.ccomp is not None:
                fixed, rate = hw.cache_dequantize[s.dname]
                on_host(s, seg, "dequantize", loads * fixed + rows * elements / rate)
        codes = None
        if s.ccomp is not None and lay.part_direct(tier, on_cpu):  # codes read as stored where they are
            codes = (hw.device_codes_attention(s.dname, group) or gpu_att if s.cuda and tier == "gpu"
                     else hw.codes_attention(cpu_dtype, group))
        if codes is not None:  # by a CPU (quantized_attention) or a GPU (Triton's; its dense rate unmeasured)
            fixed, rate, *_ = codes
            seg.add("cpu attention" if on_cpu else "attention", s.nb * rows / s.n * fixed + rows * stored / rate,
                    waits=False, side=on_cpu and worker)
            continue
        fixed, rate, pair = cpu_att if on_cpu else gpu_att
        seg.add("cpu attention" if on_cpu else "attention", s.nb * rows / s.n * fixed + rows * kv_heads * pair
                + rows * dense * attention_per_byte(s, rate, on_cpu or not s.cuda, length, cpu_dtype),
                waits=False, side=on_cpu and worker and lay.part_direct(tier, on_cpu))
    seg.add("overhead", (parts - s.nb) * OPS_PER_PART * hw.op_overhead, waits=False)  # one part is in layer_overhead
    if s.ccomp is not None:  # the new token quantized into every part, in the background on a CPU
        if s.cuda:
            seg.add("quantize", parts * hw.cache_store, waits=False)
        else:
            on_host(s, seg, "quantize", parts * hw.cache_store)
    return seg


def attended_share(config: ModelConfig, length: float) -> float:
    """The share of a sequence's `length` positions a layer keeps and decode attention reads, on average over the
    layers: a windowed layer's window alone (a ring: kv_cache)."""
    if not config.windows:
        return 1.0
    return sum(min(w, length) if w else length for w in config.windows) / (len(config.windows) * length)


def prefill_cache_store(s: Setup, lay: Layout) -> Seg:
    """The prompt's k, v written home (Engine._store_cache): copies in order, files and CPU quantization
    in the background."""
    seg, hw, prompt = Seg(), s.hw, s.workload.prompt_len
    t = attended_share(s.config, prompt) * prompt  # positions kept: a windowed layer's window alone
    for tier, rows in zip(("gpu", "cpu", "disk"), lay.cache_rows, strict=True):
        dense, stored = rows * s.seq_layer_dense * t, rows * s.seq_layer * t
        if s.ccomp is not None:  # on CUDA, memory parts quantize in stream order; the rest in the background
            seconds = dense / s.e / hw.quantize[s.dname]
            if s.cuda and tier != "disk":
                seg.add("quantize", seconds, waits=False)
            else:
                on_host(s, seg, "quantize", seconds)
        elif tier != "disk":
            seg.add("copy", dense / (hw.device_copy if tier == "gpu" or not s.cuda else hw.d2h_pinned), waits=False)
        if tier == "disk":
            disk_write(s, seg, stored)
    return seg
