"""A decode step of one batch with its decoder layers in one C call, on a CPU (the CPU's counterpart of
decode_graph.py's CUDA graphs).

At a few rows a Llama-family layer is ~1 ms of memory reads, and the eager schedule spends about as long again
in Python and dispatch (~25 ops and C calls a layer). Here the embedding and the head stay torch's; every layer
runs in native/decode_layer.c, which calls the same kernels the eager path calls, in the same order, with the
same roundings (tests/test_decode_fused.py).

It runs where the profile says it is faster (`fused_wins`: every product by the C few-row kernels, measured at
this many rows, against the eager path's fastest ways plus its measured per-layer overhead; without a profile,
where the eager path would run those kernels too), with every weight in memory (dense, or 4-bit codes for the
int4 kernel), the batch's cache one uncompressed part attended in place, and SiLU's bits reproducible here
(decode_layers.silu_exact). Where the eager path runs the same kernels, the logits are its own bit for bit.
Rows that finished (or fill the batch) are not computed: the step runs over the rows still generating alone, each
writing and reading its own cache row (Step.row_map), with the values the eager path gives them. Anything else
takes the eager path.
FLEXGEN_LITE_FUSED_DECODE=0 turns it off."""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass

import torch

from ..kernels import decode_layers as D
from ..kernels import elementwise, native
from ..kernels.attention import native_decode_agrees
from ..kernels.int4_cost import int4_cost, int4_path
from ..kernels.int4_matmul import Int4Weight, codes_gemv_wins, native_agrees
from ..kernels.small_matmul import gemv_wins
from ..models import layers as L
from ..system.hardware import interpolated_time
from ..system.profile_store import cpu_profile
from .shared_prefix import shared_rows

ENV = "FLEXGEN_LITE_FUSED_DECODE"  # "0": never
KERNEL = "fused+cpu-native"  # the step's attention kernel, as --breakdown reports it
NAMES = {"norm.weight", "q_norm.weight", "k_norm.weight", *(f"{m}.{p}" for m in D.MATRIX_NAMES
                                                             for p in ("weight", "bias"))}


def fused_wanted() -> bool:
    return os.environ.get(ENV, "1") != "0"


def config_fits(config) -> bool:
    """A pre-norm Llama-family layer: RMSNorm, rotary over whole heads (or no) positions, a SiLU-gated MLP."""
    return (config.norm == "rmsnorm" and config.pre_norm and config.gated_mlp and config.activation == "silu"
            and config.positions in ("rope", "none") and config.rotary_dim == config.head_dim and config.plain)


def fused_wins(hw, family: str, dtype: torch.dtype, rows: int, batches: int,
               products: list[tuple[int, int, bool]]) -> bool:
    """Whether a decode step of `batches` batches of `rows` rows costs less by the profile `hw` through
    decode_layer.c (every product (n, k, 4-bit or not) of a decoder layer, `products`, by a C few-row kernel
    measured at this many rows) than eagerly (each product its fastest way, plus the schedule's overhead per
    layer and batch), layer for layer: the decoder's layers are alike. The engine and the cost model decide
    alike."""
    name, fused, eager = str(dtype).removeprefix("torch."), 0.0, 0.0
    for n, k, int4 in products:
        points = (hw.int4_gemv if int4 else hw.gemv).get(name)
        if not points or rows > points[-1][0]:
            return False
        fused += batches * interpolated_time(points, rows, k, n)
        way = int4_cost(hw, name, rows, batches, k, n) if int4 else None
        eager += way.dequantize + way.matmul if way else batches * hw.matmul_time(name, rows, k, n)
    per_layer, per_batch = hw.layer_overhead.get(family, hw.layer_overhead["opt"])
    return fused < eager + 2 * (per_layer + batches * per_batch)  # per layer; attention and MLP: 2 specs


