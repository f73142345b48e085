"""OPT: canonical weight names -> names in a Hugging Face OPT checkpoint."""

from __future__ import annotations

from .config import ModelConfig

PREFIX = "model.decoder."


def embed_names(config: ModelConfig) -> dict[str, str]:
    names = {"tokens": "embed_tokens.weight", "positions": "embed_positions.weight"}
    if config.word_dim != config.hidden_size:
        names["project_in"] = "project_in.weight"
    return {k: PREFIX + v for k, v in names.items()}


def attention_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"{PREFIX}layers.{i}."
    names = {"norm.weight": "self_attn_layer_norm.weight", "norm.bias": "self_attn_layer_norm.bias"}
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
        names[f"{ours}.weight"] = f"self_attn.{theirs}.weight"
        if config.qkv_bias:
            names[f"{ours}.bias"] = f"self_attn.{theirs}.bias"
    return {k: p + v for k, v in names.items()}


def mlp_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"{PREFIX}layers.{i}."
    names = {"norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias",
             "up.weight": "fc1.weight", "down.weight": "fc2.weight"}
    if config.mlp_bias:
        names.update({"up.bias": "fc1.bias", "down.bias": "fc2.bias"})
    return {k: p + v for k, v in names.items()}


def head_names(config: ModelConfig) -> dict[str, str]:
    names = {}
    if config.final_norm:
        names = {"norm.weight": PREFIX + "final_layer_norm.weight", "norm.bias": PREFIX + "final_layer_norm.bias"}
    if config.word_dim != config.hidden_size:
        names["project_out"] = PREFIX + "project_out.weight"
    names["lm_head"] = PREFIX + "embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    return names
