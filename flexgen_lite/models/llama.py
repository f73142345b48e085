"""Llama family (Llama 1-3, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3, the MoEs, gpt-oss): canonical weight names -> HF
checkpoint names. Phi-3 stores q, k, v as one matrix and gate, up as another: each of ours is a range of its
rows (rows_of). A mixture of experts names its router, each expert and a shared expert (expert_names); gpt-oss
stores each layer's experts as one stack of transposed matrices, each of ours some columns of one (columns_of)."""

from __future__ import annotations

from .config import ModelConfig


def rows_of(name: str, first: int, count: int, total: int) -> str:
    """The hf_name of rows [first, first + count) of the stored tensor `name` of `total` rows (WeightSpec.stored)."""
    return f"{name}[{first}:{first + count} of {total}]"


def columns_of(name: str, expert: int, first: int, step: int) -> str:
    """The hf_name of columns first::step of matrix `expert` of the stack `name` (experts, in, out), transposed to
    (out, in) as ours are (of a stack of vectors (experts, out): those elements) (WeightSpec.picked)."""
    return f"{name}{{{expert}}}[{first}::{step}]"


def embed_names(config: ModelConfig) -> dict[str, str]:
    return {"tokens": "model.embed_tokens.weight"}


def attention_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {"norm.weight": p + "input_layernorm.weight"} if config.input_norms else {}
    for ours in ("q", "k", "v", "o"):
        names[f"{ours}.weight"] = f"{p}self_attn.{ours}_proj.weight"
    if config.fused_projections:
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        qkv = p + "self_attn.qkv_proj.weight"
        total = q + 2 * kv
        names.update({"q.weight": rows_of(qkv, 0, q, total), "k.weight": rows_of(qkv, q, kv, total),
                      "v.weight": rows_of(qkv, q + kv, kv, total)})
    for ours in ("q", "k", "v") if config.qkv_bias else ():
        names[f"{ours}.bias"] = f"{p}self_attn.{ours}_proj.bias"
    if config.out_bias:
        names["o.bias"] = f"{p}self_attn.o_proj.bias"
    for ours in ("q", "k") if config.qk_norm else ():
        names[f"{ours}_norm.weight"] = f"{p}self_attn.{ours}_norm.weight"
    if config.attn_sinks:
        names["sinks"] = p + "self_attn.sinks"
    if config.post_norms:  # Gemma-2, OLMo-2: the attention's output normalised before the residual add
        names["post_norm.weight"] = p + "post_attention_layernorm.weight"
    return names


def mlp_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {"norm.weight": p + "post_attention_layernorm.weight"}
    if config.routed(i):
        return names | expert_names(config, p)
    for ours in ("gate", "up", "down"):
        names[f"{ours}.weight"] = f"{p}mlp.{ours}_proj.weight"
        if config.mlp_bias:
            names[f"{ours}.bias"] = f"{p}mlp.{ours}_proj.bias"
    if config.post_norms:  # Gemma-2: normalised before the MLP and after it; OLMo-2 only after
        names.update({"norm.weight": p + "pre_feedforward_layernorm.weight",
                      "post_norm.weight": p + "post_feedforward_layernorm.weight"})
        if not config.input_norms:
            del names["norm.weight"]
    if config.fused_projections:  # gate first, then up (transformers' Phi3MLP chunks it so)
        f, fused = config.intermediate_size, p + "mlp.gate_up_proj.weight"
        names.update({"gate.weight": rows_of(fused, 0, f, 2 * f), "up.weight": rows_of(fused, f, f, 2 * f)})
    return names


# a MoE layout's module under the layer, and its experts' names of the gate, up and down projections
EXPERT_LAYOUTS = {"mixtral": ("block_sparse_moe.", {"gate": "w1", "up": "w3", "down": "w2"}),
                  "qwen": ("mlp.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}


def expert_names(config: ModelConfig, p: str) -> dict[str, str]:
    """A mixture of experts' router, experts and shared expert with its gate (Qwen2-MoE)."""
    if config.moe == "granite":
        return stacked_expert_names(config, p + "block_sparse_moe.")
    if config.moe == "gpt_oss":
        return transposed_expert_names(config, p + "mlp.")
    moe, parts = EXPERT_LAYOUTS[config.moe]
    names = {"router.weight": f"{p}{moe}gate.weight"}
    for e in range(config.num_experts):
        names.update({f"experts.{e}.{ours}.weight": f"{p}{moe}experts.{e}.{theirs}.weight"
                      for ours, theirs in parts.items()})
    if config.shared_expert_size:
        names.update({f"shared.{ours}.weight": f"{p}mlp.shared_expert.{theirs}.weight"
                      for ours, theirs in parts.items()})
        names["shared_gate.weight"] = p + "mlp.shared_expert_gate.weight"
    return names


def stacked_expert_names(config: ModelConfig, p: str) -> dict[str, str]:
    """GraniteMoE's experts as stored: gate and up stacked (experts, 2 x width, hidden), gate first; down (experts,
    hidden, width). Each expert's matrix is a range of rows of its stack read as one matrix (specs.rows_of)."""
    f, h, n = config.expert_size, config.hidden_size, config.num_experts
    names = {"router.weight": p + "router.layer.weight"}
    for e in range(n):
        names.update({f"experts.{e}.gate.weight": rows_of(p + "input_linear.weight", 2 * f * e, f, 2 * f * n),
                      f"experts.{e}.up.weight": rows_of(p + "input_linear.weight", 2 * f * e + f, f, 2 * f * n),
                      f"experts.{e}.down.weight": rows_of(p + "output_linear.weight", h * e, h, h * n)})
    return names


def transposed_expert_names(config: ModelConfig, p: str) -> dict[str, str]:
    """gpt-oss's experts as stored: gate and up (experts, hidden, 2 x width) with their columns interleaved, gate
    first; down (experts, width, hidden); a bias of each; and a router with a bias."""
    gate_up, down = p + "experts.gate_up_proj", p + "experts.down_proj"
    names = {"router.weight": p + "router.weight", "router.bias": p + "router.bias"}
    for e in range(config.num_experts):
        for part in ("weight", "bias"):
            tail = "" if part == "weight" else "_bias"
            names.update({f"experts.{e}.gate.{part}": columns_of(gate_up + tail, e, 0, 2),
                          f"experts.{e}.up.{part}": columns_of(gate_up + tail, e, 1, 2),
                          f"experts.{e}.down.{part}": columns_of(down + tail, e, 0, 1)})
    return names


def head_names(config: ModelConfig) -> dict[str, str]:
    return {"norm.weight": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"}
