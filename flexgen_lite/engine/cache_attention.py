"""Decode attention over a batch's KV cache part by part, each where it lives (compute memory, or host RAM
attended on the CPU), for the rows that still generate; the engine (block_schedule.py) stores the new k, v home."""

from __future__ import annotations

import torch

from ..kernels import quantized_attention, quantized_attention_triton
from ..kernels.attention import attend_named
from .shared_prefix import shared_rows


def codes_attended(config, policy) -> bool:
    """Whether compressed cache parts a CPU attends where they live are read as stored by the 4-bit kernel
    (quantized_attention), not dequantized into slots every step: where it is built here and nothing needs the
    scores whole."""
    return _codes_readable(config, policy) and quantized_attention.supported(policy.cache_compression())


def device_codes_attended(config, policy, device, dtype: torch.dtype) -> bool:
    """Whether compressed cache parts in compute memory (a GPU's) are read as stored by Triton's 4-bit kernel
    (quantized_attention_triton), not dequantized into slots every step: the same conditions, where it runs."""
    compression = policy.cache_compression()
    return (_codes_readable(config, policy) and quantized_attention_triton.supported(compression)
            and quantized_attention_triton.wanted_on(device, dtype, config.num_heads // config.num_kv_heads,
                                                     config.head_dim, compression.group_size))


def _codes_readable(config, policy) -> bool:
    """A compressed cache nothing needs the scores of whole (top-k sparsity, Gemma-2's caps, gpt-oss's sinks)."""
    return (policy.compress_cache and policy.attn_sparsity == 1 and config.attn_softcap is None
            and not config.attn_sinks)


def attend_part(view, q, k, v, mask, start: int, inputs: dict, sparsity: float, softcap: float | None = None,
                sinks: torch.Tensor | None = None):
    """One new token's attention over the cache part `view` (its k, v written in at `start` first): (output on
    q's device, the new k and v as the part holds them, the attention kernel that ran, K and V bytes read), or
    None when none of the part's rows is active. softcap, sinks: the scores' cap (Gemma-2), each head's sink logit
    (gpt-oss) (attend_named). A windowed layer's part past its window is a ring (kv_cache): the new position at
    start % capacity, every slot attended under `mask`, the ring's (layer_mask)."""
    if view.part.quantized and view.part.direct:
        return attend_codes(view, q, k, v, mask, start, inputs)
    rows, where, dtype, capacity = view.part.rows, view.k.device, view.k.dtype, view.part.capacity
    slot, end = start % capacity, min(start + 1, capacity)
    picked, local = rows_in_part(inputs, rows, q.device)
    q_part, k_new, v_new = rows_to(where, dtype, q[picked], k[picked], v[picked])
    if mask is not None:
        mask = mask[picked if mask.device == q.device else rows_in_part(inputs, rows, mask.device)[0]]
    if local is None:
        view.k[:, :, slot:slot + 1], view.v[:, :, slot:slot + 1] = k_new, v_new
        k_seen, v_seen = view.k[:, :, :end], view.v[:, :, :end]
    else:  # finished rows left the batch: attend over the active rows' cache only
        if len(local) == 0:
            return None
        local_dev = rows_in_part(inputs, rows, where)[1]
        view.k[local_dev, :, slot:slot + 1], view.v[local_dev, :, slot:slot + 1] = k_new, v_new
        k_seen = view.k[:, :, :end].index_select(0, local_dev)
        v_seen = view.v[:, :, :end].index_select(0, local_dev)
        k_new, v_new = view.k[:, :, slot:slot + 1].clone(), view.v[:, :, slot:slot + 1].clone()
    wrapped = start >= capacity  # a ring's slots no longer hold the shared prefix
    shared, read_shared = part_shared(inputs, rows, local) if where.type == "cpu" and not wrapped else (None, 0.0)
    out, kernel = attend_named(q_part, k_seen, v_seen, mask, sparsity, shared=shared, softcap=softcap, sinks=sinks)
    if kernel != "cpu-native":
        read_shared = 0.0
    seen = (k_seen.nbytes + v_seen.nbytes) * (1 - read_shared / k_seen.shape[2])
    return out.to(q.device, q.dtype, non_blocking=True), k_new, v_new, kernel, int(seen)