def layer_weights(specs, weights: list[dict]) -> list[dict] | None:
    """Per decoder layer, its attention and MLP weights merged (attention's norm as "attn_norm"), each a tensor
    in memory or an Int4Weight of codes in memory; None when one is elsewhere (offloaded, or compressed
    otherwise) or has a name decode_layer.c does not take."""
    out = []
    for spec, stored in zip(specs, weights, strict=True):
        if spec.kind not in ("attention", "mlp"):
            continue
        found = {}
        for name, t in stored.items():
            if name not in NAMES:
                return None
            if t.resident:
                found[name] = t.data
            elif t.int4 and t.tier == "gpu" and t.mapped is None:
                found[name] = t.int4_weight()
            else:
                return None
        if spec.kind == "attention":
            found["attn_norm"] = found.pop("norm.weight")
            out.append(found)
        else:
            out[-1].update(found)
    return out


@dataclass
class _Batch:
    cache: object  # the KVCache whose tensors the layers write and read
    layers: ctypes.Array  # D.Layer per decoder layer
    step: D.Step
    held: list  # what the structs point into and nothing else keeps alive (the scratch)


class FusedDecode:
    """Decode steps of whole batches through native/decode_layer.c (module note)."""

    def __init__(self, config, policy, specs, weights, resident: list, device, dtype: torch.dtype, rotary) -> None:
        """weights: per layer its StoredWeights; resident: per layer its tensors, or None (engine.resident)."""
        self.config, self.policy, self.specs, self.dtype, self.rotary = config, policy, specs, dtype, rotary
        on_cpu = device.device.type == "cpu"
        self.layers = layer_weights(specs, weights) if on_cpu and config_fits(config) else None
        self.embed, self.head = resident[0], resident[-1]
        self.possible = (fused_wanted() and self.layers is not None
                         and self.embed is not None and self.head is not None and policy.attn_sparsity == 1
                         and native.library() is not None and dtype in native.OUT_KIND)
        self.batches: dict[int, _Batch] = {}
        self._rows_ok: dict[int, bool] = {}

    def reset(self) -> None:
        self.batches.clear()

    def usable(self, block, b: int, cache, in_place: bool, acts) -> bool:
        """Whether batch b's decode step can run here (the module note's conditions)."""
        if not self.possible or not in_place or not acts._in_place(acts.tiers[b]):
            return False
        if self.config.windows_bite(block.prompt_len + block.gen_len):  # one mask for every layer here
            return False
        parts = cache.parts[0][b]
        if len(parts) != 1 or not parts[0].direct or parts[0].on_cpu or parts[0].quantized:
            return False
        k = parts[0].k.tensor
        if not isinstance(k, torch.Tensor) or k.dtype != self.dtype or k.device.type != "cpu" or k.stride(-1) != 1:
            return False
        active = block.active_rows(b)  # the step computes the rows still generating (not finished ones: eos, fillers)
        return self._rows_native(k.shape[0] if active is None else len(active))

    def _rows_native(self, rows: int) -> bool:
        """Whether at `rows` rows the eager path runs every op of a layer by the kernels decode_layer.c calls."""
        if rows not in self._rows_ok:
            width = elementwise.torch_lanes()
            matrices = [layer[f"{name}.weight"] for layer in self.layers for name in D.MATRIX_NAMES]
            self._rows_ok[rows] = (native.team_threads() > 0 and native_decode_agrees() and D.silu_exact(self.dtype)
                                   and width and width <= self.config.hidden_size < elementwise.TORCH_GRAIN
                                   and (not self.config.qk_norm or width <= self.config.head_dim)
                                   and all(self._takes(w) for w in matrices) and self._faster(matrices, rows))
        return self._rows_ok[rows]

    def _takes(self, w) -> bool:
        if isinstance(w, Int4Weight):
            return w.tiles is None and native_agrees()
        return w.dtype == self.dtype and w.is_contiguous()

    def _faster(self, matrices: list, rows: int) -> bool:
        """`fused_wins` by this machine's profile; without one, where the eager path runs the C kernels too."""
        hw, nb = cpu_profile(), self.policy.num_gpu_batches
        if hw is None:
            return all(codes_gemv_wins(self.dtype, rows, *w.shape)
                       and int4_path(w, rows, self.dtype, None, nb) == "kernel" if isinstance(w, Int4Weight)
                       else gemv_wins(self.dtype, rows, *w.shape) for w in matrices)
        products = [(*w.shape, isinstance(w, Int4Weight)) for w in matrices[:len(D.MATRIX_NAMES)]]  # layer 0's
        return fused_wins(hw, self.config.family, self.dtype, rows, nb, products)

    def run(self, cache, block, b: int, start: int) -> tuple[torch.Tensor, str]:
        """Logits (rows still generating, vocab) of batch b for the tokens at `start`, and the kernel name."""
        s = self.batches.get(b)
        if s is None or s.cache is not cache:
            s = self.batches[b] = self._build(cache, b)
        cfg = self.config
        positions, tokens = block.positions(b, start, 1), block.tokens[block.rows(b), start:start + 1]
        mask = block.mask(b, start, 1)  # (rows, 1, 1, start + 1)
        active = block.active_rows(b)
        if active is not None:  # the rows still generating alone, each reading and writing its own cache row
            positions, tokens, mask = positions[active], tokens[active], mask[active]
        h = L.embed(self.embed, tokens, positions, cfg).contiguous()
        mask = mask.contiguous()
        step = s.step
        step.h, step.mask, step.mask_stride, step.start = h.data_ptr(), mask.data_ptr(), start + 1, start
        step.rows, step.row_map = h.shape[0], 0 if active is None else active.data_ptr()
        shared = shared_rows(block.host_pad()[block.rows(b)], block.shared)  # by cache row, finished ones too
        step.source, step.shift, step.shared = (0, 0, 0) if shared is None else \
            (shared[0].data_ptr(), shared[1].data_ptr(), shared[2])
        cos = sin = None
        if self.rotary is not None:  # one table for every layer (config_fits: a plain model)
            cos, sin = self.rotary.tables(positions, self.dtype)["global"]
        step.cos, step.sin = (0, 0) if cos is None else (cos.data_ptr(), sin.data_ptr())
        step.threads = native.team_threads()
        step.silu_chunk = D.silu_chunk(h.shape[0] * cfg.intermediate_size, torch.get_num_threads())
        native.library().decode_layers(ctypes.addressof(s.layers), len(s.layers), ctypes.addressof(step))
        return L.head(self.head, h[:, -1], cfg), KERNEL

    def _build(self, cache, b: int) -> _Batch:
        cfg, kind = self.config, native.OUT_KIND[self.dtype]
        fn, lanes, exp_step = D.torch_exp()
        layers = (D.Layer * len(self.layers))()
        attention = [spec.index for spec in self.specs if spec.kind == "attention"]
        for layer, w, index in zip(layers, self.layers, attention, strict=True):
            part = cache.parts[index][b][0]
            k, v = part.k.tensor, part.v.tensor
            layer.kind, layer.norm_width, layer.exp_lanes = kind, elementwise.torch_lanes(), lanes
            layer.rows, layer.hidden, layer.ffn = k.shape[0], cfg.hidden_size, cfg.intermediate_size
            layer.heads, layer.kv_heads, layer.dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            layer.eps, layer.scale = cfg.norm_eps, 1.0 / math.sqrt(cfg.head_dim)
            layer.attn_norm, layer.mlp_norm = w["attn_norm"].data_ptr(), w["norm.weight"].data_ptr()
            if cfg.qk_norm:
                layer.q_norm, layer.k_norm = w["q_norm.weight"].data_ptr(), w["k_norm.weight"].data_ptr()
            for i, name in enumerate(D.MATRIX_NAMES):
                layer.m[i] = D.matrix(w[f"{name}.weight"], w.get(f"{name}.bias"))
            layer.k_cache, layer.v_cache = k.data_ptr(), v.data_ptr()
            layer.k_strides[:], layer.v_strides[:] = k.stride()[:3], v.stride()[:3]
            layer.block = native.attention_block(cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, k)
            layer.exp_fn, layer.exp_step = fn, max(exp_step, 1)
        scratch = torch.empty(native.library().decode_layer_scratch(ctypes.addressof(layers[0])), dtype=torch.uint8)
        for layer in layers:
            layer.work = scratch.data_ptr()  # the layers run one after another: one scratch
        return _Batch(cache, layers, D.Step(), [scratch])
