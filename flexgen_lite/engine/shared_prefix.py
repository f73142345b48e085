"""A block's common prompt prefix in the prefill (block.shared_columns): computed once, as one row, at each layer
before the rows; its k, v are then spread into each row's shared columns, so each row computes only its own
positions and the cache written home is what a prefill of the whole prompts writes (docs/architecture.md).

Every row then holds the prefix's k, v alike, so decode attention on a CPU reads them from one row (shared_rows),
and a cache part in host RAM brings them across the link for one row (PrefixRead, KVCache.prefix_reads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import layers as L
from ..models.config import ModelConfig
from .block import Block


class SharedPrefix:
    def __init__(self, block: Block, config: ModelConfig, rotary: L.Rotary | None, dtype: torch.dtype,
                 attend: Callable) -> None:
        """attend(q, k, v, mask): the engine's attention (it records which kernel ran)."""
        self.block, self.config, self.attend = block, config, attend
        self.positions = torch.arange(block.shared, device=block.prefix.device)[None]
        self.rope = None if rotary is None else rotary.tables(self.positions, dtype)
        self.h = self.k = self.v = None

    def through(self, spec, w: dict) -> None:
        """The prefix through layer `spec` (its weights `w`); an attention layer keeps its k, v for the rows."""
        cfg = self.config
        if spec.kind == "embed":
            self.h = L.embed(w, self.block.prefix, self.positions, cfg)
        elif spec.kind == "mlp":
            self.h = L.mlp(w, self.h, cfg)
        elif spec.kind == "attention":
            x = L.block_input(self.h, w, cfg)
            q, self.k, self.v = L.qkv(w, x, L.layer_rope(self.rope, cfg, spec.index), cfg)
            window, n = cfg.window(spec.index), self.block.shared
            mask = None  # causal
            if 0 < window < n:
                keys = torch.arange(n, device=q.device)
                mask = ((keys[None] <= keys[:, None]) & (keys[:, None] - keys[None] < window))[None, None]
            self.h = L.attention_output(w, self.attend(q, self.k, self.v, mask, L.sinks(w, cfg)), self.h, cfg)

    def index(self, b: int, active_device: torch.Tensor | None) -> torch.Tensor:
        """(rows, shared) for GPU batch b's computing rows: the prefix position of each row's each shared column
        (row i's column c holds prefix token c - pad_i; its padding columns, masked, read position 0)."""
        pad = self.block.pad[self.block.rows(b)]
        if active_device is not None:
            pad = pad[active_device]
        return (torch.arange(self.block.shared, device=pad.device)[None] - pad[:, None]).clamp(min=0)

    def spread(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's prefill k, v (rows, kv_heads, t, D) after its rows' shared columns of this layer's prefix:
        (rows, kv_heads, shared + t, D) each."""
        return tuple(torch.cat((mine[0][:, index].transpose(0, 1), new), 2) for mine, new in ((self.k, k), (self.v, v)))


def shared_rows(pad: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Rows left-padded by `pad` (int64, on the host) whose columns [pad, columns) hold a shared prefix, as
    native.decode_attention takes them: every row's shared positions read from the least padded row's, shifted
    by the difference of their pads (source, shift, columns); None where no two rows share a position."""
    if len(pad) < 2 or not columns:
        return None
    source = int(pad.argmin())
    if int(pad[source]) >= columns:
        return None
    return torch.full_like(pad, source), (pad - pad[source]).contiguous(), columns


@dataclass
class PrefixRead:
    """A block's shared prompt prefix in a cache part's rows: its positions [0, columns) are alike in
    every row but shifted by the rows' pads, so across the link they are read for row `source` alone and spread
    to the others on the compute device: row r's position l is the source's index[l, r] (its own padding,
    masked, reads anything)."""

    source: int
    index: torch.Tensor  # (columns, rows) on the compute device, contiguous
    columns: int

    @classmethod
    def of_rows(cls, pad: torch.Tensor, columns: int, device: torch.device) -> PrefixRead | None:
        """For rows left-padded by `pad` (host) whose columns [pad, columns) hold the prefix; None when no two
        rows share a position."""
        shared = shared_rows(pad, columns)
        if shared is None:
            return None
        source, shift, _ = shared
        index = (torch.arange(columns)[:, None] - shift[None]).clamp(min=0)
        return cls(int(source[0]), index.to(device), columns)

    def moved(self, length: float) -> float:
        """The share of the part's positions [0, length) that crosses the link."""
        rows = self.index.shape[1]
        return ((length - self.columns) * rows + self.columns) / (length * rows)
