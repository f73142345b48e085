"""Reading a Hugging Face config (config.json, or a GGUF file's metadata in that form) into a ModelConfig: one small
reader per family (OPT; the Llama family with Mistral, Qwen2/3, Phi-3, Granite and the mixtures of experts; Gemma
1-3; OLMo-2/3; SmolLM3; gpt-oss), each field checked once here so the engine can trust the config."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .checkpoint import stores_tensor
from .config import ModelConfig, ModelError
from .hf_defaults import default_theta, with_family_defaults


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _opt_config(c: dict, name: str) -> ModelConfig:
    act = c.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ModelError(f"OPT activation {act!r} is not supported (relu, gelu)")
    if c.get("layer_norm_elementwise_affine", True) is False:
        raise ModelError("an OPT config with layer_norm_elementwise_affine false (norms without weights) is not "
                         "supported")
    hidden = c["hidden_size"]
    pre_norm = c.get("do_layer_norm_before", True)
    return ModelConfig(
        family="opt", name=name, vocab_size=c["vocab_size"], hidden_size=hidden,
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_attention_heads"], intermediate_size=c["ffn_dim"],
        max_positions=c["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
        pre_norm=pre_norm, final_norm=pre_norm and not c.get("_remove_final_layer_norm", False),
        activation=act, positions="learned",
        qkv_bias=c.get("enable_bias", True), out_bias=c.get("enable_bias", True),
        mlp_bias=c.get("enable_bias", True),
        embed_dim=c.get("word_embed_proj_dim", hidden) if c.get("word_embed_proj_dim", hidden) != hidden else 0,
        tie_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"), eos_token_id=_eos_list(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _rope_settings(c: dict) -> tuple[float, dict | None]:
    """Rope theta and scaling from either the old (rope_theta/rope_scaling) or new (rope_parameters) keys."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    theta = c.get("rope_theta", params.get("rope_theta", default_theta(c)))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind not in ("llama3", "linear", "yarn", "longrope"):
        raise ModelError(f"rope scaling {kind!r} is not supported (default, linear, yarn, llama3, longrope)")
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}  # transformers 5 nests the base there too
    if kind == "longrope":  # Phi-3: the original context may be a top-level field; the factor derives from both
        scaling.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings"))
        scaling.setdefault("max_position_embeddings", c.get("max_position_embeddings"))
        if not all(scaling.get(k) for k in ("short_factor", "original_max_position_embeddings")):
            raise ModelError("longrope scaling without short_factor or original_max_position_embeddings: the config "
                             "is incomplete")
    if kind == "yarn" and not scaling.get("original_max_position_embeddings"):
        raise ModelError("yarn rope scaling without original_max_position_embeddings: the config is incomplete")
    return float(theta), scaling


def _context(c: dict) -> int:
    """The positions the model was trained for; within LongRoPE's original context (past it the model's long
    factors take over, which are not implemented)."""
    context = c.get("max_position_embeddings", 4096)
    scaling = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
        context = min(context, scaling.get("original_max_position_embeddings")
                      or c.get("original_max_position_embeddings") or context)
    return context


# the families whose transformers model reads sliding_window (Llama's, Granite's and Gemma's ignore it)
WINDOWED = ("mistral", "mixtral", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmoe", "gemma2", "gemma3_text",
            "olmo3", "smollm3", "gpt_oss")


