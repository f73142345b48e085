"""Predicted prefill and decode times of a policy, mirroring what the engine (engine/block_schedule.py) does
(memory: memory_plan.py).

Per step, for every layer j the engine waits for j's weights, starts fetching j+1's, and computes j for
each GPU batch while the next batch's cache loads. So a step is the first fetch, then per layer
max(I/O waited on while j computes, compute of j) with overlap (their sum without); on a CPU-only machine
memory copies, dequantization and page-cache reads run on the same cores as compute, so they count with
compute there, and only cold disk reads overlap. Decode is costed at the mean context, prompt + gen/2.
What the matrix products cost (dense, the CPU's int4 kernel as kernels/int4_cost.py chooses, a GPU's 4-bit codes,
fused C layers, CUDA graphs): products_cost.py.

Each cost is affine in the placement fractions for a fixed "regime" (is all cache attended in place?):
`policy_search` reads the LP's coefficients off `phase_times` by evaluating it at unit placements, and
checks its rounded answer with the exact `Layout.of_policy`. Weights are placed as whole tensors
(`weights.weight_tiers`); the LP treats each layer kind's share on a tier as continuous.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..engine.block import MIN_SHARED
from ..engine.layer_graph import REPLAY_OPS
from ..engine.policy import Policy
from ..engine.weights import DECODER_KINDS
from ..models.config import ModelConfig
from ..models.specs import LayerSpec, matmuls
from ..system.hardware import HardwareProfile
from .layout import Layout, Setup, Workload
from .memory_plan import memory_plan, tier_peaks
from .products_cost import (
    codes_kept,
    codes_share,
    codes_win,
    expert_rows,
    fused_decode,
    graph_decode,
    kernel_weight,
    layer_graphed,
    products_time,
)

OPS_PER_PART = 10  # torch ops of decode attention over one more cache part of a batch


@dataclass
class Seg:
    """Seconds waited on I/O, seconds of work on the compute path, and seconds of CPU attention on its worker
    beside a GPU (`side`: pending_attention.py); `by` splits them by resource."""

    wait: float = 0.0
    work: float = 0.0
    by: dict = field(default_factory=lambda: defaultdict(float))
    side: float = 0.0

    def add(self, resource: str, seconds: float, waits: bool, side: bool = False) -> None:
        if side:
            self.side += seconds
        elif waits:
            self.wait += seconds
        else:
            self.work += seconds
        self.by[resource] += seconds

    def __add__(self, other: Seg) -> Seg:
        out = Seg(self.wait + other.wait, self.work + other.work, defaultdict(float, self.by), self.side + other.side)
        for k, v in other.by.items():
            out.by[k] += v
        return out

    def time(self, overlap: bool) -> float:
        return max(self.wait, self.work, self.side) if overlap else self.wait + self.work + self.side


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


def _mapped_read(s: Setup, seg: Seg, nbytes: float) -> None:
    """Pages of a memory-mapped offload file faulted in by an I/O thread (CPU compute): from the page cache
    they are only mapped (no copy; compute then reads them like RAM), else read from the disk, a wait."""
    if not s.disk_cached:
        seg.add("disk", nbytes / s.hw.disk_read, waits=True)


def _disk_write(s: Setup, seg: Seg, nbytes: float) -> None:
    if s.disk_cached:
        _host(s, seg, "page cache", nbytes / s.hw.cached_write)
    else:
        seg.add("disk", nbytes / s.hw.disk_write, waits=True)


def _fetch(s: Setup, layer: LayerSpec, lay: Layout, decode: bool = False) -> Seg:
    """WeightSlots.fetch of one layer: non-resident tensors assembled in their slot. Tensors placed and sized
    alike are priced together (a mixture of experts has hundreds a layer). A decode step keeping the GPU's 4-bit
    matrices as codes (codes_kept) dequantizes only those that crossed the link; the rest: products_time."""
    seg, hw = Seg(), s.hw
    h2d = hw.h2d_pinned if s.policy.pin_weight else hw.h2d_pageable
    kept = decode and codes_kept(s, s.gbs)
    graphed = kept and graph_decode(s)  # a CUDA graph's step multiplies every 4-bit matrix by the kernel
    wins: dict[tuple, bool] = {}  # codes_win by product: a mixture's experts are alike
    alike: Counter = Counter()
    for spec in layer.weights:
        if layer.kind == "head" and spec.hf_name in s.tied:
            continue
        _, c, d = lay.weight(layer.kind, spec)
        dequantized = s.compressed(spec) and not kernel_weight(s, layer.kind, spec.shape)  # kernel ones: products_time
        codes = False
        if kept and dequantized:
            product = (expert_rows(s.gbs, spec.share), spec.shape[1], spec.shape[0])
            if product not in wins:
                wins[product] = graphed or codes_win(s, *product, s.nb)
            codes = wins[product]
        values = math.prod(spec.shape) * ((c + d) if codes else 1) if dequantized else 0
        alike[c, d, s.tensor_bytes(spec), values] += 1
    for (c, d, nbytes, values), count in alike.items():
        nbytes *= count
        if s.cuda:  # weights in compute memory are used in place (compressed ones dequantized there)
            seg.add("link", c * nbytes / h2d + d * nbytes / hw.h2d_pinned, waits=True)
            _disk_read(s, seg, d * nbytes)
        else:  # disk-homed ones are memory-mapped, computed on (or dequantized from) in place
            _mapped_read(s, seg, d * nbytes)
        if values:
            seconds = count * values / hw.dequantize[s.dname]
            if s.cuda:  # on the GPU beside compute, while the next layer's codes cross (WeightSlots): not a wait
                seg.add("dequantize", seconds, waits=False)
            else:
                _host(s, seg, "dequantize", (1 - d) * seconds)  # a CPU dequantizes mapped codes in the compute thread
                seg.add("dequantize", d * seconds, waits=False)
    return seg


def _compute(s: Setup, kind: str, t: int, keys: int | None = None, batch: tuple[int, int] | None = None,
             codes: float = 0.0) -> Seg:
    """Layer math of all GPU batches (models/layers.py), t new tokens per row, a prefill's attending to `keys`
    positions (default t: the full square); batch: (rows, batches) other than the policy's (a shared prefix's
    one row); codes: the share of the layer's 4-bit matrices a decode step keeps as codes (codes_share)."""
    seg, hw, c = Seg(), s.hw, s.config
    h, v = c.hidden_size, c.vocab_size
    gbs, nb = batch or (s.gbs, s.nb)
    rows = gbs * (1 if kind == "head" else t)
    linears = matmuls(s.kinds[kind])  # (in, out, share of the rows) of each, read off the layer's weights
    f, routing = c.intermediate_size, 0  # a row's MLP width: a routed layer's its top experts' and the shared one's
    if c.routed(s.kinds["mlp"].index):
        f = c.experts_per_token * c.expert_size + c.shared_expert_size
        # each (row, expert) pair's hidden state gathered, its expert's output copied, weighted (fp32: Mixtral's),
        # scattered back and summed (layers.experts)
        routing = rows * c.experts_per_token * h * (5 * s.e + 4 * (4 if c.fp32_routing_weights else s.e))
    passes = {"embed": 3 * rows * h * s.e, "attention": 12 * rows * h * s.e,
              "mlp": rows * s.e * (4 * h + 3 * f) + routing,
              "head": rows * v * (s.e + 12)}  # elementwise bytes: norms, rope, residuals, logits to fp32
    bw = hw.device_copy if s.cuda else hw.host_copy
    graphed = t == 1 and graph_decode(s)
    if graphed:  # a CUDA graph's step: every expert over every row (layers.every_expert)
        linears = [(k, n, 1.0) for k, n, _ in linears]
    products, dequantize = products_time(s, kind, rows, nb, linears, codes, graphed)
    seg.add("compute", nb * passes[kind] / bw + products, waits=False)
    if dequantize:
        seg.add("dequantize", dequantize, waits=False)
    if kind == "attention" and t > 1:  # prefill attends over its own k, v (masked, full square)
        sdpa = 4 * gbs * c.num_heads * t * (keys or t) * c.head_dim
        seg.add("compute", nb * sdpa / hw.prefill_attention_rate(s.dname), waits=False)
    if not (graphed or (t == 1 and fused_decode(s))):  # a step without the schedule's Python
        per_layer, per_batch = hw.layer_overhead.get(c.family, hw.layer_overhead["opt"])
        if t == 1 and layer_graphed(s, kind):  # each batch's layer a graph's replay
            per_batch = REPLAY_OPS * hw.op_overhead
        seg.add("overhead", per_layer + nb * per_batch, waits=False)  # measured eager on tiny models
    return seg


