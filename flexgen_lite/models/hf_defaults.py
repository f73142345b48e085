"""What transformers' config classes take for a field a config.json leaves out, family by family (their
__init__ defaults in transformers 5.25). Configs written by save_pretrained hold every field; hand-written and
older ones do not, and a fallback of our own there would compute another model (a Phi-3's norms with 1e-6
instead of 1e-5 moved its logits by 2.4e-3; a Qwen3 without head_dim was refused for weights of 128-wide heads)."""

from __future__ import annotations

# rope bases where a config names none (10000 for the other families)
DEFAULT_THETA = {"mixtral": 1e6, "smollm3": 2e6, "olmo3": 5e5, "gpt_oss": 150_000.0}

_QWEN = {"rms_norm_eps": 1e-6, "sliding_window": 4096, "max_position_embeddings": 32768}
_GRANITE = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
FIELD_DEFAULTS = {
    "opt": {"max_position_embeddings": 2048},
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {"rms_norm_eps": 1e-6, "sliding_window": 4096, "max_position_embeddings": 131_072},
    "mixtral": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131_072},
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "qwen2": {**_QWEN, "max_window_layers": 28},
    "qwen2_moe": {**_QWEN, "max_window_layers": 28},
    "qwen3": {**_QWEN, "head_dim": 128, "max_window_layers": 28},
    "qwen3_moe": _QWEN,
    "granite": _GRANITE,
    "granitemoe": _GRANITE,
    "olmoe": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "olmo2": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
    "olmo3": {"rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 2048},
    "smollm3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "gemma": {"rms_norm_eps": 1e-6, "head_dim": 256, "max_position_embeddings": 8192},
    "gemma2": {"rms_norm_eps": 1e-6, "head_dim": 256, "sliding_window": 4096, "max_position_embeddings": 8192},
    "gpt_oss": {"rms_norm_eps": 1e-5, "head_dim": 64, "sliding_window": 128, "max_position_embeddings": 131_072},
}  # gemma3: its text config's defaults (hf_config.GEMMA3_TEXT)


def default_theta(c: dict) -> float:
    return DEFAULT_THETA.get(c.get("model_type"), 10000.0)


def with_family_defaults(c: dict) -> dict:
    """`c` with its family's defaults for the fields it leaves out (a field given as null stays null: transformers
    reads that as the field's absence of a value, e.g. no sliding window)."""
    return {**FIELD_DEFAULTS.get(c.get("model_type"), {}), **c}
