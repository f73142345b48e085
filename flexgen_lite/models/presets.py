"""Configs of well-known models by name, for benchmarks with dummy weights (no checkpoint needed)."""

from __future__ import annotations

from .config import ModelConfig, ModelError
from .hf_config import config_from_dict

# name: (hidden, layers, heads, ffn)
_OPT = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
    "opt-175b": (12288, 96, 96, 49152),
}

# name: (model_type, hidden, layers, heads, kv_heads, ffn, vocab, max_positions, rope_theta)
_LLAMA = {
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 1e4),
    "llama-2-13b": ("llama", 5120, 40, 40, 40, 13824, 32000, 4096, 1e4),
    "llama-2-70b": ("llama", 8192, 80, 64, 8, 28672, 32000, 4096, 1e4),
    "llama-3-8b": ("llama", 4096, 32, 32, 8, 14336, 128256, 8192, 5e5),
    "llama-3-70b": ("llama", 8192, 80, 64, 8, 28672, 128256, 8192, 5e5),
    "tinyllama-1.1b": ("llama", 2048, 22, 32, 4, 5632, 32000, 2048, 1e4),
    "mistral-7b": ("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, 1e4),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, 1e6),
    "qwen2.5-72b": ("qwen2", 8192, 80, 64, 8, 29568, 152064, 32768, 1e6),
    "qwen3-8b": ("qwen3", 4096, 36, 32, 8, 12288, 151936, 40960, 1e6),
    "qwen3-32b": ("qwen3", 5120, 64, 64, 8, 25600, 151936, 40960, 1e6),
    "phi-3-mini-4k": ("phi3", 3072, 32, 32, 32, 8192, 32064, 4096, 1e4),
    "phi-3-medium-4k": ("phi3", 5120, 40, 40, 10, 17920, 32064, 4096, 1e4),
    "gemma-2-9b": ("gemma2", 3584, 42, 16, 8, 14336, 256000, 8192, 1e4),
    "gemma-2-27b": ("gemma2", 4608, 46, 32, 16, 36864, 256000, 8192, 1e4),
    "gemma-3-1b": ("gemma3_text", 1152, 26, 4, 1, 6912, 262144, 32768, 1e6),
    "gemma-3-4b": ("gemma3_text", 2560, 34, 8, 4, 10240, 262208, 131072, 1e6),
    "gemma-3-12b": ("gemma3_text", 3840, 48, 16, 8, 15360, 262208, 131072, 1e6),
    "gemma-3-27b": ("gemma3_text", 5376, 62, 32, 16, 21504, 262208, 131072, 1e6),
    "olmo-2-7b": ("olmo2", 4096, 32, 32, 32, 11008, 100352, 4096, 5e5),
    "smollm3-3b": ("smollm3", 2048, 36, 16, 4, 11008, 128256, 65536, 5e6),
    "mixtral-8x7b": ("mixtral", 4096, 32, 32, 8, 14336, 32000, 32768, 1e6),
    "mixtral-8x22b": ("mixtral", 6144, 56, 48, 8, 16384, 32768, 65536, 1e6),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 48, 32, 4, 6144, 151936, 40960, 1e6),
    "olmoe-1b-7b": ("olmoe", 2048, 16, 16, 16, 1024, 50304, 4096, 1e4),
    "granite-3.0-3b-a800m": ("granitemoe", 1536, 32, 24, 8, 512, 49155, 4096, 1e4),
}
# mixtures of experts: (experts, experts per token, an expert's width, its routing weights renormalised)
EXPERTS = {"mixtral-8x7b": (8, 2, 14336, True), "mixtral-8x22b": (8, 2, 16384, True),
           "qwen3-30b-a3b": (128, 8, 768, True), "olmoe-1b-7b": (64, 8, 1024, False),
           "granite-3.0-3b-a800m": (40, 8, 512, True)}
