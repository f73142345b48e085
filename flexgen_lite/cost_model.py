"""Predicted prefill and decode times and peak memory per tier of a policy, mirroring what engine.py does.

Per step, for every layer j the engine waits for j's weights, starts fetching j+1's, and computes j for
each GPU batch while the next batch's cache loads. So a step is the first fetch, then per layer
max(I/O waited on while j computes, compute of j) with overlap (their sum without); on a CPU-only machine
memory copies, dequantization and page-cache reads run on the same cores as compute, so they count with
compute there, and only cold disk reads overlap. Decode is costed at the mean context, prompt + gen/2.

Each cost is affine in the placement fractions for a fixed "regime" (is all cache attended in place?):
`policy_search` reads the LP's coefficients off `phase_times` by evaluating it at unit placements, and
checks its rounded answer with the exact `Layout.of_policy`. Weights are placed as whole tensors
(`weights.weight_tiers`); the LP treats each layer kind's share on a tier as continuous.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .kv_cache import batch_parts, cache_bytes_per_token
from .models import LayerSpec, WeightSpec, layer_specs
from .policy import Policy, PolicyError, split_counts
from .profile import HardwareProfile
from .storage import TIERS
from .weights import stored_nbytes, weight_tiers

MiB = 2**20
RESERVE = 64 * MiB  # allocator slack and small buffers not modelled one by one
OPS_PER_PART = 10  # torch ops of decode attention over one more cache part of a batch


@dataclass(frozen=True)
class Workload:
    """What will be generated: prompt and generation length, and how many prompts (None: one block)."""

    prompt_len: int
    gen_len: int
    num_prompts: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1 or (self.num_prompts is not None and self.num_prompts < 1):
            raise PolicyError(f"workload lengths and prompt count must be positive, got {self}")

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.gen_len


_SPECS: dict[int, tuple] = {}


def _model_specs(config: ModelConfig) -> tuple[list[LayerSpec], list[tuple[WeightSpec, int]]]:
    """Layer specs, and the stored weights (tied ones once) grouped by shape: (one of them, how many)."""
    hit = _SPECS.get(id(config))
    if hit is None or hit[0] is not config:
        specs = layer_specs(config)
        unique = {w.hf_name: w for layer in specs for w in layer.weights}.values()
        count = Counter(w.shape for w in unique)
        first = {w.shape: w for w in unique}
        hit = _SPECS[id(config)] = (config, specs, [(first[shape], n) for shape, n in count.items()])
    return hit[1], hit[2]


@dataclass(frozen=True)
class Regime:
    cache_direct: bool  # every cache part attended where it lives (no load into a cache slot)


class Setup:
    """A model, workload, policy shape (batches, switches, dtype) and machine: what every cost reads."""

    def __init__(self, config: ModelConfig, workload: Workload, policy: Policy, hw: HardwareProfile | None,
                 disk_cached: bool = True, cuda: bool | None = None) -> None:
        """hw may be None for memory alone; then `cuda` says whether the compute tier is a GPU."""
        self.config, self.workload, self.policy, self.hw = config, workload, policy, hw
        self.cuda, self.disk_cached = (hw.is_cuda if hw is not None else bool(cuda)), disk_cached
        self.dtype = policy.torch_dtype(torch.device("cuda" if self.cuda else "cpu"))
        self.dname, self.e = str(self.dtype).removeprefix("torch."), self.dtype.itemsize
        self.specs, self.groups = _model_specs(config)
        self.kinds = {s.kind: s for s in self.specs}  # one layer of each kind: decoder layers are alike
        # a head weight tied to the embedding's: its slot still holds it (WeightSlots), so it moves once
        self.tied = {w.hf_name for w in self.kinds["embed"].weights} & {w.hf_name for w in self.kinds["head"].weights}
        self.wcomp, self.ccomp = policy.weight_compression(), policy.cache_compression()
        self.gbs, self.nb, self.n = policy.gpu_batch_size, policy.num_gpu_batches, policy.block_size
        c = config
        self.seq_layer = cache_bytes_per_token(1, c.num_kv_heads, c.head_dim, self.dtype, self.ccomp)  # k+v
        self.seq_layer_dense = 2 * c.num_kv_heads * c.head_dim * self.e
        self.threads = 3 if policy.overlap else 1  # IOPool workers, each with its own staging buffer

    def compressed(self, spec: WeightSpec) -> bool:
        return self.wcomp is not None and len(spec.shape) >= 2

    def tensor_bytes(self, spec: WeightSpec) -> int:
        """Bytes of a weight as stored (4-bit codes when compressed), as weights.place_tensor stores it."""
        return stored_nbytes(spec.shape, self.dtype, self.wcomp)


@dataclass
class Seg:
    """Seconds waited on I/O and seconds of work on the compute path; `by` splits them by resource."""

    wait: float = 0.0
    work: float = 0.0
    by: dict = field(default_factory=lambda: defaultdict(float))

    def add(self, resource: str, seconds: float, waits: bool) -> None:
        if waits:
            self.wait += seconds
        else:
            self.work += seconds
        self.by[resource] += seconds

    def __add__(self, other: Seg) -> Seg:
        out = Seg(self.wait + other.wait, self.work + other.work, defaultdict(float, self.by))
        for k, v in other.by.items():
            out.by[k] += v
        return out

    def time(self, overlap: bool) -> float:
        return max(self.wait, self.work) if overlap else self.wait + self.work


class Layout:
    """Where things live, as the engine sees them: per weight name of a layer kind the share of its layers
    holding it on (gpu, cpu, disk), weight bytes per tier, block sequences and GPU batches per tier.
    `of_policy` is exact; `linear` is continuous for the LP."""

    def __init__(self, s: Setup, weight, placed, cache_rows, act_batches, exact: Policy | None = None,
                 slot_sets: dict | None = None) -> None:
        self.s, self.weight, self.placed = s, weight, placed
        self.cache_rows, self.act_batches, self.exact, self.slot_sets = cache_rows, act_batches, exact, slot_sets

    @classmethod
    def of_policy(cls, s: Setup, p: Policy) -> Layout:
        tiers = weight_tiers(s.specs, p.percents("weight"), s.dtype, s.wcomp)
        counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        slot_sets: dict[tuple[str, str], set] = defaultdict(set)  # WeightSlots keys (kind, index % 2, name)
        for layer in s.specs:
            for spec in layer.weights:
                tier = tiers[spec.hf_name]
                counts[layer.kind, spec.name][tier] += 1
                if layer.kind == "head" and spec.hf_name in s.tied:
                    continue
                if s.compressed(spec) or not (tier == "gpu" or (tier == "cpu" and not s.cuda)):
                    slot_sets[layer.kind, spec.name].add(layer.index % 2)
        shares = {key: tuple(c[t] / c.total() for t in TIERS) for key, c in counts.items()}
        placed = dict.fromkeys(TIERS, 0)
        for spec in {w.hf_name: w for layer in s.specs for w in layer.weights}.values():
            placed[tiers[spec.hf_name]] += s.tensor_bytes(spec)
        return cls(s, lambda kind, spec: shares[kind, spec.name], placed, split_counts(s.n, p.percents("cache")),
                   split_counts(s.nb, p.percents("act")), p, {k: len(v) for k, v in slot_sets.items()})

    @classmethod
    def linear(cls, s: Setup, x) -> Layout:
        """x = (wg, wc, cg, cc, hg, hc): shares of weight bytes, block sequences and GPU batches."""
        wg, wc, cg, cc, hg, hc = x
        total = sum(n * s.tensor_bytes(sp) for sp, n in s.groups)
        return cls(s, lambda kind, spec: (wg, wc, 1 - wg - wc), dict(zip(TIERS, (wg * total, wc * total,
                   (1 - wg - wc) * total), strict=True)), (cg * s.n, cc * s.n, (1 - cg - cc) * s.n),
                   (hg * s.nb, hc * s.nb, (1 - hg - hc) * s.nb))

    def resident(self, kind: str, spec: WeightSpec) -> float:
        """The share of a weight name's layers that use it where it lives (weights.place_tensor decides)."""
        if self.s.compressed(spec):
            return 0.0
        g, c, _ = self.weight(kind, spec)
        return g if self.s.cuda else g + c

    def weight_slots(self, kind: str, spec: WeightSpec) -> float:
        """Weight slot buffers of a name: two for decoder layers (this layer and the next), one for embed
        and head, if any layer needs one; continuous in the LP."""
        if self.slot_sets is not None:
            return self.slot_sets.get((kind, spec.name), 0)
        if kind == "head" and spec.hf_name in self.s.tied:
            return 0.0
        sets = min(2, self.s.config.num_layers) if kind in ("attention", "mlp") else 1
        return sets * (1 - self.resident(kind, spec))

    def part_direct(self, tier: str) -> bool:
        """As kv_cache.KVCache._alloc decides."""
        s = self.s
        if s.ccomp is not None:
            return False
        return tier == "gpu" or (tier == "cpu" and (not s.cuda or s.policy.cpu_cache_compute))