def _attention_per_byte(s: Setup, rate: float, on_a_cpu: bool, length: float, dtype: str) -> float:
    """Seconds per byte of a row's cache that decode attention goes over: on a CPU, the positions of a shared
    prompt prefix at the rate measured for reading them from one row (shared_prefix.shared_rows), the rest at
    `rate`."""
    shared = min(shared_positions(s), length) / length if on_a_cpu else 0.0
    return (1 - shared) / rate + shared / s.hw.shared_attention_rate(dtype, rate)


def _link_cache_bytes(s: Setup, tier: str, rows: float, loads: float, stored: float, length: float) -> float:
    """Cache bytes a decode step's loads of a tier's parts bring over the link: from host RAM, a shared prompt
    prefix's positions for one row of each part (KVCache.prefix_reads), the others' rest."""
    shared = min(shared_positions(s), length) if tier == "cpu" else 0
    return rows * stored * (1 - shared / length) + loads * stored * shared / length


def shared_positions(s: Setup) -> int:
    """Prompt positions the prefill computes once per block (the engine shares MIN_SHARED or more)."""
    shared = s.workload.shared_len
    return shared if s.policy.share_prefix and shared >= MIN_SHARED else 0


def _prefill_compute(s: Setup, kind: str) -> Seg:
    """A prefill's layer math: every prompt position of every row, or with a shared prefix (Workload.shared_len,
    Engine._prefix_through) the prefix once as one row, then each row's rest attending to the whole prompt."""
    t, shared = s.workload.prompt_len, shared_positions(s)
    if not shared or kind == "head":
        return _compute(s, kind, t)
    return _compute(s, kind, shared, batch=(1, 1)) + _compute(s, kind, t - shared, keys=t)


