"""A decode step of one GPU batch with constant shapes, replayed as one CUDA graph (issue 21).

With everything resident, a decode step is host-bound: ~30 kernel launches per layer from Python. Here the whole
step of a batch (embedding, every layer, the head) is one function of static buffers: the input ids, the pad of
each row and the position written, a 1-element device tensor. Attention reads the cache's whole max_len (a windowed
layer's ring: kv_cache) under a mask built on the device from that position (later positions and left padding
hidden), and the new k, v are written with `index_copy_` at it (in a ring, at it modulo the window), so every
decode step of a block has the same shapes and addresses: captured once per batch (and cache), replayed each step.
Sampling stays outside (generators, host logic). 4-bit matrices held as codes in GPU memory (`--compress-weight`
with the weights there) are multiplied as stored by Triton's kernel inside the graph (graph_weights): the eager
step's per-product choice and launches are where its host time went (the H100's OPT-13B row: 1.75 ms a layer and
batch against ~0.45 of device time).

On a CPU (tests) the same function runs eagerly. When capturing or the first replay fails, a warning says why
once and the engine's eager path runs for the rest of the process."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from ..kernels import attention, int4_gemv_triton
from ..kernels.attention import fold_groups, sdpa_backends
from ..kernels.int4_gemv_triton import CodesMatrix
from ..models import layers as L
from ..system.hardware import interpolated_time
from ..system.profile_store import cached_profile
from .weight_slots import codes_in_memory

ENV = "FLEXGEN_LITE_CUDA_GRAPHS"  # "1": capture decode steps on CUDA; "0": never
DEFAULT = "1"
_failed: list[str] = []  # why capturing failed, once: the eager path from then on, in this process
EVERY_EXPERT_ROWS = 128  # without a profile: rows x experts / top-k at most this (a GPU's products still read-bound)


def failures() -> list[str]:
    """Why capturing decode steps as CUDA graphs failed in this process (empty: it never did)."""
    return list(_failed)


def graphs_wanted() -> bool:
    return os.environ.get(ENV, DEFAULT) == "1"


def every_expert_wins(hw, config, dtype: str, rows: int) -> bool:
    """Whether a MoE model's decode step of `rows` rows costs less with every routed expert over every row (constant
    shapes: a CUDA graph) than eagerly with each over its own (an even share of the rows), by the profile `hw`:
    every expert's products at all the rows against theirs at their share plus the eager schedule's measured
    overhead per layer. Without a profile, where rows x experts / top-k <= EVERY_EXPERT_ROWS. A dense model: True."""
    if not config.moe:
        return True
    experts, k = config.num_experts, config.experts_per_token
    if hw is None:
        return rows * experts / k <= EVERY_EXPERT_ROWS
    h, f = config.hidden_size, config.expert_size

    def products(n: int) -> float:  # an expert's gate, up and down over n rows
        return 2 * hw.matmul_time(dtype, n, h, f) + hw.matmul_time(dtype, n, f, h)

    share = max(1, math.ceil(rows * k / experts))
    per_layer, per_batch = hw.layer_overhead.get(config.family, hw.layer_overhead["opt"])
    return experts * products(rows) <= experts * products(share) + per_layer + per_batch


def graph_weights(weights: list[dict], resident: list, device: torch.device, dtype: torch.dtype,
                  rows: int) -> list[dict | None]:
    """Per layer, the weights a graphed step multiplies: its resident tensors (engine.resident), or, where each of
    the others is a 4-bit matrix held as codes in compute memory that the kernel reads at `rows` rows (on CUDA,
    its self-check passed), those as CodesMatrix without a slot (the kernel alone); None where a weight must be
    fetched."""
    out = []
    for stored, tensors in zip(weights, resident, strict=True):
        codes = [t for t in stored.values() if not t.resident]
        if tensors is not None or not (0 < rows <= int4_gemv_triton.GEMV_ROWS) or not all(
                codes_in_memory(t, device) and (device.type != "cuda" or int4_gemv_triton.refusal(
                    device, dtype, t.compression.group_size) is None) for t in codes):
            out.append(tensors)
            continue
        out.append({n: t.data if t.resident else CodesMatrix(t.data, None) for n, t in stored.items()})
    return out


def codes_graph_wins(hw, family: str, codes: list[list[tuple[int, int]]], dtype: str, rows: int,
                     batches: int) -> bool:
    """Whether a graphed step whose layers hold 4-bit matrices as codes (`codes`: per layer, their (N, K) shapes)
    costs less by the profile `hw` than the eager schedule: `batches` products by the kernel per matrix, against
    what the eager step runs for each (the kernel, or one dequantization into its slot and `batches` dense
    products: the faster) plus its measured overhead per layer. Without the kernel's measured points: True (a
    replay costs no launches)."""
    points = None if hw is None else (hw.int4_gemv or {}).get(dtype)
    if not points:
        return True
    graphed = eager = 0.0
    per_layer, per_batch = hw.layer_overhead.get(family, hw.layer_overhead["opt"])
    for shapes in codes:
        for n, k in shapes:
            kernel = batches * interpolated_time(points, rows, k, n)
            graphed += kernel
            eager += min(kernel, n * k / hw.dequantize[dtype] + batches * hw.matmul_time(dtype, rows, k, n))
        eager += per_layer + batches * per_batch if shapes else 0.0
    return graphed <= eager


def codes_shapes(layers: list) -> list[list[tuple[int, int]]]:
    """Per layer of graph_weights, the shapes of its matrices held as codes."""
    return [[tuple(w.shape) for w in (layer or {}).values() if isinstance(w, CodesMatrix)] for layer in layers]


def row_attention(hw, config, dtype: str, length: int) -> tuple[float, float]:
    """(seconds a call, seconds a row) of a layer's decode attention over `length` cached positions on the
    compute device, by the profile `hw`: a row's K and V bytes at the measured rate."""
    fixed, rate, pair = hw.decode_attention(dtype, config.num_heads // config.num_kv_heads, config.head_dim)
    return fixed, config.num_kv_heads * (pair + 2 * config.head_dim * length * getattr(torch, dtype).itemsize / rate)


def replay_wins(hw, config, specs, resident: list, dtype: str, rows: int, active: int, length: int) -> bool:
    """Whether a replayed step over all `rows` rows of a batch (finished ones computed too) costs less by the
    profile `hw` than the eager step over the `active` rows still generating plus the eager schedule's measured
    overhead per layer: every layer's products (its 2-D weights but the embedding's) and attention over `length`
    positions at each row count. Without a profile: True (replays cost no launches)."""
    if hw is None or active >= rows:
        return True
    matrices = [tuple(w.shape) for spec, layer in zip(specs, resident, strict=True) if spec.kind != "embed"
                for w in layer.values() if isinstance(w, (torch.Tensor, CodesMatrix)) and len(w.shape) == 2
                and min(w.shape) > 1]
    fixed, per_row = row_attention(hw, config, dtype, length)

    def step(n: int) -> float:
        products = sum(hw.matmul_time(dtype, n, k, m) for m, k in matrices)
        return products + config.num_layers * (fixed + n * per_row)

    per_layer, per_batch = hw.layer_overhead.get(config.family, hw.layer_overhead["opt"])
    return step(rows) <= step(active) + len(resident) * (per_layer + per_batch)


def capture_graph(forward, pool) -> torch.cuda.CUDAGraph:
    """torch's recipe: warm up on a side stream (kernels loaded, cuBLAS workspaces made), then capture one call
    of `forward` into a graph whose intermediates live in the private memory `pool`."""
    side = warmup_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the I/O threads may touch CUDA meanwhile without invalidating the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        forward()
    return graph


@functools.cache
def warmup_stream(device: int) -> torch.cuda.Stream:
    """One side stream per GPU for every capture's warm-up: cuBLAS keeps a workspace per stream it ran on, for
    good, and a new torch stream a capture would walk its pool of 32 (hundreds of layer graphs: ~1 GiB outside
    the memory plan)."""
    return torch.cuda.Stream(device)


def pool_bytes(pool) -> int:
    """Bytes the CUDA caching allocator holds in the private memory pool `pool` (0 where torch does not say)."""
    try:
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if tuple(seg.get("segment_pool_id", ())) == tuple(pool))
    except Exception:  # noqa: BLE001 - a statistic only
        return 0