# ---- time ------------------------------------------------------------------------------------------------------
def _host(s: Setup, seg: Seg, resource: str, seconds: float, contention: float | None = None) -> None:
    """Work of an I/O thread on the host: beside a GPU it overlaps compute; on a CPU it competes with compute
    for the cores, at the measured contention (x1 when they share them perfectly)."""
    if s.cuda:
        seg.add(resource, seconds, waits=True)
    else:
        factor = (s.hw.contention if contention is None else contention) if s.policy.overlap else 1.0
        seg.add(resource, seconds * factor, waits=False)


def _disk_read(s: Setup, seg: Seg, nbytes: float) -> None:
    """A read by an I/O thread: from the page cache it is a copy by the kernel (CPU work), else a wait."""
    if s.disk_cached:
        _host(s, seg, "page cache", nbytes / s.hw.cached_read, s.hw.contention_read)
    else:
        seg.add("disk", nbytes / s.hw.disk_read, waits=True)


def _disk_write(s: Setup, seg: Seg, nbytes: float) -> None:
    if s.disk_cached:
        _host(s, seg, "page cache", nbytes / s.hw.cached_write)
    else:
        seg.add("disk", nbytes / s.hw.disk_write, waits=True)


def _fetch(s: Setup, layer: LayerSpec, lay: Layout) -> Seg:
    """WeightSlots.fetch of one layer: non-resident tensors assembled in their slot."""
    seg, hw = Seg(), s.hw
    h2d = hw.h2d_pinned if s.policy.pin_weight else hw.h2d_pageable
    for spec in layer.weights:
        if layer.kind == "head" and spec.hf_name in s.tied:
            continue
        _, c, d = lay.weight(layer.kind, spec)
        nbytes = s.tensor_bytes(spec)
        if s.cuda:  # weights in compute memory are used in place (compressed ones dequantized there)
            seg.add("link", c * nbytes / h2d + d * nbytes / hw.h2d_pinned, waits=True)
        _disk_read(s, seg, d * nbytes)
        if s.compressed(spec):
            _host(s, seg, "dequantize", math.prod(spec.shape) / hw.dequantize[s.dname])
    return seg