def _decode_cache(s: Setup, lay: Layout, length: float) -> Seg:
    """KVCache.load of every part not usable in place, and attention over every part (one layer, all batches)."""
    seg, hw = Seg(), s.hw
    seen = attended_share(s.config, length) * length  # positions kept and read: a windowed layer's window alone
    dense, stored = s.seq_layer_dense * seen, s.seq_layer * seen  # per sequence
    elements = dense / s.e
    cpu_dtype = str(s.cpu_dtype).removeprefix("torch.")  # float16 maybe bfloat16 (Policy.cpu_attention_dtype)
    group = s.config.num_heads // s.config.num_kv_heads
    gpu_att = hw.decode_attention(s.dname, group, s.config.head_dim)
    cpu_att = hw.decode_attention(cpu_dtype, group, s.config.head_dim, on_cpu=True)
    parts = s.nb  # about one part per batch, more where tiers meet
    worker = cpu_worker(s)
    for tier, rows, on_cpu in lay.cache_parts():
        if not rows:
            continue
        parts += tier != "gpu"
        if lay.part_mapped(tier):  # used in place (dequantized from in place when compressed)
            _mapped_read(s, seg, rows * stored)
        if not lay.part_direct(tier, on_cpu):  # KVCache.load into a slot, costed as measured through it
            in_place = tier == "gpu" or (tier == "cpu" and (not s.cuda or on_cpu))
            loads = s.nb * rows / s.n  # parts of this tier, about one per batch holding its rows
            if tier == "disk" and s.cuda:  # read into staging (from the page cache), as measured through it
                fixed, rate = hw.cache_disk_load[s.dname]
                _host(s, seg, "cache load", loads * fixed + rows * stored / rate)
                if not s.disk_cached:
                    seg.add("disk", rows * stored / hw.disk_read, waits=True)
            if s.cuda and not on_cpu and not in_place:  # position-major prefixes, page-locked: one DMA each
                seg.add("link", _link_cache_bytes(s, tier, rows, loads, stored, length) / hw.h2d_pinned, waits=True)
            if s.ccomp is not None:
                fixed, rate = hw.cache_dequantize[s.dname]
                _host(s, seg, "dequantize", loads * fixed + rows * elements / rate)
        codes = None
        if s.ccomp is not None and lay.part_direct(tier, on_cpu):  # codes read as stored where they are
            codes = (hw.device_codes_attention(s.dname, group) or gpu_att if s.cuda and tier == "gpu"
                     else hw.codes_attention(cpu_dtype, group))
        if codes is not None:  # by a CPU (quantized_attention) or a GPU (Triton's; its dense rate unmeasured)
            fixed, rate = codes
            seg.add("cpu attention" if on_cpu else "attention", s.nb * rows / s.n * fixed + rows * stored / rate,
                    waits=False, side=on_cpu and worker)
            continue
        fixed, rate = cpu_att if on_cpu else gpu_att
        seg.add("cpu attention" if on_cpu else "attention", s.nb * rows / s.n * fixed
                + rows * dense * _attention_per_byte(s, rate, on_cpu or not s.cuda, length, cpu_dtype),
                waits=False, side=on_cpu and worker and lay.part_direct(tier, on_cpu))
    seg.add("overhead", (parts - s.nb) * OPS_PER_PART * hw.op_overhead, waits=False)  # one part is in layer_overhead
    if s.ccomp is not None:  # the new token quantized into every part, in the background on a CPU
        if s.cuda:
            seg.add("quantize", parts * hw.cache_store, waits=False)
        else:
            _host(s, seg, "quantize", parts * hw.cache_store)
    return seg


