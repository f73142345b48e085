"""Predicted prefill and decode times of a policy, mirroring what the engine (engine/block_schedule.py) does
(memory: memory_plan.py).

Per step, for every layer j the engine waits for j's weights, starts fetching j+1's, and computes j for
each GPU batch while the next batch's cache loads. So a step is the first fetch, then per layer
max(I/O waited on while j computes, compute of j) with overlap (their sum without); on a CPU-only machine
memory copies, dequantization and page-cache reads run on the same cores as compute, so they count with
compute there, and only cold disk reads overlap. Decode is costed at the mean context, prompt + gen/2.
What the matrix products cost (dense, the CPU's int4 kernel as kernels/int4_cost.py chooses, a GPU's 4-bit codes,
fused C layers, CUDA graphs): products_cost.py; the cache's loads, attention and stores: cache_cost.py; the unit,
a layer's seconds by resource (Seg): segments.py.

Each cost is affine in the placement fractions for a fixed "regime" (is all cache attended in place?):
`policy_search` reads the LP's coefficients off `phase_times` by evaluating it at unit placements, and
checks its rounded answer with the exact `Layout.of_policy`. Weights are placed as whole tensors
(`weights.weight_tiers`); the LP treats each layer kind's share on a tier as continuous.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..engine.layer_graph import REPLAY_OPS
from ..engine.policy import Policy
from ..engine.weights import DECODER_KINDS
from ..models.config import ModelConfig
from ..models.specs import LayerSpec, matmuls
from ..system.hardware import HardwareProfile
from .cache_cost import decode_cache, prefill_cache_store, shared_positions
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
from .segments import Seg, disk_read, disk_write, mapped_read, on_host


# ---- time ------------------------------------------------------------------------------------------------------
def _fetch(s: Setup, layer: LayerSpec, lay: Layout, decode: bool = False) -> Seg:
    """WeightSlots.fetch of one layer: non-resident tensors assembled in their slot. Tensors placed and sized
    alike are priced together (a mixture of experts has hundreds a layer). A decode step keeping 4-bit matrices in
    compute memory as codes (codes_kept) dequantizes only those that crossed the link (a CPU: were mapped from
    disk); the rest: products_time."""
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
        crossed = (c + d) if s.cuda else d  # kept as codes: those that crossed the link, or a CPU's mapped ones
        values = math.prod(spec.shape) * (crossed if codes else 1) if dequantized else 0
        alike[c, d, s.tensor_bytes(spec), values] += 1
    mapped = 0.0  # bytes of the layer's weights a CPU maps from disk
    for (c, d, nbytes, values), count in alike.items():
        nbytes *= count
        if s.cuda:  # weights in compute memory are used in place (compressed ones dequantized there)
            seg.add("link", c * nbytes / h2d + d * nbytes / hw.h2d_pinned, waits=True)
            disk_read(s, seg, d * nbytes)
        else:  # disk-homed ones are memory-mapped, computed on (or dequantized from) in place
            mapped_read(s, seg, d * nbytes)
            mapped += d * nbytes
        if values:
            seconds = count * values / hw.dequantize[s.dname]
            if s.cuda:  # on the GPU beside compute, while the next layer's codes cross (WeightSlots): not a wait
                seg.add("dequantize", seconds, waits=False)
            else:
                on_host(s, seg, "dequantize", (1 - d) * seconds)  # a CPU dequantizes mapped codes in the compute thread
                seg.add("dequantize", d * seconds, waits=False)
    if mapped:  # the engine's work per layer mapped (its share on disk: affine in the placement for the LP)
        per_layer = hw.mapped_overheads(s.policy.overlap)[0]
        seg.add("mapped pages", mapped / sum(n * k for (_, _, n, _), k in alike.items()) * per_layer, waits=False)
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


def _prefill_compute(s: Setup, kind: str) -> Seg:
    """A prefill's layer math: every prompt position of every row, or with a shared prefix (Workload.shared_len,
    Engine._prefix_through) the prefix once as one row, then each row's rest attending to the whole prompt."""
    t, shared = s.workload.prompt_len, shared_positions(s)
    if not shared or kind == "head":
        return _compute(s, kind, t)
    return _compute(s, kind, shared, batch=(1, 1)) + _compute(s, kind, t - shared, keys=t)


def _activations(s: Setup, lay: Layout, t: int) -> Seg:
    """Activations.put and get around one layer: device<->host copies in stream order (page-locked buffers);
    files written by an I/O thread, read back in the compute thread."""
    seg, hw = Seg(), s.hw
    nbytes = s.gbs * t * s.config.hidden_size * s.e
    _, cpu, disk = lay.act_batches
    if s.cuda and cpu + disk:
        seg.add("link", (cpu + disk) * nbytes * (1 / hw.d2h_pinned + 1 / hw.h2d_pinned), waits=False)
    if disk:
        disk_write(s, seg, disk * nbytes)
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
    comp["attention"] += prefill_cache_store(s, lay) if prefill else decode_cache(s, lay, length)
    layers = s.config.num_layers
    attention = _overlapped(s, _contended(s, comp["attention"] + fetch["mlp"]))
    segments = [(1, comp["embed"] + fetch["attention"]), (layers, attention),
                (layers - 1, comp["mlp"] + fetch["attention"]), (1, comp["mlp"] + fetch["head"]), (1, comp["head"])]
    return Phase(fetch["embed"], [(m, seg) for m, seg in segments if m])


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