def _compute(s: Setup, kind: str, t: int) -> Seg:
    """Layer math of all GPU batches (models/layers.py), t new tokens per row."""
    seg, hw, c = Seg(), s.hw, s.config
    h, w, f, v = c.hidden_size, c.word_dim, c.intermediate_size, c.vocab_size
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    rows = s.gbs * (1 if kind == "head" else t)
    linears = {"embed": [(w, h)] * (w != h),
               "attention": [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h)],
               "mlp": [(h, f)] * (3 if c.gated_mlp else 1) + [(f, h)],
               "head": [(w, v)] + [(h, w)] * (w != h)}  # (in, out) of each matmul
    passes = {"embed": 3 * rows * h * s.e, "attention": 12 * rows * h * s.e, "mlp": rows * s.e * (4 * h + 3 * f),
              "head": rows * v * (s.e + 12)}  # elementwise bytes: norms, rope, residuals, logits to fp32
    bw = hw.device_copy if s.cuda else hw.host_copy
    matmuls = sum(hw.matmul_time(s.dname, rows, k, n) for k, n in linears[kind])
    seg.add("compute", s.nb * (matmuls + passes[kind] / bw), waits=False)
    if kind == "attention" and t > 1:  # prefill attends over its own k, v (masked, full square)
        sdpa = 4 * s.gbs * c.num_heads * t * t * c.head_dim
        seg.add("compute", s.nb * sdpa / hw.sdpa_prefill[s.dname], waits=False)
    per_layer, per_batch = hw.layer_overhead.get(c.family, hw.layer_overhead["opt"])
    seg.add("overhead", per_layer + s.nb * per_batch, waits=False)  # as measured on tiny models, futures included
    return seg