def attended_share(config: ModelConfig, length: float) -> float:
    """The share of a sequence's `length` positions a layer keeps and decode attention reads, on average over the
    layers: a windowed layer's window alone (a ring: kv_cache)."""
    if not config.windows:
        return 1.0
    return sum(min(w, length) if w else length for w in config.windows) / (len(config.windows) * length)


def _prefill_cache_store(s: Setup, lay: Layout) -> Seg:
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
                _host(s, seg, "quantize", seconds)
        elif tier != "disk":
            seg.add("copy", dense / (hw.device_copy if tier == "gpu" or not s.cuda else hw.d2h_pinned), waits=False)
        if tier == "disk":
            _disk_write(s, seg, stored)
    return seg


def _activations(s: Setup, lay: Layout, t: int) -> Seg:
    """Activations.put and get around one layer: device<->host copies in stream order (page-locked buffers);
    files written by an I/O thread, read back in the compute thread."""
    seg, hw = Seg(), s.hw
    nbytes = s.gbs * t * s.config.hidden_size * s.e
    _, cpu, disk = lay.act_batches
    if s.cuda and cpu + disk:
        seg.add("link", (cpu + disk) * nbytes * (1 / hw.d2h_pinned + 1 / hw.h2d_pinned), waits=False)
    if disk:
        _disk_write(s, seg, disk * nbytes)
        read = hw.cached_read if s.disk_cached else hw.disk_read
        seg.add("page cache" if s.disk_cached else "disk", disk * nbytes / read, waits=False)
    return seg