def _windows(c: dict) -> tuple[int, ...]:
    """Each layer's sliding window, as transformers reads the config: its layer_types where it has them, else
    the family's rule (Mistral, Mixtral, Phi-3: every layer; Gemma-2: every other, from the first; Gemma-3:
    all but every sliding_window_pattern-th; OLMo-3 three of four; Qwen only with use_sliding_window; SmolLM3 its
    NoPE layers, with use_sliding_window)."""
    window, kind, n = c.get("sliding_window") or 0, c["model_type"], c["num_hidden_layers"]
    if kind not in WINDOWED or (kind.startswith(("qwen2", "qwen3", "smollm3"))
                                and not c.get("use_sliding_window", False)):
        window = 0
    if not window:
        return ()
    types = c.get("layer_types")
    if types is None:
        windowed = _windowed_layers(c, kind, n)
        types = ["sliding_attention" if i in windowed else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ModelError(f"layer_types names {len(types)} layers of {n}: the config is inconsistent")
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _windowed_layers(c: dict, kind: str, n: int) -> set[int]:
    """The layers a family's config without layer_types gives a window (transformers' defaults)."""
    pattern = {"gemma2": 2, "gpt_oss": 2, "gemma3_text": c.get("sliding_window_pattern", 6), "olmo3": 4}.get(kind)
    if pattern:
        return {i for i in range(n) if (i + 1) % pattern}
    if kind in ("qwen2", "qwen3"):
        return set(range(c.get("max_window_layers", 0), n))
    if kind == "qwen2_moe":
        return set(range(0, min(n, c.get("max_window_layers", n)), 2))
    if kind == "smollm3":
        return set(_unrotated(c))
    return set(range(n))


QK_NORMS = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "gemma3_text": "head", "olmo2": "full",
            "olmo3": "full"}