def check_replay(replayed: torch.Tensor, eager: torch.Tensor | None, logits: bool = True) -> None:
    """A graph's first replay gives the eager run's output for the same inputs (the same kernels: equal up to
    the rounding of another matmul algorithm) and, for `logits`, the same greedy tokens (a hidden state's largest
    entry is no token: a near tie there may flip harmlessly); else it raises, and the engine runs eagerly. Guards
    against a value baked into the graph at capture, which would go wrong without an error."""
    if eager is None:
        return
    scale = 1.0 + float(eager.abs().max())
    diff = float((replayed - eager).abs().max())
    if not diff <= 1e-2 * scale or (logits and not torch.equal(replayed.argmax(-1), eager.argmax(-1))):
        raise RuntimeError(f"the replayed graph's output differs from the eager run's by {diff:.3g}")


@dataclass
class _Batch:
    """Static inputs and outputs of one GPU batch's step, and its graph once captured."""

    cache: object  # the KVCache whose tensors the graph reads and writes (a new cache: captured again)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per attention layer, (k, v) of (rows, kv_heads, positions, D)
    ids: torch.Tensor  # (rows, 1) the tokens fed
    pad: torch.Tensor  # (rows,) left padding of each row
    write: torch.Tensor  # (1,) the cache position written
    logits: torch.Tensor | None = None  # (rows, vocab) fp32, the graph's output
    graph: torch.cuda.CUDAGraph | None = None
    replayed: bool = False