def _decode_cache(s: Setup, lay: Layout, length: float) -> Seg:
    """KVCache.load of every part not usable in place, and attention over every part (one layer, all batches)."""
    seg, hw, pol = Seg(), s.hw, s.policy
    dense, stored = s.seq_layer_dense * length, s.seq_layer * length  # per sequence
    elements = dense / s.e
    gpu_att, cpu_att = hw.attention[s.dname], hw.cpu_attention[s.dname]
    cpu_compute = s.cuda and pol.cpu_cache_compute
    for tier, rows in zip(("gpu", "cpu", "disk"), lay.cache_rows, strict=True):
        if not rows:
            continue
        on_cpu = cpu_compute and tier != "gpu"
        if not lay.part_direct(tier):  # KVCache.load into a slot, costed as measured through it
            in_place = tier == "gpu" or (tier == "cpu" and (not s.cuda or on_cpu))
            loads = s.nb * rows / s.n  # parts of this tier, about one per batch holding its rows
            if tier == "disk":  # read (from the page cache), then transposed from position-major
                fixed, rate = hw.cache_disk_load[s.dname]
                _host(s, seg, "cache load", loads * fixed + rows * stored / rate)
                if not s.disk_cached:
                    seg.add("disk", rows * stored / hw.disk_read, waits=True)
            if s.cuda and not on_cpu and not in_place:
                seg.add("link", rows * stored / hw.h2d_pageable, waits=True)
            if s.ccomp is not None:
                fixed, rate = hw.cache_dequantize[s.dname]
                _host(s, seg, "dequantize", loads * fixed + rows * elements / rate)
        fixed, rate = cpu_att if on_cpu else gpu_att
        seg.add("cpu attention" if on_cpu else "attention", s.nb * rows / s.n * fixed + rows * dense / rate,
                waits=False)
    parts = s.nb + sum(1 for r in lay.cache_rows[1:] if r)  # about one part per batch, more where tiers meet
    seg.add("overhead", (parts - s.nb) * OPS_PER_PART * hw.op_overhead, waits=False)  # one part is in layer_overhead
    if s.ccomp is not None:  # the new token quantized into every part, in the background on a CPU
        if s.cuda:
            seg.add("quantize", parts * hw.cache_store, waits=False)
        else:
            _host(s, seg, "quantize", parts * hw.cache_store)
    return seg


def _prefill_cache_store(s: Setup, lay: Layout) -> Seg:
    """The prompt's k, v written home (engine._store_cache): copies in order, files and CPU quantization
    in the background."""
    seg, hw, t = Seg(), s.hw, s.workload.prompt_len
    for tier, rows in zip(("gpu", "cpu", "disk"), lay.cache_rows, strict=True):
        dense, stored = rows * s.seq_layer_dense * t, rows * s.seq_layer * t
        if s.ccomp is not None:  # on CUDA, memory parts quantize in stream order; the rest in the background
            seconds = dense / s.e / hw.quantize[s.dname]
            if s.cuda and tier != "disk":
                seg.add("quantize", seconds, waits=False)
            else:
                _host(s, seg, "quantize", seconds)
        elif tier != "disk":
            seg.add("copy", dense / (hw.device_copy if tier == "gpu" or not s.cuda else hw.d2h_pinned), waits=False)
        if tier == "disk":
            _disk_write(s, seg, stored)
    return seg


