"""The zig-zag block schedule (FlexGen, Algorithm 1).

    for step in generation steps:
        for layer in layers:
            wait for this layer's weights; prefetch the next layer's
            for batch in the block:
                wait for this batch's cache; prefetch the next batch's (or next layer's first)
                load hidden; compute; store hidden; store the new cache entries (in the background)

Each layer's weights cross the link once per block of batches rather than once per batch.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..kernels.attention import attend_named
from ..kernels.sampling import SamplingConfig
from ..models import layers as L
from ..models.config import ModelConfig
from ..models.specs import LayerSpec
from ..system.devices import ComputeDevice, IOPool, host_available_bytes
from ..system.memory import process_rss, return_freed_memory
from ..system.profile_store import cached_profile
from .activations import Activations
from .batch_inputs import BatchInputs
from .block import Block, layer_mask
from .cache_attention import codes_attended, device_codes_attended, rows_in_part, scatter_rows
from .decode_attention import DecodeAttention
from .decode_fused import FusedDecode
from .decode_graph import StaticDecode, graph_weights, graphs_wanted
from .kv_cache import CacheSlots, KVCache
from .layer_graph import LayerGraphs
from .pending_attention import PendingAttention
from .policy import Policy
from .shared_prefix import SharedPrefix
from .storage import DiskFile, DiskStore, MemoryLedger, Staging
from .trace import COMPUTE, COMPUTE_LANE, GRAPH_ATTENTION, NULL, WAIT, NullRecorder, Recorder
from .transfers import Transfers
from .weight_slots import WeightSlots
from .weights import DECODER_KINDS, StoredWeight, weight_bytes


@dataclass
class StepTimes:
    prefill: float = 0.0
    decode: list[float] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # per step, the attention kernels that ran (sorted, "a+b")
    shared: int = 0  # prompt positions the prefill computed once for all rows (a shared prefix), not per row


class Engine(BatchInputs, DecodeAttention, Transfers):
    def __init__(self, config: ModelConfig, policy: Policy, specs: list[LayerSpec],
                 weights: list[dict[str, StoredWeight]], device: ComputeDevice, dtype: torch.dtype,
                 disk: DiskStore, ledger: MemoryLedger, trace: Recorder | NullRecorder = NULL,
                 sharing: Engine | None = None) -> None:
        """trace: where the schedule's spans go (trace.py; --breakdown, --trace); NULL records nothing. sharing: an
        engine of the same weights in another block shape (block_shapes.py), never run at the same time: its
        staging and weight slots are this one's too (the memory plan counts one set)."""
        self.config, self.policy, self.specs, self.weights = config, policy, specs, weights
        self.device, self.dtype, self.disk, self.ledger = device, dtype, disk, ledger
        self.trace = trace
        self.io = IOPool(policy.overlap)
        self.cpu_worker = IOPool(policy.overlap, workers=1)  # CPU attention beside a GPU (pending_attention.py)
        self._worker_tasks: list[Future] = []  # the running step's (drained if it raises)
        if sharing is not None:
            self.staging, self.weight_slots = sharing.staging, sharing.weight_slots
        else:
            self.staging = Staging(pin=device.is_cuda, ledger=ledger)
            on_disk = weight_bytes(weights, "disk")  # the page cache cannot keep them: bypass it (O_DIRECT reads)
            direct = not DiskFile.page_cache or on_disk > host_available_bytes() // 2
            self.weight_slots = WeightSlots(device, ledger, self.staging, direct)
        self.cache_slots = CacheSlots(ledger, self.staging)
        self.cache: KVCache | None = None
        self.acts: Activations | None = None
        self.rotary = L.Rotary.of(config, device.device)
        self.times = StepTimes()
        self._score = None  # run's `score`
        self._prefix: SharedPrefix | None = None  # the running prefill's shared prefix
        self.prefix_reads: dict[int, dict] = {}  # per batch: KVCache.prefix_reads of the running block
        # per layer, its weights when all are usable where they are (nothing to fetch, wait for or release)
        self.resident = [{n: t.data for n, t in w.items()} if all(t.resident for t in w.values()) else None
                         for w in weights]
        # per layer, whether its weights are fetched in the compute thread, with no I/O thread: resident, or 4-bit
        # codes in compute memory for the CPU's int4 kernel, or any in a CPU's RAM (nothing to read, copy or wait
        # for: a hand-off a layer to a thread on the same cores cost more than it hid)
        on_cpu = not device.host_is_separate
        self.local = [all(t.resident or (t.int4 and t.tier == "gpu")
                          or (on_cpu and t.compression is not None and t.tier != "disk") for t in w.values())
                      for w in weights]
        # a batch without padded rows attends without a mask (CUDA: then flash runs); a CPU keeps its masks
        self.unpadded_without_mask = device.is_cuda
        self._kernels: set[str] = set()  # the attention kernels of the running step
        self.heap_limit: int | None = None  # resident bytes past which freed heap pages go back (_hold_heap)
        self._sinks_on_host: dict[int, torch.Tensor] = {}  # per layer, gpt-oss's sink logits for the CPU's parts
        # decode steps of whole batches from static buffers, one CUDA graph each (decode_graph.py), where all
        # weights are resident or 4-bit codes in compute memory; True on a CPU (tests) runs the same step eagerly
        graphed = graph_weights(weights, self.resident, device.device, dtype, policy.gpu_batch_size) \
            if graphs_wanted() else self.resident
        self.static = StaticDecode(config, policy, specs, graphed, device, dtype, self.rotary, ledger)
        self.static_decode = device.is_cuda and graphs_wanted()
        # where the step is not one graph, its layers each replayed from one (layer_graph.py) where they can be
        self.layer_graphs = LayerGraphs(self.static, policy)
        self.layer_graph_decode = device.is_cuda and graphs_wanted()
        # on a CPU, a Llama-family decode step's layers in one C call where everything is in memory (decode_fused.py)
        self.fused = FusedDecode(config, policy, specs, weights, self.resident, device, dtype, self.rotary)
        self.fused_decode = self.fused.possible

    @contextlib.contextmanager
    def tracing(self, trace: Recorder | NullRecorder):
        """Spans of the enclosed runs go to `trace` (bench's warm-up: NULL, so its steps are not counted)."""
        saved = self.trace
        self.trace = trace
        if self.acts is not None:
            self.acts.trace = trace
        try:
            yield
        finally:
            self.trace = saved
            if self.acts is not None:
                self.acts.trace = saved

    # ---- the schedule -------------------------------------------------------------------------
    def run(self, block: Block, sampling: SamplingConfig, on_step=None, keep_logits: bool = False,
            score=None) -> None:
        """Generate up to block.gen_len tokens for every row of the block, in place.

        With keep_logits, self.logits[step] holds every row's fp32 logits of that step (for tests).
        score(b, active, head, h): called in the prefill for each GPU batch b with its hidden states h (rows,
        prompt_len - block.shared, hidden: the columns the prefill computed per row) at the head, `active` (its
        rows within the batch, None: all) and head(x), the head's fp32 logits of any slice of h: the
        log-likelihood of prompts' positions (scoring.py)."""
        self._score = score
        self._prepare_cache(block)
        self._cache_loads: dict[tuple[int, int], Future] = {}
        try:
            self._run_steps(block, sampling, on_step, keep_logits)
        except BaseException:
            self._drain(quiet=True)
            try:  # copies still queued must not outlive the buffers the unwinding frees
                self.device.synchronize()
            except RuntimeError:
                pass  # a CUDA error: the one being raised says more
            raise
        self._drain()

    def _run_steps(self, block: Block, sampling: SamplingConfig, on_step, keep_logits: bool) -> None:
        if self.acts is None:  # kept across blocks: its host buffers are page-locked once, not per block
            self.acts = Activations(self.policy.num_gpu_batches, self.policy.percents("act"), self.device,
                                    self.disk, self.ledger, self.io, self.staging, self.trace)
        acts = self.acts.reset()
        self.times = StepTimes(shared=block.shared)
        self.logits = [] if keep_logits else None
        self.prefix_reads = {b: self.cache.prefix_reads(b, block.host_pad()[block.rows(b)], block.shared)
                              for b in range(self.policy.num_gpu_batches)} if block.shared else {}
        for step in range(block.gen_len):
            if block.stopped or bool(block.finished.all()):
                break
            start, t = block.step_span(step)
            self._kernels, rows = set(), int((~block.finished).sum())
            tic = time.perf_counter()  # the step's time and its trace mark enclose the same work
            with self.trace.step(step, rows=rows, tokens=t, context=start) as mark:
                self._step(block, step, acts, sampling)
            self.device.synchronize()
            elapsed = time.perf_counter() - tic
            kernels = "+".join(sorted(self._kernels))
            self.times.attention.append(kernels)
            if mark is not None:
                mark.attention = kernels
            self.trace.resolve()
            if step == 0:
                self.times.prefill = elapsed
            else:
                self.times.decode.append(elapsed)
            if on_step is not None:
                on_step(block)

    def _step(self, block: Block, step: int, acts: Activations, sampling) -> None:
        start, t = block.step_span(step)
        self._worker_tasks = []
        self._hold_heap()
        batches = [b for b in range(self.policy.num_gpu_batches) if not block.batch_done(b)]
        if step > 0 and (self.static_decode or self.fused_decode):
            batches = [b for b in batches if not self._static_batch(block, b, step, start, sampling)]
            if not batches:
                block.end_step()
                return
        inputs = {b: self._batch_inputs(block, b, start, t, self._every_row(block, b, step)) for b in batches}
        shared = step == 0 and block.shared > 0
        if shared:
            self._prefix = SharedPrefix(block, self.config, self.rotary, self.dtype, self._attend)
            for b in batches:
                inputs[b]["prefix index"] = self._prefix.index(b, inputs[b]["active_device"])
        self._cache_loads: dict[tuple[int, int], Future] = {}
        self.weight_slots.step_rows = self.policy.gpu_batch_size * t  # a decode step's few rows: codes kept
        self.weight_slots.step_uses = len(batches)
        weights_next, releases = self._prefetch_weights(0), []
        span, C = self.trace.span, COMPUTE_LANE  # stages of the compute lane: trace.py
        for j, spec in enumerate(self.specs):
            if step == 0 and j:  # a prefill's layers each free large tensors of their own
                self._hold_heap()
            weights = self.resident[j]
            if weights is None:
                if self.local[j]:
                    fetched = self.weight_slots.fetch(self.weights[j], self._slot_key(j), self.trace)
                else:
                    with span(WAIT, stream=C):
                        fetched = self._wait(weights_next)
                weights = self.weight_slots.complete(fetched, self.policy.gpu_batch_size * t, self.trace,
                                                     len(batches))
            if releases:  # layer j - 1's pages are out before layer j + 1's come in: one layer mapped per name
                releases.pop().result()
            if j + 1 < len(self.specs):
                weights_next = self._prefetch_weights(j + 1)
            if shared:
                with span(COMPUTE, stream=C):
                    self._prefix.through(spec, weights)
            for i, b in enumerate(batches):
                views = None
                if spec.kind == "attention" and step > 0 and self._in_place[b]:
                    views = self.cache.load(spec.index, b, start, self.cache_slots, 0)
                    self._prefetch_next_cache(spec.index, batches, i, start)
                elif spec.kind == "attention" and step > 0:
                    with span(WAIT, stream=C):  # for the load to be issued, or for the stores it must read back
                        views, inputs[b]["cache ready"] = (self._cache_loads.pop((spec.index, b), None)
                                                           or self._prefetch_cache(spec.index, b, start)).result()
                        self._prefetch_next_cache(spec.index, batches, i, start)
                h = None if spec.kind == "embed" else acts.get(b)
                if isinstance(h, PendingAttention):  # the layer before attended its CPU parts on the worker
                    with span(WAIT, stream=C):
                        h.wait()
                with span(COMPUTE, stream=C):
                    if isinstance(h, PendingAttention):
                        h = h.result()  # its output projection (then the next layer may be a graph's)
                    out = self._graphed_layer(spec, weights, h, block, b, inputs[b], start, step)
                    if out is None:
                        out = self._compute(spec, weights, h, views, block, b, inputs[b], start, t)
                    if spec.kind == "head":
                        active, on_device = inputs[b]["active"], inputs[b]["active_device"]
                        if inputs[b].get("sampled") is not None:  # every row computed, those generating sampled
                            active, on_device = inputs[b]["sampled"]
                            out = out[on_device]
                        block.record(b, block.choose(b, active, on_device, out, sampling), active, on_device)
                if spec.kind == "head":
                    self._keep_logits(block, step, b, out, active)
                else:
                    acts.put(b, out)
            if not self.local[j]:  # unmapping a layer's pages is a syscall per file: off the compute thread
                releases.append(self.io.submit(self.weight_slots.release, self.weights[j]))
        for f in releases:
            f.result()
        self._prefix = None
        block.end_step()

    def _hold_heap(self) -> None:
        """Freed memory is kept for speed (devices.keep_freed_memory), so tensors of other shapes leave holes in the
        heap that no plan counts (a prefill of mixed lengths: 1.7 GiB of holes beside 0.6 GiB in use); past
        `heap_limit` (the budget less what a layer may add, set per block by block_runs) they are given back."""
        if self.heap_limit is not None and process_rss() > self.heap_limit:
            return_freed_memory()

    def _static_batch(self, block: Block, b: int, step: int, start: int, sampling) -> bool:
        """Batch b's whole decode step at once (a CUDA graph's replay, or on a CPU its layers in one C call),
        when it can run so; False: it did not, the schedule below computes it."""
        runner = self.static if self.static_decode else self.fused
        if not runner.usable(block, b, self.cache, self._in_place[b], self.acts):
            return False
        with self.trace.span(COMPUTE, stream=COMPUTE_LANE):
            done = runner.run(self.cache, block, b, start)
            if done is None:
                return False
            logits, kernel = done
            self._kernels.add(kernel)
            active = block.active_rows(b)  # those generating choose
            if active is not None and logits.shape[0] != len(active):  # a graph computed every row, each on its own
                logits = logits[active]
            on_device = None if active is None else block.device_rows(b, active)
            block.record(b, block.choose(b, active, on_device, logits, sampling), active, on_device)
        self._keep_logits(block, step, b, logits, active)
        return True

    def _graphed_layer(self, spec, weights, h, block: Block, b: int, inputs: dict, start: int, step: int):
        """Decoder layer `spec` of batch b's decode step as a CUDA graph's replay (layer_graph.py) where it can run
        so; None: the caller computes it eagerly."""
        if not (self.layer_graph_decode and step > 0 and spec.kind in DECODER_KINDS
                and self.layer_graphs.usable(spec, weights, h, self.cache, b, inputs, self.acts, self._in_place[b])):
            return None
        if spec.kind != "attention":
            return self.layer_graphs.run(spec, weights, h, self.cache, block, b, start)
        # its own stage: the layer's projections and attention in one replay, which no span can split
        with self.trace.span(GRAPH_ATTENTION, stream=COMPUTE_LANE):
            out = self.layer_graphs.run(spec, weights, h, self.cache, block, b, start)
        if out is not None:
            self._kernels.add(f"graph+{self.static.kernel}")
        return out

    def _keep_logits(self, block: Block, step: int, b: int, logits: torch.Tensor, active) -> None:
        """Batch b's logits of this step into self.logits (keep_logits), and its rows' logprobs into the block's
        (block.logprobs)."""
        if block.logprobs is not None:
            block.keep_logprobs(b, logits, active)
        if self.logits is None:
            return
        if len(self.logits) == step:
            self.logits.append(torch.full((block.tokens.shape[0], logits.shape[-1]), float("nan")))
        rows = self.logits[step][block.rows(b)]
        rows[slice(None) if active is None else active] = logits.cpu()

    def _compute(self, spec, w, h, views, block: Block, b: int, inputs, start: int, t: int):
        cfg = self.config
        if isinstance(h, PendingAttention):
            h = h.result()
        if spec.kind == "embed":
            tokens = block.tokens[block.rows(b), start:start + t]
            if inputs["active"] is not None:
                tokens = tokens[inputs["active_device"]]
            return L.embed(w, tokens, inputs["positions"], cfg)
        if spec.kind == "mlp":
            return L.mlp(w, h, cfg)
        if spec.kind == "head":
            if self._score is not None and block.generated == 0:  # the prefill's (from column block.shared)
                self._score(b, inputs["active"], lambda x: L.head(w, x, cfg), h)
            return L.head(w, h[:, -1], cfg)
        x = L.block_input(h, w, cfg)
        q, k, v = L.qkv(w, x, L.layer_rope(inputs["rope"], cfg, spec.index), cfg)
        if views is None:  # prefill: attend over the prompt's own k, v; then fill the cache (read by later steps)
            if "prefix index" in inputs:
                k, v = self._prefix.spread(k, v, inputs["prefix index"])
            attn = self._attend(q, k, v, layer_mask(inputs, cfg, spec.index), L.sinks(w, cfg))
            for part in self.cache.parts[spec.index][b] if block.gen_len > 1 else ():
                picked, local = rows_in_part(inputs, part.rows, k.device)
                k_part, v_part = k[picked], v[picked]
                if local is not None:  # rows that left (filler rows) get zeros
                    k_part, v_part = scatter_rows(k_part, local, part.rows), scatter_rows(v_part, local, part.rows)
                self._store_cache(spec.index, b, part, k_part, v_part, 0)
        else:
            attn = self._decode_attention(spec.index, b, views, q, k, v, inputs, start, L.sinks(w, cfg))
            if isinstance(attn, PendingAttention):
                return attn.then(lambda a, w=w, h=h: L.attention_output(w, a, h, cfg))
        return L.attention_output(w, attn, h, cfg)

    def _attend(self, q, k, v, mask, sinks=None) -> torch.Tensor:
        out, kernel = attend_named(q, k, v, mask, softcap=self.config.attn_softcap, sinks=sinks)
        self._kernels.add(kernel)
        return out

    def cpu_attention_dtype(self) -> torch.dtype | None:
        """Policy.cpu_attention_dtype by this machine's profile where one is measured (the cost model's choice)."""
        cfg = self.config
        return self.policy.cpu_attention_dtype(self.dtype, cached_profile(self.device, self.policy.offload_dir),
                                               cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)

    def _prepare_cache(self, block: Block) -> None:
        max_len = block.prompt_len + block.gen_len
        if self.cache is None or self.cache.max_len < max_len:
            self.free_cache()
            self.cache = KVCache(self.config.num_layers, self.policy.num_gpu_batches, self.policy.gpu_batch_size,
                                 max_len, self.config.num_kv_heads, self.config.head_dim, self.dtype,
                                 self.policy.percents("cache"), self.device, self.disk, self.ledger,
                                 self.policy.cache_compression(), self.cpu_attention_dtype(),
                                 [self.config.cached_positions(i, max_len) for i in range(self.config.num_layers)],
                                 codes_attended(self.config, self.policy), self.policy.cpu_attention_percent,
                                 device_codes_attended(self.config, self.policy, self.device.device, self.dtype))
        if block.gen_len > 1:
            self.cache.reserve_slots(self.cache_slots)
        # per batch: every cache part used where it is (views only: nothing to load, wait for or store back)
        self._in_place = [all(p.direct and not (p.k.mapped or p.v.mapped) for p in parts)
                          for parts in self.cache.parts[0]]
        self._pending_stores: dict[tuple[int, int], list[Future]] = {}
        self._load_count = 0

    def free_cache(self) -> None:
        """Drop the KV cache and its slots (before a longer one is checked and made: no room counted twice)."""
        self.cache = None
        self.static.reset()
        self.layer_graphs.reset()
        self.fused.reset()
        self.cache_slots.buffers.clear()
        if self.device.is_cuda:
            torch.cuda.empty_cache()  # what they held counts as free for mem_get_info again

    def _drain(self, quiet: bool = False) -> None:
        """Wait for the block's last background cache writes (their errors surface here, and the next block
        cannot write a file still being written) and for prefetches a finished step no longer needs."""
        pending = [f for fs in self._pending_stores.values() for f in fs] + list(self._cache_loads.values())
        pending += self._worker_tasks  # CPU attention still reading or writing a part (a step that raised)
        self._pending_stores, self._cache_loads, self._worker_tasks = {}, {}, []
        for f in pending:
            if quiet:
                f.exception()  # waits; the error being raised already says what went wrong
            else:
                f.result()

    def close(self) -> None:
        self.io.close()
        self.cpu_worker.close()