def _llama_config(c: dict, name: str) -> ModelConfig:
    heads = c["num_attention_heads"]
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise ModelError(f"{name or 'the config'}: hidden_size {c['hidden_size']} does not split into "
                         f"{heads} attention heads, and no head_dim is given")
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"activation {act!r} is not supported for {c['model_type']} (silu)")
    partial = 1.0
    if c["model_type"] == "phi3":  # the one family whose transformers model rotates part of each head
        partial = float(c.get("partial_rotary_factor") or (c.get("rope_parameters") or {}).get("partial_rotary_factor")
                        or 1.0)
    if not 0 < partial <= 1 or int(head_dim * partial) % 2:
        raise ModelError(f"partial_rotary_factor {partial} of head_dim {head_dim} does not give an even number of "
                         "rotated dims")
    theta, scaling = _rope_settings(c)
    kind = c["model_type"]
    qkv_bias = kind == "qwen2" or (c.get("qkv_bias", True) if kind == "qwen2_moe" else c.get("attention_bias", False))
    granite = kind in ("granite", "granitemoe")  # transformers' default multiplier 1.0, not 1 / sqrt(head_dim)
    return ModelConfig(
        family="llama", name=name, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads, intermediate_size=c["intermediate_size"],
        max_positions=_context(c), windows=_windows(c), norm="rmsnorm",
        norm_eps=c.get("rms_norm_eps", 1e-6), activation="silu", gated_mlp=True, positions="rope",
        rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias, qk_norm=QK_NORMS.get(c["model_type"], ""),
        clip_qkv=c.get("clip_qkv"), fused_projections=c["model_type"] == "phi3", partial_rotary=partial,
        embed_scale=float(c.get("embedding_multiplier", 1.0)), residual_scale=float(c.get("residual_multiplier", 1.0)),
        attention_scale=c.get("attention_multiplier", 1.0 if granite else None),
        logits_divisor=float(c.get("logits_scaling", 1.0)),
        head_size=head_dim if head_dim * heads != c["hidden_size"] else 0, **_experts(c),
        out_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
        tie_embeddings=c.get("tie_word_embeddings", kind == "smollm3"),
        bos_token_id=c.get("bos_token_id"), eos_token_id=_eos_list(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _experts(c: dict) -> dict:
    """ModelConfig's mixture-of-experts fields: Mixtral routes every layer, renormalising its top experts'
    weights; GraniteMoE every layer, by a softmax of its top logits; OLMoE every layer, renormalising when
    norm_topk_prob; Qwen2/3-MoE every decoder_sparse_step-th layer but mlp_only_layers, renormalising when
    norm_topk_prob, Qwen2-MoE with a shared expert."""
    kind = c["model_type"]
    if kind not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"):
        return {}
    experts, top = c.get("num_experts") or c.get("num_local_experts"), c.get("num_experts_per_tok")
    if not experts or not top:
        raise ModelError(f"a {kind} config needs num_experts (or num_local_experts) and num_experts_per_tok; "
                         "this one lacks them or sets 0: the config is incomplete")
    if not 0 < top <= experts:
        raise ModelError(f"num_experts_per_tok {top} of {experts} experts: the config is inconsistent")
    if kind in ("mixtral", "granitemoe"):  # GraniteMoE: a softmax over the top logits
        return dict(moe="mixtral" if kind == "mixtral" else "granite", num_experts=experts, experts_per_token=top,
                    expert_size=c["intermediate_size"])
    if kind == "olmoe":
        return dict(moe="qwen", num_experts=experts, experts_per_token=top, expert_size=c["intermediate_size"],
                    norm_top_k=bool(c.get("norm_topk_prob", False)))
    step, only = c.get("decoder_sparse_step", 1) or 1, set(c.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(c["num_hidden_layers"]) if i in only or (i + 1) % step)
    return dict(moe="qwen", num_experts=experts, experts_per_token=top, expert_size=c["moe_intermediate_size"],
                norm_top_k=bool(c.get("norm_topk_prob", False)), dense_layers=dense,
                shared_expert_size=c.get("shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0)


def _gemma_config(c: dict, name: str) -> ModelConfig:
    """Gemma, Gemma-2 and Gemma-3: a Llama layer with Gemma's norm and embedding scale, a tanh-GELU gated MLP, tied
    embeddings; Gemma-2 adds its attention scale, soft caps and post-block norms (ModelConfig's fields); Gemma-3
    normalises q and k per head, and its windowed layers turn by their own rotary base."""
    kind = c["model_type"]
    if kind in ("gemma3", "gemma3_text"):
        c = _gemma3_text(c)
    later = kind != "gemma"
    act = (c.get("hidden_activation") if later else c.get("hidden_act")) or "gelu_pytorch_tanh"
    if kind == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # the original releases' legacy value, meant as tanh (transformers rewrites it)
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelError(f"activation {act!r} is not supported for {kind} (gelu_pytorch_tanh, gelu)")
    base = _llama_config({**c, "hidden_act": "silu", "tie_word_embeddings": c.get("tie_word_embeddings", True)}, name)
    scalar = c.get("query_pre_attn_scalar") if later else None
    return dataclasses.replace(
        base, activation="gelu_tanh" if act == "gelu_pytorch_tanh" else "gelu", norm_offset=1.0,
        embed_scale=math.sqrt(c["hidden_size"]), embed_scale_in_dtype=True,
        attention_scale=None if scalar is None else scalar ** -0.5,
        attn_softcap=c.get("attn_logit_softcapping") if kind == "gemma2" else None,  # Gemma-3 keeps it unused
        logits_softcap=c.get("final_logit_softcapping") if later else None, post_norms=later,
        local_rope_theta=float(c.get("rope_local_base_freq", 0.0)))


# transformers' Gemma3TextConfig defaults: the multimodal checkpoints' text_config names only what differs
GEMMA3_TEXT = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                   rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                   pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _gemma3_text(c: dict) -> dict:
    """A Gemma-3 config as its text model reads it (from a multimodal checkpoint's text_config, filled with the
    defaults)."""
    text = c.get("text_config") if c["model_type"] == "gemma3" else c
    if text is None:
        raise ModelError("a gemma3 config without text_config: the config is incomplete")
    ids = {k: c[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if c.get(k) is not None}
    text = {**GEMMA3_TEXT, **ids, **{k: v for k, v in text.items() if v is not None}, "model_type": "gemma3_text"}
    if text.get("use_bidirectional_attention"):
        raise ModelError("a Gemma-3 config with bidirectional attention (an embedding model) cannot generate")
    return _rope_per_layer_type(text, GEMMA3_TEXT["rope_local_base_freq"])


def _rope_per_layer_type(c: dict, local_default: float | None) -> dict:
    """Gemma-3's and OLMo-3's rotary settings in the older keys: rope_theta and rope_scaling of the full layers,
    rope_local_base_freq of the windowed ones (transformers 5 nests them in rope_parameters per layer type; an older
    config's windowed layers take rope_local_base_freq, else `local_default`, else the full layers' base)."""
    params = c.get("rope_parameters") or {}
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        if local.get("rope_type", local.get("type", "default")) not in (None, "default"):
            raise ModelError(f"rope scaling {local.get('rope_type', local.get('type'))!r} of the windowed layers "
                             "(rope_parameters.sliding_attention) is not supported: only their full layers' scale")
        c = {**c, "rope_theta": full.get("rope_theta", c.get("rope_theta", default_theta(c))),
             "rope_scaling": {k: v for k, v in full.items() if k != "rope_theta"}}
        c["rope_local_base_freq"] = local.get("rope_theta", local_default or c["rope_theta"])
        c.pop("rope_parameters")
    else:
        c = {**c, "rope_local_base_freq": c.get("rope_local_base_freq",
                                                local_default or c.get("rope_theta", default_theta(c)))}
    return c


def _olmo_config(c: dict, name: str) -> ModelConfig:
    """OLMo-2 and OLMo-3: a Llama layer normalised after attention and after the MLP, not before, with q and k
    normalised across all heads; OLMo-3's windowed layers turn unscaled (its full layers may take YaRN)."""
    windowed = c["model_type"] == "olmo3"
    if windowed:
        c = _rope_per_layer_type(c, None)
    base = _llama_config(c, name)
    return dataclasses.replace(base, input_norms=False, post_norms=True,
                               local_rope_theta=float(c["rope_local_base_freq"]) if windowed else 0.0)


def _unrotated(c: dict) -> tuple[int, ...]:
    """SmolLM3's NoPE layers: its no_rope_layers flags each layer 1 where it does use the rotary embedding, or
    every no_rope_layer_interval-th layer goes without."""
    n = c["num_hidden_layers"]
    flags = c.get("no_rope_layers") or [int((i + 1) % c.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    if len(flags) != n:
        raise ModelError(f"no_rope_layers names {len(flags)} layers of {n}: the config is inconsistent")
    return tuple(i for i, rotated in enumerate(flags) if not rotated)


def _smollm3_config(c: dict, name: str) -> ModelConfig:
    return dataclasses.replace(_llama_config(c, name), unrotated_layers=_unrotated(c))


# transformers' GptOssConfig defaults (gpt-oss-120b's shape) where a config leaves a field out
GPT_OSS = dict(num_hidden_layers=36, num_local_experts=128, vocab_size=201_088, hidden_size=2880,
               intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
               max_position_embeddings=131_072, rms_norm_eps=1e-5, num_experts_per_tok=4, swiglu_alpha=1.702,
               swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False, rope_theta=150_000.0,
               rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096})


def _gpt_oss_config(c: dict, name: str) -> ModelConfig:
    """gpt-oss: a Llama layer with biases on q, k, v and o, a learned sink logit per head in each softmax, a window
    of 128 on every other layer, and experts with biases, routed by a softmax of the top logits (the router has a
    bias too), whose GLU clamps its inputs (swiglu_limit) and offsets up by one (swiglu_alpha: sigmoid's slope)."""
    older = ("rope_scaling", "rope_theta") if c.get("rope_parameters") else ()  # would hide transformers 5's keys
    c = {**{k: v for k, v in GPT_OSS.items() if k not in older}, "hidden_act": "silu",
         **{k: v for k, v in c.items() if v is not None}}
    base = _llama_config(c, name)
    experts, top = c["num_local_experts"], c["num_experts_per_tok"]
    if not 0 < top <= experts:
        raise ModelError(f"num_experts_per_tok {top} of {experts} experts: the config is inconsistent")
    return dataclasses.replace(base, moe="gpt_oss", num_experts=experts, experts_per_token=top,
                               expert_size=c["intermediate_size"], attn_sinks=True,
                               swiglu_limit=float(c["swiglu_limit"]), swiglu_alpha=float(c["swiglu_alpha"]))


FAMILIES = {"opt": _opt_config, "llama": _llama_config, "mistral": _llama_config, "qwen2": _llama_config,
            "qwen3": _llama_config, "phi3": _llama_config, "mixtral": _llama_config, "qwen2_moe": _llama_config,
            "qwen3_moe": _llama_config, "granite": _llama_config, "granitemoe": _llama_config,
            "olmoe": _llama_config, "gemma": _gemma_config, "gemma2": _gemma_config, "gemma3": _gemma_config,
            "gemma3_text": _gemma_config, "olmo2": _olmo_config, "olmo3": _olmo_config, "smollm3": _smollm3_config,
            "gpt_oss": _gpt_oss_config}


COUNTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "ffn_dim", "max_position_embeddings", "head_dim", "moe_intermediate_size",
          "num_experts", "num_local_experts", "num_experts_per_tok")
NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
OPTIONAL_COUNTS = ("head_dim", "num_key_value_heads", "moe_intermediate_size", "num_experts", "num_local_experts",
                   "num_experts_per_tok")


def _check_fields(c: dict, name: str, nulls: bool = False) -> None:
    """Counts are positive whole numbers and the norms' epsilons and rope bases numbers, where a config gives them
    (a field left out takes transformers' default, as does null where it means so: optional counts, and `nulls`
    for readers that fill them; a field set wrong would run with wrong outputs, or fail deep in the engine)."""
    for key in COUNTS + NUMBERS:
        value = c.get(key)
        if key not in c or (value is None and (nulls or key in OPTIONAL_COUNTS)):
            continue
        real = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if not real or (key in COUNTS and not isinstance(value, int)):
            what = "a positive whole number" if key in COUNTS else "a positive number"
            raise ModelError(f"the config of {name or c.get('model_type')} sets {key} to {value!r}, not {what}: "
                             "the file is damaged or not a Hugging Face config")


def config_from_dict(c: dict, name: str = "") -> ModelConfig:
    if not isinstance(c, dict):
        raise ModelError(f"the config of {name or 'this model'} is a JSON {type(c).__name__}, not an object: the "
                         "file is damaged or not a Hugging Face config")
    _check_fields(c, name, nulls=c.get("model_type") == "gpt_oss")
    if isinstance(c.get("text_config"), dict):
        _check_fields(c["text_config"], name, nulls=True)
    model_type = c.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    try:
        return FAMILIES[model_type](with_family_defaults(c), name)
    except KeyError as e:
        raise ModelError(f"config of {name or model_type} lacks the field {e.args[0]!r}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json from a local checkpoint directory."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        first = next((g for g in ggufs if "-00001-of-" in g.name), ggufs[0]) if ggufs else None
        hint = (f" (a GGUF file is here: --model {first})" if len(ggufs) == 1 else
                f" ({len(ggufs)} GGUF files are here: pass one, e.g. --model {first})" if ggufs else "")
        raise ModelError(f"{path} has no config.json: pass a local Hugging Face checkpoint directory or a .gguf "
                         f"file{hint}")
    config = config_from_dict(_json_file(file), name=str(path))
    generation = path / "generation_config.json"
    if generation.is_file():  # where instruct models name their end-of-turn ids (transformers' generate stops there)
        eos = _eos_list(_json_file(generation).get("eos_token_id"))
        config = dataclasses.replace(config, eos_token_id=eos or config.eos_token_id)
    if config.tie_embeddings and stores_tensor(path, "lm_head.weight"):
        config = dataclasses.replace(config, tie_embeddings=False)  # a stored head is used, as transformers does
    return config


def _json_file(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{file} holds a JSON {type(raw).__name__}, not an object; re-download the checkpoint")
    return raw