# Granite's multipliers: of the embeddings, of each block's output, the attention's scale, the logits' divisor
GRANITE = {"granite-3.0-3b-a800m": (12.0, 0.22, 0.015625, 6.0)}
# where heads x head_dim is not hidden (Qwen3-32B: 8192 vs 5120)
HEAD_DIMS = {"qwen3-8b": 128, "qwen3-32b": 128, "qwen3-30b-a3b": 128, "gemma-2-9b": 256, "gemma-2-27b": 128,
             "gemma-3-1b": 256, "gemma-3-4b": 256, "gemma-3-12b": 256, "gemma-3-27b": 128}
TIED = ("gemma2", "gemma3_text", "granitemoe", "smollm3")  # model types whose head is their embedding
# Gemma-2 and 3: (sliding window, query_pre_attn_scalar, the full layers' linear rope factor)
GEMMA = {"gemma-2-9b": (4096, 256, None), "gemma-2-27b": (4096, 144, None), "gemma-3-1b": (512, 256, None),
         "gemma-3-4b": (1024, 256, 8.0), "gemma-3-12b": (1024, 256, 8.0), "gemma-3-27b": (1024, 168, 8.0)}
# gpt-oss: what differs from transformers' GptOssConfig defaults (the 120b's shape), as released
_GPT_OSS = {"gpt-oss-20b": {"num_hidden_layers": 24, "num_local_experts": 32}, "gpt-oss-120b": {}}


def _hf_dict(key: str) -> dict:
    if key in _GPT_OSS:
        return {"model_type": "gpt_oss", **_GPT_OSS[key], "eos_token_id": [200002, 199999, 200012],
                "pad_token_id": 199999}
    if key in _OPT:
        hidden, layers, heads, ffn = _OPT[key]
        return {
            "model_type": "opt", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "ffn_dim": ffn, "vocab_size": 50272,
            "max_position_embeddings": 2048, "word_embed_proj_dim": 512 if key == "opt-350m" else hidden,
            "do_layer_norm_before": key != "opt-350m", "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        }
    model_type, hidden, layers, heads, kv, ffn, vocab, max_pos, theta = _LLAMA[key]
    experts = {}
    if key in EXPERTS:
        count, top, width, norm = EXPERTS[key]
        experts = {"num_local_experts": count, "num_experts": count, "num_experts_per_tok": top,
                   "moe_intermediate_size": width, "norm_topk_prob": norm}
    return {**experts,
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "rope_theta": theta,
        "rms_norm_eps": 1e-5 if model_type in ("llama", "phi3") else 1e-6,
        **_gemma(key), "bos_token_id": 1, "eos_token_id": 2,
        "head_dim": HEAD_DIMS.get(key), "tie_word_embeddings": model_type in TIED,
        **dict(zip(("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
                   GRANITE.get(key, ()), strict=False)),
    }


def _gemma(key: str) -> dict:
    if key not in GEMMA:
        return {}
    window, scalar, factor = GEMMA[key]
    scaling = {"rope_scaling": {"rope_type": "linear", "factor": factor}} if factor else {}
    return {"sliding_window": window, "query_pre_attn_scalar": scalar, **scaling}


def preset_names() -> list[str]:
    return sorted(_OPT) + sorted(_LLAMA) + sorted(_GPT_OSS)


def find_preset(name: str) -> ModelConfig | None:
    """Config for a name like 'facebook/opt-1.3b' or 'llama-3-8b', or None if it names no preset."""
    key = name.lower().rsplit("/", 1)[-1]
    key = key.removesuffix("-hf")
    if key not in _OPT and key not in _LLAMA and key not in _GPT_OSS:
        return None
    return config_from_dict(_hf_dict(key), name=name)


def preset_config(name: str) -> ModelConfig:
    config = find_preset(name)
    if config is None:
        known = ", ".join(preset_names())
        raise ModelError(f"{name!r} is neither a checkpoint directory nor a known model; known: {known}")
    return config
