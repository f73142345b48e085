"""A GGUF file's tensors as a Hugging Face checkpoint's (the file's config: gguf_file.py): HF parameter names and
shapes, Q and K rows in HF's order again where llama.cpp's converter reordered them for its rotary layout, Gemma's
norms as HF's w (the file holds 1 + w), a mixture of experts' stacks as each expert's matrix (a view of its rows),
dequantized one tensor at a time or, for a Q4_0/Q4_1/Q4_K matrix, as its own 4-bit groups of 32. The whole file is
checked (names, types) before any tensor is read."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType

from .checkpoint import check_finite
from .gguf_file import GEMMA, GGUFError, _config_from_reader, _open
from .gguf_quants import DEQUANTIZE
from .gguf_reader import GROUPS_OF_32, KEPT_GROUPS, GGUFTensor, dequantize, groups_of_32
from .llama import rows_of

# model types whose Q and K rows the converter reorders (as Llama's)
PERMUTED = ("llama", "granite", "mixtral", "granitemoe", "smollm3")
SUPPORTED_TENSOR_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    *DEQUANTIZE,
)

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


def read_gguf_rows(entry: tuple[Any, int | None, float], start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a tensor of `gguf_tensors` that llama.cpp did not permute (not a rotary q or k, whose rows
    `read_gguf_tensor` reorders whole), dequantized to float32; their pages leave the process after."""
    t, n_head, minus = entry
    if n_head is not None:
        raise ValueError(f"{t.name}: a rotary q or k is read whole (read_gguf_tensor)")
    part = t.rows(start, stop)
    tensor = dequantize(part)
    part.release()
    check_finite(tensor, f"the GGUF tensor {t.name!r}")
    return tensor - minus if minus else tensor


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
