"""A decode step's layers one at a time as CUDA graphs, where the schedule streams weights through slots (issue 21).

Where a layer's weights cross the link, or are dequantized into a slot, every step, the whole step cannot be one
graph (decode_graph.py), but each layer's compute for a GPU batch can: its weights sit in the same slot whenever that
kind of layer and parity runs (WeightSlots: one buffer per kind, parity and name), its cache part in place, and the
batch's hidden state in one of two static buffers (a layer reads one and writes the other, so that the eager run,
the warm-ups and the capture all read the same input). A graph is keyed by what it baked in (the weights'
addresses, the batch, the buffer it reads, an attention layer's cache), captured the first time and replayed after
(one a layer and batch: each layer's norms and biases are resident, its own). The math is StaticDecode.layer's
(attention over the whole cache under a mask built on the device, the new k, v written at the device-side position).

The H100's traces (2026-12-06) have a layer and batch of the offloaded OPT-13B rows at 0.3-0.9 ms of host time for
~30 launches, where its device time was 0.2-0.45 ms; a replay is one launch. On a CPU (tests) the same layer runs
eagerly. A failed capture or a first replay that disagrees with the eager run warns once, and the eager schedule
runs from then on."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from ..system.profile_store import cached_profile
from .decode_graph import ENV, StaticDecode, capture_graph, check_replay, pool_bytes, row_attention

_failed: list[str] = []  # why capturing failed, once: the eager schedule from then on, in this process
REPLAY_OPS = 3  # a replay's host time, in the profile's torch calls (its key, checks and launch)


def failures() -> list[str]:
    """Why capturing decode layers as CUDA graphs failed in this process (empty: it never did)."""
    return list(_failed)


@dataclass
class _Batch:
    """A GPU batch's static inputs: left padding, the position written, its two hidden-state buffers."""

    cache: object
    pad: torch.Tensor  # (rows,)
    write: torch.Tensor  # (1,)
    hidden: tuple[torch.Tensor, torch.Tensor]  # (rows, 1, hidden) each
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by layer, its part's k and v
    block: object = None  # the block and position `pad` and `write` hold
    start: int = -1


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    replayed: bool = False