@dataclass
class Phase:
    """One step: a serial part (the first weight fetch) and (multiplicity, segment) per layer."""

    serial: Seg
    segments: list[tuple[int, Seg]]

    def time(self, overlap: bool) -> float:
        return (self.serial.wait + self.serial.work + self.serial.side
                + sum(m * seg.time(overlap) for m, seg in self.segments))

    def by_resource(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for m, seg in [(1, self.serial), *self.segments]:
            for k, v in seg.by.items():
                out[k] += m * v
        return dict(out)


def phase_times(s: Setup, lay: Layout, prefill: bool) -> Phase:
    """The engine's step: fetch(embed); then layer by layer, compute j beside fetch(j+1) and j's cache loads."""
    t = s.workload.prompt_len if prefill else 1
    graphed = not prefill and (graph_decode(s) or layer_graphed(s, "attention"))
    length = s.workload.prompt_len + s.workload.gen_len * (1 if graphed else 0.5)  # a graph attends the whole cache
    # a slot that only one layer uses keeps its weights: after the first step they are not fetched again
    kept = {"embed", "head"} | (set(DECODER_KINDS) if s.config.num_layers <= 2 else set())
    fetch = {k: Seg() if k in kept and not prefill else _fetch(s, spec, lay, not prefill)
             for k, spec in s.kinds.items()}
    rows_t = t - (shared_positions(s) if prefill else 0)  # positions computed per row
    comp = {k: (_prefill_compute(s, k) if prefill else _compute(s, k, t, codes=codes_share(s, lay, k)))
            + _activations(s, lay, rows_t) for k in s.kinds}
    comp["attention"] += _prefill_cache_store(s, lay) if prefill else _decode_cache(s, lay, length)
    layers = s.config.num_layers
    attention = _overlapped(s, _contended(s, comp["attention"] + fetch["mlp"]))
    segments = [(1, comp["embed"] + fetch["attention"]), (layers, attention),
                (layers - 1, comp["mlp"] + fetch["attention"]), (1, comp["mlp"] + fetch["head"]), (1, comp["head"])]
    return Phase(fetch["embed"], [(m, seg) for m, seg in segments if m])


def cpu_worker(s: Setup) -> bool:
    """Whether the engine attends CPU parts on its worker beside the GPU's work (pending_attention.pipelined: the
    batches' hidden states kept on the GPU, attention without capped scores, overlap on)."""
    return (s.cuda and s.policy.cpu_cache_compute and s.policy.overlap and s.config.attn_softcap is None
            and s.policy.percents("act")[0] == 100)


def _overlapped(s: Setup, seg: Seg) -> Seg:
    """A decode layer whose CPU attention runs on the worker: the GPU's work of its first batch waits for that
    batch's CPU attention, and the last batch's CPU attention for its GPU work; the rest overlaps."""
    if not seg.side:
        return seg
    out = seg + Seg()
    out.work, out.side = seg.work + seg.side / s.nb, seg.side + seg.work / s.nb
    return out


def _contended(s: Setup, seg: Seg) -> Seg:
    """A layer whose CPU attention runs while copies cross the link (the cache's share, the next layer's weights):
    both read host RAM, each at its measured share of its rate alone (hw.host_contention) while they overlap, at
    its own once the shorter is done."""
    cpu, link = seg.by.get("cpu attention", 0.0), seg.by.get("link", 0.0)
    f_cpu, f_link = s.hw.host_contention
    if not (s.cuda and cpu and link) or (f_cpu, f_link) == (1.0, 1.0):
        return seg
    if cpu / f_cpu >= link / f_link:  # the copies end first
        slower_cpu, slower_link = link / f_link * (1 - f_cpu), link / f_link - link
    else:
        slower_cpu, slower_link = cpu / f_cpu - cpu, cpu / f_cpu * (1 - f_link)
    out = seg + Seg()
    out.add("cpu attention", slower_cpu, waits=False, side=seg.side > 0)
    out.add("link", slower_link, waits=True)
    return out


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
    setup_s: float = 0.0  # the plan's host RAM first written (num_prompts known, host_touch measured): before its
    # tokens come; what a job of that many prompts waits for beside `throughput`'s time
    job_throughput: float = 0.0  # generated tokens / s over setup_s and the run: what the search maximizes


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
    setup = setup_seconds(s, memory)
    return Prediction(t_pre, t_dec, blocks, tokens / total, s.n / t_dec, max(by, key=by.get), pre.by_resource(), by,
                      memory, peak, s.disk_cached, setup, tokens / (total + setup))


def setup_seconds(s: Setup, memory: dict) -> float:
    """Seconds of first writes to the host RAM a plan takes beyond its weights (the cache, staging and buffers:
    the weights are read in whatever the plan; on a CPU the compute tier is host RAM too), at the profile's rate
    (host_touch). 0 where the job's size is not known (a server, a stream: it is paid once) or the rate was not
    measured."""
    if s.workload.num_prompts is None or not s.hw.host_touch:
        return 0.0
    tiers = ("cpu",) if s.hw.is_cuda else ("cpu", "gpu")
    return sum(v for t in tiers for k, v in memory[t].items() if k != "weights") / s.hw.host_touch
