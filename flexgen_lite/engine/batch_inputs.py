"""A GPU batch's inputs to a step (Engine's part of it): which rows it computes (those still generating, or every
row where its layers then replay from graphs), their positions, masks (each sliding window's too) and rotary tables.
block_schedule.py holds the state they use: config, rotary, dtype, unpadded_without_mask, layer_graph_decode,
layer_graphs, acts, cache, _in_place."""

from __future__ import annotations

from .block import Block
from .kv_cache import ring_positions


class BatchInputs:
    def _every_row(self, block: Block, b: int, step: int) -> bool:
        """Whether batch b's decode step computes every row (finished ones not sampled), so that its layers replay
        from graphs (layer_graph.py), where that costs less than the eager layers over the rows left; only where its
        attention is a graph's too (the rows' cache on the GPU: a CPU would attend finished rows for nothing)."""
        if (step == 0 or not self.layer_graph_decode or not self.acts.in_place(b)
                or not self.layer_graphs.attends(self.cache, 0, b, self._in_place[b])):
            return False
        active = block.active_rows(b)
        return active is not None and self.layer_graphs.every_row_wins(block, len(active))

    def _batch_inputs(self, block: Block, b: int, start: int, t: int, every_row: bool = False) -> dict:
        """Positions, mask (None: causal, no row padded) and rotary tables of the rows of batch b that still
        generate (every_row: of all its rows, those generating in "sampled", on the host and the device)."""
        active = block.active_rows(b)
        sampled = None
        if every_row and active is not None:
            sampled, active = (active, block.device_rows(b, active)), None
        active_device = None if active is None else block.device_rows(b, active)
        positions, mask = block.positions(b, start, t), None
        if not self.unpadded_without_mask or block.padded(b, active) or (start and t > 1):  # a suffix: not causal
            mask = block.mask(b, start, t)
        # per sliding window that hides a position here, the mask limited to it (layer_mask); in decode, the mask
        # of the window's ring (kv_cache: no mask where no row is padded)
        bites = [w for w in set(self.config.windows) if 0 < w < start + t]
        if start >= block.prompt_len:
            masks = {w: None if mask is None else mask[..., ring_positions(start, w, mask.device)] for w in bites}
        else:
            masks = {w: block.windowed(b, start, t, w, mask) for w in bites}
        if active_device is not None:
            positions = positions[active_device]
            mask = None if mask is None else mask[active_device]
            masks = {w: None if m is None else m[active_device] for w, m in masks.items()}
        rope = None if self.rotary is None else self.rotary.tables(positions, self.dtype)
        inputs = {"positions": positions, "mask": mask, "masks": masks, "rope": rope, "active": active,
                  "active_device": active_device, "sampled": sampled}
        if block.shared and start >= block.prompt_len:  # decode: the rows' prefix read from one row on a CPU
            inputs["shared pad"] = (block.host_pad()[block.rows(b)], block.shared)
        return inputs