def attend_codes(view, q, k, v, mask, start: int, inputs: dict):
    """attend_part over a compressed part attended as stored where it lives: host RAM by the CPU's kernel
    (quantized_attention), GPU memory by Triton's (quantized_attention_triton). The new token's k, v stand at its
    slot, and are returned for the part's home, in its rows (the finished rows' zeros)."""
    part, where = view.part, view.k.device
    slot, end = start % part.capacity, min(start + 1, part.capacity)
    picked, local = rows_in_part(inputs, part.rows, q.device)
    if local is not None and len(local) == 0:
        return None
    q_part, k_new, v_new = rows_to(where, part.dtype, q[picked], k[picked], v[picked])
    if mask is not None:
        mask = mask[picked if mask.device == q.device else rows_in_part(inputs, part.rows, mask.device)[0]]
    local_here = None if local is None else rows_in_part(inputs, part.rows, where)[1]
    keys, values = view.k.arrays(end), view.v.arrays(end)
    if where.type == "cpu" and not quantized_attention_triton.asked():
        out = quantized_attention.attend(q_part, keys, values, view.k.config, mask, slot, k_new, v_new, local_here)
        kernel = "cpu-4bit"
    else:
        out = quantized_attention_triton.attend(q_part, keys, values, None if mask is None else mask.to(where), slot,
                                                k_new, v_new, local_here)
        kernel = "triton-4bit"
    active = part.rows.stop - part.rows.start if local is None else len(local)
    seen = part.nbytes_at(end) * active // (part.rows.stop - part.rows.start)
    if local is not None:
        k_new, v_new = scatter_rows(k_new, local_here, part.rows), scatter_rows(v_new, local_here, part.rows)
    return out.to(q.device, q.dtype, non_blocking=True), k_new, v_new, kernel, int(seen)


def part_shared(inputs: dict, rows: slice, local: torch.Tensor | None):
    """(shared_rows of the part's rows present (`local`, or all), the positions a row reads from the source row
    on average, not from its own memory): made once a step, not once a layer."""
    if "shared pad" not in inputs:
        return None, 0.0
    key = ("shared rows", rows.start)
    if key not in inputs:
        pad, columns = inputs["shared pad"]
        pad = pad[rows] if local is None else pad[rows][local.cpu()]
        shared = shared_rows(pad, columns)
        others = 0 if shared is None else int((columns - pad).clamp(min=0).sum()) - (columns - int(pad.min()))
        inputs[key] = shared, others / len(pad)
    return inputs[key]


def part_rows(rows: slice, active: torch.Tensor | None):
    """(index into the active rows, local row indices within the part or None when all rows are active)."""
    if active is None:
        return rows, None
    inside = (active >= rows.start) & (active < rows.stop)
    return inside.nonzero().squeeze(1), active[inside] - rows.start


def rows_in_part(inputs: dict, rows: slice, device: torch.device):
    """`part_rows` of the step's active rows of a batch (`inputs`), both indices on `device`: made once a step
    and kept in `inputs`, not once a layer (indexing a CUDA tensor with host indices copies them and waits)."""
    if inputs["active"] is None:
        return rows, None
    key = ("rows in part", rows.start, device)
    if key not in inputs:
        picked, local = part_rows(rows, inputs["active"])
        inputs[key] = picked.to(device), local.to(device)
    return inputs[key]


def rows_to(where: torch.device, dtype: torch.dtype, *parts: torch.Tensor) -> list[torch.Tensor]:
    """(rows, heads_i, t, D) tensors on `where` in `dtype`; from another device in one copy (one sync, not three)."""
    if parts[0].device == where:
        return [p.to(dtype) for p in parts]
    return joined_to(where, dtype, parts)


def joined_to(where, dtype: torch.dtype, parts, non_blocking: bool = False) -> list[torch.Tensor]:
    joined = torch.cat(parts, 1).to(where, dtype, non_blocking=non_blocking)
    return list(joined.split([p.shape[1] for p in parts], 1))


def scatter_rows(values: torch.Tensor, local: torch.Tensor, rows: slice) -> torch.Tensor:
    full = values.new_zeros((rows.stop - rows.start, *values.shape[1:]))
    full[local.to(values.device)] = values
    return full