def _activations(s: Setup, lay: Layout, t: int) -> Seg:
    """Activations.put and get around one layer (synchronous): device<->host copies, or file I/O."""
    seg, hw = Seg(), s.hw
    nbytes = s.gbs * t * s.config.hidden_size * s.e
    _, cpu, disk = lay.act_batches
    if s.cuda and cpu:
        seg.add("link", cpu * nbytes * (1 / hw.d2h_pageable + 1 / hw.h2d_pageable), waits=False)
    if disk:  # in the compute thread: nothing overlaps it
        write, read = (hw.cached_write, hw.cached_read) if s.disk_cached else (hw.disk_write, hw.disk_read)
        seg.add("page cache" if s.disk_cached else "disk", disk * nbytes * (1 / write + 1 / read), waits=False)
    return seg


@dataclass
class Phase:
    """One step: a serial part (the first weight fetch) and (multiplicity, segment) per layer."""

    serial: Seg
    segments: list[tuple[int, Seg]]

    def time(self, overlap: bool) -> float:
        return self.serial.wait + self.serial.work + sum(m * seg.time(overlap) for m, seg in self.segments)

    def by_resource(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for m, seg in [(1, self.serial), *self.segments]:
            for k, v in seg.by.items():
                out[k] += m * v
        return dict(out)


def phase_times(s: Setup, lay: Layout, prefill: bool) -> Phase:
    """The engine's step: fetch(embed); then layer by layer, compute j beside fetch(j+1) and j's cache loads."""
    t = s.workload.prompt_len if prefill else 1
    length = s.workload.prompt_len + s.workload.gen_len / 2
    fetch = {k: _fetch(s, spec, lay) for k, spec in s.kinds.items()}
    comp = {k: _compute(s, k, t) + _activations(s, lay, t) for k in s.kinds}
    comp["attention"] += _prefill_cache_store(s, lay) if prefill else _decode_cache(s, lay, length)
    layers = s.config.num_layers
    segments = [(1, comp["embed"] + fetch["attention"]), (layers, comp["attention"] + fetch["mlp"]),
                (layers - 1, comp["mlp"] + fetch["attention"]), (1, comp["mlp"] + fetch["head"]), (1, comp["head"])]
    return Phase(fetch["embed"], [(m, seg) for m, seg in segments if m])


# ---- memory ----------------------------------------------------------------------------------------------------
def memory_plan(s: Setup, lay: Layout) -> dict[str, dict[str, float]]:
    """Bytes per tier and component, as the engine allocates them; "load" is the host's transient while
    weights are placed (source rows read as fp32 before the cast)."""
    c, w = s.config, s.workload
    gpu, cpu, disk = {}, {}, {}
    gpu["weights"], cpu["weights"], disk["weights"] = (lay.placed[t] for t in TIERS)
    slots, staging = 0.0, 0.0
    for kind, spec in s.kinds.items():
        for sp in spec.weights:
            slots += lay.weight_slots(kind, sp) * math.prod(sp.shape) * s.e
            if lay.weight(kind, sp)[2] and (s.cuda or s.compressed(sp)):  # read into a host staging buffer
                staging = max(staging, s.tensor_bytes(sp))
    gpu["weight slots"] = slots
    per_seq = s.seq_layer * w.max_len * c.num_layers
    for d, tier in zip((gpu, cpu, disk), lay.cache_rows, strict=True):
        d["kv cache"] = tier * per_seq
    slot_bytes, slot_tier = _cache_slots(s, lay)
    (cpu if slot_tier == "cpu" else gpu)["cache slots"] = slot_bytes
    if lay.cache_rows[2]:
        rows = max((r.stop - r.start for b in range(s.nb) for t, r in batch_parts(b, s.gbs, lay.cache_rows)
                    if t == "disk"), default=0) if lay.exact else s.gbs
        staging = max(staging, rows * s.seq_layer / 2 * w.max_len)  # one of k, v of a part
    cpu["staging"] = s.threads * staging
    hidden = s.gbs * w.prompt_len * c.hidden_size * s.e  # a GPU batch's hidden states after prefill layers
    for d, batches in zip((gpu, cpu, disk), lay.act_batches, strict=True):
        d["activations"] = batches * hidden
    rows = s.gbs * w.prompt_len
    h, f, q_kv = c.hidden_size, c.intermediate_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    working = rows * s.e * max(6 * h + 2 * q_kv, 3 * h + (4 if c.gated_mlp else 2) * f)
    inputs = s.n * (w.prompt_len * w.prompt_len + 8 * w.max_len) + 2 * s.n * w.prompt_len * c.head_dim * s.e
    logits = s.gbs * c.vocab_size * (s.e + 8)
    gather = 2 * s.gbs * c.num_kv_heads * w.max_len * c.head_dim * s.e  # a part's k, v for rows still generating
    gpu["working set"] = max(working, gather) + inputs + logits + 2 * hidden
    load = 0.0  # sources yield fp32 rows (a GGUF source a whole dequantized tensor), cast or quantized into place
    for sp, _ in s.groups:
        numel = math.prod(sp.shape)
        load = max(load, numel * (4 + s.e), numel * 4 * 3 if s.compressed(sp) else 0)
    cpu["load"] = load
    cpu["reserve"] = RESERVE
    return {"gpu": gpu, "cpu": cpu, "disk": disk}


def _cache_slots(s: Setup, lay: Layout) -> tuple[float, str]:
    """CacheSlots buffers: per distinct (part index, rows) of parts not used in place, 2 parities x k and v."""
    c, max_len = s.config, s.workload.max_len
    on_cpu = s.cuda and s.policy.cpu_cache_compute
    dense_row = c.num_kv_heads * max_len * c.head_dim * s.e
    codes_row = s.seq_layer / 2 * max_len if s.ccomp is not None else 0
    tier = "cpu" if on_cpu and any(lay.cache_rows[1:]) else "gpu"
    if lay.exact is None:
        direct = all(lay.part_direct(t) or not r for t, r in zip(("gpu", "cpu", "disk"), lay.cache_rows, strict=True))
        return (0.0 if direct else 4 * s.gbs * (dense_row + codes_row)), tier
    keys, count = set(), 0  # engine._prefetch_cache numbers loads layer by layer, batch by batch; parity = count % 2
    for _ in range(min(2, s.workload.gen_len - 1)):
        for _ in range(c.num_layers):
            for b in range(s.nb):
                count += 1
                for i, (t, rows) in enumerate(batch_parts(b, s.gbs, lay.cache_rows)):
                    if not lay.part_direct(t):
                        keys.add((i, rows.stop - rows.start, count % 2))
    return sum(2 * r * (dense_row + codes_row) for _, r, _ in keys), tier


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


# ---- the whole prediction ------------------------------------------------------------------------------------
@dataclass
class Prediction:
    prefill_s: float
    decode_step_s: float
    blocks: int
    throughput: float  # generated tokens / s, prefill included (FlexGen's metric, bench's total tok/s)
    decode_throughput: float
    bound: str  # the resource that takes most of a decode step
    prefill_by: dict[str, float]
    decode_by: dict[str, float]
    memory: dict[str, dict[str, float]]
    peak: dict[str, float]
    disk_cached: bool


def predict(config: ModelConfig, workload: Workload, policy: Policy, hw: HardwareProfile,
            page_cache: float = math.inf) -> Prediction:
    """Times and memory of running `workload` with `policy`; disk reads come from the page cache when the
    offload files fit in `page_cache` bytes (free RAM the kernel can use for them)."""
    s = Setup(config, workload, policy, hw)
    lay = Layout.of_policy(s, policy)
    memory = memory_plan(s, lay)
    peak = tier_peaks(memory, hw.is_cuda)
    s.disk_cached = peak["disk"] <= page_cache
    return _prediction(s, lay, memory, peak)


def _prediction(s: Setup, lay: Layout, memory, peak) -> Prediction:
    pre, dec = phase_times(s, lay, True), phase_times(s, lay, False)
    t_pre, t_dec = pre.time(s.policy.overlap), dec.time(s.policy.overlap)
    w = s.workload
    blocks = 1 if w.num_prompts is None else -(-w.num_prompts // s.n)
    tokens = (s.n if w.num_prompts is None else w.num_prompts) * w.gen_len
    total = blocks * (t_pre + (w.gen_len - 1) * t_dec)
    by = dec.by_resource()
    return Prediction(t_pre, t_dec, blocks, tokens / total, s.n / t_dec, max(by, key=by.get), pre.by_resource(), by,
                      memory, peak, s.disk_cached)