class LayerGraphs:
    """Decode-step layers of a batch, each a CUDA graph replayed where the eager schedule runs it (block_schedule)."""

    def __init__(self, static: StaticDecode, policy) -> None:
        self.static, self.capture = static, static.capture
        self.possible, self.rows = policy.attn_sparsity == 1, policy.gpu_batch_size
        self._every_row: dict[tuple[int, int], bool] = {}  # (rows generating, length) -> every_row_wins
        self.batches: dict[int, _Batch] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.pool, self.pool_counted = None, 0
        self.captures = 0

    def reset(self) -> None:
        """Drop the graphs and buffers (they hold the cache's tensors: a cache replaced must be freed)."""
        self.batches.clear()
        self.graphs.clear()
        self.pool, self.pool_counted = None, 0

    def every_row_wins(self, block, active: int) -> bool:
        """Whether a batch with `active` rows still generating costs less with every row computed (its layers then
        replayed: the graphs are for all rows) than eagerly over those left, by this machine's profile: the
        finished rows' attention over the whole cache, every layer, against the eager layers' measured overhead
        less a replay's. A few rows' products read the weights either way. Without a profile: True. Decided once
        per count of rows and length."""
        key = (active, block.prompt_len + block.gen_len)
        if key not in self._every_row:
            self._every_row[key] = self._every_row_wins(active, key[1])
        return self._every_row[key]

    def _every_row_wins(self, active: int, length: int) -> bool:
        static = self.static
        hw, cfg = cached_profile(static.device), static.config
        if hw is None:
            return True
        _, per_row = row_attention(hw, cfg, str(static.dtype).removeprefix("torch."), length)
        finished = cfg.num_layers * (self.rows - active) * per_row
        _, per_batch = hw.layer_overhead.get(cfg.family, hw.layer_overhead["opt"])
        return finished <= 2 * cfg.num_layers * max(0.0, per_batch - REPLAY_OPS * hw.op_overhead)

    def usable(self, spec, weights: dict, h, cache, b: int, inputs: dict, acts, in_place: bool) -> bool:
        """Whether layer `spec` of batch b's decode step can run as a graph here: every row still generating, its
        weights and hidden state tensors in compute memory, the hidden state kept there; an MLP of a dense model;
        an attention layer over one uncompressed cache part in compute memory used in place (`in_place`)."""
        device = self.static.device.device
        if not self.possible or (self.capture and _failed) or inputs["active"] is not None:
            return False
        if not isinstance(h, torch.Tensor) or h.device.type != device.type or not acts.in_place(b):
            return False
        if not all(isinstance(w, torch.Tensor) and w.device.type == device.type for w in weights.values()):
            return False
        if spec.kind == "mlp":
            return not self.static.config.moe
        return spec.kind == "attention" and self.attends(cache, spec.index, b, in_place)

    def attends(self, cache, layer: int, b: int, in_place: bool) -> bool:
        """Whether batch b's attention at `layer` can be a graph's: one uncompressed cache part in compute memory,
        used in place (`in_place`: all of the batch's parts are)."""
        parts = cache.parts[layer][b]
        return (in_place and len(parts) == 1 and not parts[0].on_cpu and not parts[0].quantized
                and parts[0].k.tensor.device.type == self.static.device.device.type)

    def run(self, spec, weights: dict, h: torch.Tensor, cache, block, b: int, start: int) -> torch.Tensor | None:
        """Batch b's hidden state after layer `spec` (weights `weights`) at position `start`: a static buffer the
        next layer reads in place. None when capturing failed (the caller runs the layer eagerly)."""
        s = self._batch(cache, block, b, start, h)
        i = next((i for i, buf in enumerate(s.hidden) if buf is h), None)
        if i is None:
            i = 0
            s.hidden[0].copy_(h)
        source, target = s.hidden[i], s.hidden[1 - i]
        if spec.kind == "attention" and spec.index not in s.kv:
            part = cache.parts[spec.index][b][0]
            s.kv[spec.index] = (part.k.tensor, part.v.tensor)

        def forward() -> torch.Tensor:
            return target.copy_(self._layer(spec, weights, source, s))

        if not self.capture:
            return forward()
        key = (spec.kind, spec.index if spec.kind == "attention" else None, b, i,
               tuple((name, w.data_ptr(), w.shape, w.dtype) for name, w in weights.items()))
        try:
            entry = self.graphs.get(key)
            eager = None
            if entry is None:
                eager = self._capture(key, forward)
                entry = self.graphs[key]
            entry.graph.replay()
            if not entry.replayed:
                self.static.device.synchronize()  # a failed first replay surfaces here
                check_replay(target, eager, logits=False)
                entry.replayed = True
        except Exception as e:  # noqa: BLE001 - whatever failed, the eager path is known to work
            reason = (str(e).splitlines() or [""])[0]
            _failed.append(reason)
            self.reset()
            if len(_failed) == 1:
                warnings.warn(f"CUDA graphs for decode steps' layers failed here ({type(e).__name__}: {reason}); "
                              f"their layers run eagerly from now on (set {ENV}=0 to skip them)", stacklevel=3)
            return None
        return target

    def _layer(self, spec, weights: dict, h: torch.Tensor, s: _Batch) -> torch.Tensor:
        static = self.static
        if spec.kind == "mlp":
            return static.layer(spec, weights, h, s.kv, {}, None)
        positions = (s.write - s.pad[:, None]).clamp(min=-1)  # (rows, 1), as Block.positions
        rope = None if static.rotary is None else static.rotary.tables(positions, static.dtype)
        capacity = s.kv[spec.index][0].shape[2]
        return static.layer(spec, weights, h, s.kv, {capacity: StaticDecode._slots(s, capacity)}, rope)

    def _batch(self, cache, block, b: int, start: int, h: torch.Tensor) -> _Batch:
        """Batch b's static buffers (made anew for a new cache), their pad and position set once a step."""
        s = self.batches.get(b)
        if s is None or s.cache is not cache or s.hidden[0].shape != h.shape or s.hidden[0].dtype != h.dtype:
            self.graphs = {key: g for key, g in self.graphs.items() if key[2] != b}  # they read the old buffers
            rows, where = h.shape[0], h.device
            s = self.batches[b] = _Batch(cache, torch.zeros(rows, dtype=torch.long, device=where),
                                         torch.zeros(1, dtype=torch.long, device=where),
                                         (torch.empty_like(h), torch.empty_like(h)))
            self.static.ledger.track(s, "gpu", 2 * h.numel() * h.element_size())
        if s.block is not block or s.start != start:
            s.pad.copy_(block.pad[block.rows(b)])
            s.write.fill_(start)
            s.block, s.start = block, start
        return s

    def _capture(self, key: tuple, forward) -> torch.Tensor:
        """The layer captured (run eagerly first: its output, which the first replay must give again); what the
        graphs' pool grew by counted on the ledger."""
        cuda = self.static.device.is_cuda
        with torch.cuda.device(self.static.device.device) if cuda else contextlib.nullcontext():
            eager = forward().clone()
            if cuda and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()  # one pool: no graph's output lives in it
            self.graphs[key] = _Graph(capture_graph(forward, self.pool))
        self.captures += 1
        if cuda and self.captures & (self.captures - 1) == 0:  # at 1, 2, 4, ... captures: the pool grows with the
            # first ones (later ones reuse what they freed), and reading it walks every allocation (memory_snapshot)
            pool = pool_bytes(self.pool)
            grown, self.pool_counted = pool - self.pool_counted, max(pool, self.pool_counted)
            if grown > 0:
                self.static.ledger.track(self.graphs[key], "gpu", grown)
        return eager
