"""A model is a list of layers (embed, attention/mlp per decoder layer, head), each naming its weights.

Families differ only in checkpoint names (`opt.py`, `llama.py`) and in config fields that the
shared layer math (`layers.py`) reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import llama, opt
from .config import ModelConfig

NAMES = {"opt": opt, "llama": llama}


@dataclass(frozen=True)
class WeightSpec:
    name: str  # canonical name within its layer, e.g. "q.weight"
    hf_name: str  # name in the checkpoint; rows of a fused tensor (Phi-3's qkv_proj): "name[a:b of n]" (rows_of)
    shape: tuple[int, ...]
    share: float = 1.0  # the share of a layer's rows this weight multiplies: a routed expert's, top-k / experts

    @property
    def picked(self) -> tuple[str, int, int, int] | None:
        """(stack, expert, first, step) of a weight that is columns first::step of one matrix of a stack stored
        transposed (llama.columns_of: gpt-oss's experts), else None."""
        if not self.hf_name.endswith("]") or "}[" not in self.hf_name:
            return None
        head, columns = self.hf_name[:-1].rsplit("}[", 1)
        name, expert = head.rsplit("{", 1)
        first, step = columns.split("::")
        return name, int(expert), int(first), int(step)

    @property
    def stored(self) -> tuple[str, int, int]:
        """(the checkpoint tensor holding this weight, the first of its rows there, its rows in all)."""
        if not self.hf_name.endswith("]") or self.picked is not None:
            return self.hf_name, 0, self.shape[0]
        name, rows = self.hf_name[:-1].rsplit("[", 1)
        span, total = rows.split(" of ")
        return name, int(span.split(":")[0]), int(total)


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "embed" | "attention" | "mlp" | "head"
    index: int  # decoder layer index (-1 for embed and head)
    weights: tuple[WeightSpec, ...]


def _shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    h, w, hd = config.hidden_size, config.word_dim, config.head_dim
    q_out, kv_out, f = config.num_heads * hd, config.num_kv_heads * hd, config.intermediate_size
    shapes = {
        "tokens": (config.vocab_size, w), "lm_head": (config.vocab_size, w),
        "positions": (config.max_positions + 2, h), "project_in": (h, w), "project_out": (w, h),
        "q.weight": (q_out, h), "k.weight": (kv_out, h), "v.weight": (kv_out, h), "o.weight": (h, q_out),
        "q.bias": (q_out,), "k.bias": (kv_out,), "v.bias": (kv_out,), "o.bias": (h,),
        "up.weight": (f, h), "gate.weight": (f, h), "down.weight": (h, f),
        "up.bias": (f,), "gate.bias": (f,), "down.bias": (h,), "q_norm.weight": (hd,), "k_norm.weight": (hd,),
    }
    if name in ("q_norm.weight", "k_norm.weight") and config.qk_norm == "full":  # OLMoE: across all heads
        return (q_out if name[0] == "q" else kv_out,)
    if name.startswith(("norm.", "post_norm.")):
        return (h,)
    if name == "router.weight":
        return (config.num_experts, h)
    if name in ("router.bias", "sinks"):
        return (config.num_experts if name == "router.bias" else config.num_heads,)
    if name == "shared_gate.weight":
        return (1, h)
    if name.startswith(("experts.", "shared.")):  # a routed expert's or the shared expert's gated MLP
        width = config.expert_size if name.startswith("experts.") else config.shared_expert_size
        if name.endswith(".bias"):
            return (h,) if name.split(".")[-2] == "down" else (width,)
        return {"gate": (width, h), "up": (width, h), "down": (h, width)}[name.split(".")[-2]]
    return shapes[name]


def _share(config: ModelConfig, name: str) -> float:
    return config.experts_per_token / config.num_experts if name.startswith("experts.") else 1.0


def _layer(config: ModelConfig, kind: str, index: int, names: dict[str, str]) -> LayerSpec:
    return LayerSpec(kind, index, tuple(WeightSpec(n, hf, _shape(config, n), _share(config, n))
                                        for n, hf in names.items()))


def layer_specs(config: ModelConfig) -> list[LayerSpec]:
    family = NAMES[config.family]
    layers = [_layer(config, "embed", -1, family.embed_names(config))]
    for i in range(config.num_layers):
        layers.append(_layer(config, "attention", i, family.attention_names(config, i)))
        layers.append(_layer(config, "mlp", i, family.mlp_names(config, i)))
    layers.append(_layer(config, "head", -1, family.head_names(config)))
    return layers


LOOKUPS = ("tokens", "positions")  # 2-D weights read by index (embeddings), not multiplied


def matmuls(layer: LayerSpec) -> list[tuple[int, int, float]]:
    """(in, out, share of the layer's rows) of each matmul of a layer, read off its weights: what the cost model
    and --breakdown count (a gated MLP's three, OPT's projections in and out, the head's, each expert's)."""
    return [(w.shape[1], w.shape[0], w.share) for w in layer.weights if len(w.shape) == 2 and w.name not in LOOKUPS]


def matmul_shapes(config: ModelConfig) -> dict[str, list[tuple[int, int, float]]]:
    """`matmuls` of each layer kind (embed, attention, mlp, head)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for layer in layer_specs(config):
        out.setdefault(layer.kind, matmuls(layer))
    return out