class StaticDecode:
    """Decode steps of whole GPU batches from static buffers: captured and replayed on CUDA, eager elsewhere."""

    def __init__(self, config, policy, specs, weights: list, device, dtype: torch.dtype, rotary, ledger) -> None:
        """weights: per layer what the step multiplies (graph_weights), or None when a weight must be fetched
        (then never used)."""
        self.config, self.specs, self.weights = config, specs, weights
        # every layer's weights usable where they are (4-bit codes too, where the graph wins with them), every
        # cached position attended (no top-k), a MoE's experts each over every row where that wins for its rows
        hw, name, rows = cached_profile(device), str(dtype).removeprefix("torch."), policy.gpu_batch_size
        codes = codes_shapes(weights)
        self.possible = (all(w is not None for w in weights) and policy.attn_sparsity == 1
                         and (not config.moe or (every_expert_wins(hw, config, name, rows) and not any(codes)))
                         and codes_graph_wins(hw, config.family, codes, name, rows, policy.num_gpu_batches))
        self.device, self.dtype, self.rotary, self.ledger = device, dtype, rotary, ledger
        self.capture = device.is_cuda  # False: the step runs eagerly (a CPU; tests)
        self.batches: dict[int, _Batch] = {}
        self.pool, self.pool_counted = None, 0  # the graphs' private memory pool, and its bytes on the ledger
        self.kernel: str | None = None  # the SDPA kernel the step's attention runs
        self.captures = 0
        self.policy_rows = policy.gpu_batch_size
        self._replays: dict[tuple[int, int], bool] = {}  # (rows still generating, max_len) -> replay all rows

    def reset(self) -> None:
        """Drop the graphs and buffers (they hold the cache's tensors: a cache replaced must be freed)."""
        self.batches.clear()
        self.pool, self.pool_counted = None, 0

    @property
    def failed(self) -> bool:
        return self.capture and bool(_failed)

    def usable(self, block, b: int, cache, in_place: bool, acts) -> bool:
        """Whether batch b's decode step can run here: its whole cache in compute memory used in place
        (`in_place`: one uncompressed part attended on the device), its activations there. Rows that finished
        (eos, fillers) are computed with the others and not sampled (BlockSchedule._static_batch) where the profile
        finds the replay over every row cheaper than the eager step over those left and its launches
        (`replay_wins`: a small model's tail of a batch, not a large cache's)."""
        if not self.possible or self.failed or not in_place:
            return False
        active = block.active_rows(b)
        if self.capture and active is not None and not self._replay_wins(block, len(active)):
            return False
        if not acts._in_place(acts.tiers[b]):
            return False
        parts = cache.parts[0][b]
        return (len(parts) == 1 and not parts[0].on_cpu and not parts[0].quantized
                and parts[0].k.tensor.device.type == self.device.device.type)

    def _replay_wins(self, block, active: int) -> bool:
        """`replay_wins` for this batch's rows with `active` still generating, at the block's full length (the
        replayed step reads the whole max_len), by this machine's stored profile; decided once per count."""
        key = (active, block.prompt_len + block.gen_len)
        if key not in self._replays:
            self._replays[key] = replay_wins(cached_profile(self.device), self.config, self.specs, self.weights,
                                             str(self.dtype).removeprefix("torch."), self.policy_rows, active, key[1])
        return self._replays[key]

    def run(self, cache, block, b: int, start: int) -> tuple[torch.Tensor, str] | None:
        """Batch b's logits (rows, vocab) for the tokens at `start` and the kernel name; None when capturing
        failed (the caller runs the eager path: what was written into the cache it writes again)."""
        s = self.batches.get(b)
        if s is None or s.cache is not cache:
            s = self.batches[b] = self._buffers(cache, b)
        s.ids.copy_(block.tokens[block.rows(b), start:start + 1])
        s.pad.copy_(block.pad[block.rows(b)])
        s.write.fill_(start)
        if not self.capture:
            return self._forward(s), f"static+{self.kernel}"
        try:
            eager = self._capture(s) if s.graph is None else None
            s.graph.replay()
            if not s.replayed:
                self.device.synchronize()  # a failed first replay surfaces here
                check_replay(s.logits, eager)
                s.replayed = True
        except Exception as e:  # noqa: BLE001 - whatever failed, the eager path is known to work
            reason = (str(e).splitlines() or [""])[0]
            _failed.append(reason)
            self.batches.clear()
            if len(_failed) == 1:
                warnings.warn(f"CUDA graphs for decode steps failed here ({type(e).__name__}: {reason}); "
                              f"decode steps run eagerly from now on (set {ENV}=0 to skip them)", stacklevel=3)
            return None
        return s.logits, f"graph+{self.kernel}"

    def _capture(self, s: _Batch) -> torch.Tensor:
        """Batch s's step captured (its first run eager, which makes the logits buffer outside the graph);
        what the graphs' pool grew by counted on the ledger while this batch's graph lives. Returns the eager
        run's logits, which the first replay of the same inputs must give again (check_replay)."""
        cuda = self.device.is_cuda
        with torch.cuda.device(self.device.device) if cuda else contextlib.nullcontext():
            s.logits = self._forward(s)
            eager = s.logits.clone()
            if cuda and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()  # one pool: the batches' graphs never run at once
            s.graph = capture_graph(lambda: self._forward(s), self.pool)
        self.captures += 1
        if cuda:
            pool = pool_bytes(self.pool)
            grown, self.pool_counted = pool - self.pool_counted, max(pool, self.pool_counted)
            if grown > 0:
                self.ledger.track(s, "gpu", grown)
        return eager

    def _buffers(self, cache, b: int) -> _Batch:
        parts = cache.parts
        kv = [(parts[spec.index][b][0].k.tensor, parts[spec.index][b][0].v.tensor)
              for spec in self.specs if spec.kind == "attention"]
        rows, where = kv[0][0].shape[0], kv[0][0].device
        return _Batch(cache, kv, torch.zeros(rows, 1, dtype=torch.long, device=where),
                      torch.zeros(rows, dtype=torch.long, device=where), torch.zeros(1, dtype=torch.long, device=where))

    def _forward(self, s: _Batch) -> torch.Tensor:
        """The step, plain torch over the static buffers (no host values: a graph would bake them in)."""
        cfg = self.config
        positions = (s.write - s.pad[:, None]).clamp(min=-1)  # (rows, 1), as Block.positions
        slots = {n: self._slots(s, n) for n in {k.shape[2] for k, _ in s.kv}}  # a full cache's, each ring's
        rope = None if self.rotary is None else self.rotary.tables(positions, self.dtype)
        h = logits = None
        for spec, w in zip(self.specs, self.weights, strict=True):
            if spec.kind == "embed":
                h = L.embed(w, s.ids, positions, cfg)
            elif spec.kind == "head":
                logits = L.head(w, h[:, -1], cfg)
            else:
                h = self.layer(spec, w, h, s.kv, slots, rope)
        if s.logits is not None:
            s.logits.copy_(logits)
            return s.logits
        return logits

    def layer(self, spec, w: dict, h: torch.Tensor, kv: list, slots: dict, rope) -> torch.Tensor:
        """A decoder layer of the static step (`spec` of kind attention or mlp, weights `w`) on hidden states h:
        attention writes the new k, v into its layer's cache `kv[spec.index]` at the slot and attends the whole
        cache under the mask, both from `slots` (by capacity: _slots); rope: the rows' tables."""
        cfg = self.config
        if spec.kind == "mlp":
            return L.mlp(w, h, cfg, every_row=True)
        x = L.block_input(h, w, cfg)
        q, k, v = L.qkv(w, x, L.layer_rope(rope, cfg, spec.index), cfg)
        k_cache, v_cache = kv[spec.index]
        slot, seen = slots[k_cache.shape[2]]
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
        return L.attention_output(w, self._attend(q, k_cache, v_cache, seen, L.sinks(w, cfg)), h, cfg)

    @staticmethod
    def _slots(s: _Batch, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """In a cache of `capacity` positions (max_len, or a ring: kv_cache.ring_positions), the slot written and the
        mask (rows, 1, 1, capacity) of the slots holding a position attended: written, not left padding (as
        Block.mask), the written one always."""
        keys = torch.arange(capacity, device=s.write.device)
        held = s.write - (s.write - keys) % capacity  # negative: nothing yet
        mask = (held >= 0) & ((held >= s.pad[:, None]) | (held == s.write))
        return s.write % capacity, mask[:, None, None]

    def _attend(self, q, k, v, mask, sinks=None) -> torch.Tensor:
        """q (rows, heads, 1, D) over the whole cache under `mask`: the Triton split-KV kernel where chosen
        (attention.decode_attend, sinks too), else SDPA with grouped heads folded (attention.fold_groups). Capped
        scores (Gemma-2), and sinks (gpt-oss) where the Triton kernel is not chosen: from the whole scores
        (scored_attend), whose shapes are as constant as the cache's."""
        cap = self.config.attn_softcap
        chosen = attention.decode_attend(q, k, v, mask, graphed=self.capture, sinks=sinks) if cap is None else None
        if chosen is not None:
            self.kernel = self.kernel or chosen[1]
            return chosen[0]
        if cap is not None or sinks is not None:
            self.kernel = self.kernel or ("softcap" if cap is not None else "sinks")
            return attention.scored_attend(q, k, v, mask, cap, sinks)
        qf, mf = fold_groups(q, mask, k.shape[1]) if k.shape[1] != q.shape[1] else (q, mask)
        if q.device.type != "cuda":
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)
            self.kernel = self.kernel or f"sdpa-{q.device.type}"
            return out.reshape(q.shape)
        with sdpa_kernel(sdpa_backends("cuda", q.dtype, True), set_priority=True):
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)
            if self.kernel is None and not torch.cuda.is_current_stream_capturing():
                self.kernel = attention._picked(qf, k, v, mf, False, False)
        return out.reshape(q.shape)
