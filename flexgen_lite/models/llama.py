"""Llama family (Llama 1-3, Mistral, Qwen2, Qwen3, SmolLM2): canonical weight names -> HF checkpoint names."""

from __future__ import annotations

from .config import ModelConfig


def embed_names(config: ModelConfig) -> dict[str, str]:
    return {"tokens": "model.embed_tokens.weight"}


def attention_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {"norm.weight": p + "input_layernorm.weight"}
    for ours in ("q", "k", "v", "o"):
        names[f"{ours}.weight"] = f"{p}self_attn.{ours}_proj.weight"
    for ours in ("q", "k", "v") if config.qkv_bias else ():
        names[f"{ours}.bias"] = f"{p}self_attn.{ours}_proj.bias"
    if config.out_bias:
        names["o.bias"] = f"{p}self_attn.o_proj.bias"
    for ours in ("q", "k") if config.qk_norm else ():
        names[f"{ours}_norm.weight"] = f"{p}self_attn.{ours}_norm.weight"
    return names


def mlp_names(config: ModelConfig, i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    names = {"norm.weight": p + "post_attention_layernorm.weight"}
    for ours in ("gate", "up", "down"):
        names[f"{ours}.weight"] = f"{p}mlp.{ours}_proj.weight"
        if config.mlp_bias:
            names[f"{ours}.bias"] = f"{p}mlp.{ours}_proj.bias"
    return names


def head_names(config: ModelConfig) -> dict[str, str]:
    return {"norm.weight": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"}
