"""The state of one block of sequences (gpu_batch_size x num_gpu_batches) during generation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Block:
    tokens: torch.Tensor  # (N, prompt_len + gen_len) on the compute device, left-padded prompts first
    pad: torch.Tensor  # (N,) left padding of each row
    prompt_len: int
    gen_len: int
    gpu_batch_size: int
    finished: torch.Tensor  # (N,) bool, on the host
    eos: tuple[int, ...]
    length: torch.Tensor  # (N,) tokens each row generated before it finished (its eos included)
    generated: int = 0  # steps taken
    generators: list[torch.Generator] | None = None  # (N,) per-row sampling generators, or None
    pad_host: torch.Tensor | None = None  # `pad` on the host: which batches need a mask, without a device read
    # per batch: (active rows on the host, the same on the compute device), copied when they change
    _device_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _eos_ids: torch.Tensor | None = field(default=None, repr=False)  # eos on the compute device

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], rows: int, gpu_batch_size: int, gen_len: int,
                     pad_id: int, eos: tuple[int, ...], device: torch.device,
                     generators: list[torch.Generator] | None = None) -> Block:
        """Left-pad `prompts` into a block of `rows`; rows past len(prompts) are filler, finished at once.

        `generators`, one per row, make each row's samples independent of the other rows."""
        prompt_len = max(len(p) for p in prompts)
        tokens = torch.full((rows, prompt_len + gen_len), pad_id, dtype=torch.long)
        pad = torch.full((rows,), prompt_len - 1, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):prompt_len] = torch.tensor(p, dtype=torch.long)
            pad[i] = prompt_len - len(p)
        tokens[len(prompts):, prompt_len - 1] = prompts[0][-1]
        finished = torch.zeros(rows, dtype=torch.bool)
        finished[len(prompts):] = True
        length = torch.zeros(rows, dtype=torch.long)
        if generators is not None and len(generators) != rows:
            raise ValueError(f"{len(generators)} generators for a block of {rows} rows")
        return cls(tokens.to(device), pad.to(device), prompt_len, gen_len, gpu_batch_size, finished, eos, length,
                   generators=generators, pad_host=pad)

    def rows(self, batch: int) -> slice:
        return slice(batch * self.gpu_batch_size, (batch + 1) * self.gpu_batch_size)

    def row_generators(self, batch: int, active: torch.Tensor | None = None) -> list[torch.Generator] | None:
        """The per-row sampling generators of GPU batch `batch`'s active rows (None: the global RNG)."""
        if self.generators is None:
            return None
        generators = self.generators[self.rows(batch)]
        return generators if active is None else [generators[i] for i in active.tolist()]

    def batch_done(self, batch: int) -> bool:
        return bool(self.finished[self.rows(batch)].all())

    def step_span(self, step: int) -> tuple[int, int]:
        """(first cache position written, number of new positions) for a step; step 0 is the prefill."""
        return (0, self.prompt_len) if step == 0 else (self.prompt_len + step - 1, 1)

    def positions(self, batch: int, start: int, t: int) -> torch.Tensor:
        pos = torch.arange(start, start + t, device=self.tokens.device)[None] - self.pad[self.rows(batch), None]
        return pos.clamp(min=-1)

    def mask(self, batch: int, start: int, t: int) -> torch.Tensor:
        """(rows, 1, t, start + t) bool: causal, padding hidden; a padding query sees itself (no NaN)."""
        device = self.tokens.device
        q = torch.arange(start, start + t, device=device)[:, None]
        k = torch.arange(start + t, device=device)[None]
        real = k[None] >= self.pad[self.rows(batch), None, None]
        return ((k <= q)[None] & (real | (k == q)[None]))[:, None]

    def padded(self, batch: int, active: torch.Tensor | None) -> bool:
        """Whether a row of GPU batch `batch` still generating is padded (else attention needs no mask)."""
        pad = self.pad_host if self.pad_host is not None else self.pad.cpu()
        pad = pad[self.rows(batch)]
        return bool((pad if active is None else pad[active]).any())

    def active_rows(self, batch: int) -> torch.Tensor | None:
        """Rows of GPU batch `batch` still generating (host indices within the batch); None when all are."""
        done = self.finished[self.rows(batch)]
        return (~done).nonzero().squeeze(1) if done.any() else None

    def device_rows(self, batch: int, active: torch.Tensor) -> torch.Tensor:
        """`active` on the compute device, copied only when the batch's active rows changed."""
        cached = self._device_rows.get(batch)
        if cached is None or cached[0].shape != active.shape or not torch.equal(cached[0], active):
            cached = self._device_rows[batch] = (active, active.to(self.tokens.device))
        return cached[1]

    def record(self, batch: int, next_ids: torch.Tensor, active: torch.Tensor | None,
               active_device: torch.Tensor | None = None) -> None:
        """Store the tokens the active rows of one GPU batch chose at this step (`active_device`: `active` on
        the compute device, when the caller has it)."""
        rows, column = self.rows(batch), self.prompt_len + self.generated
        if active is None:
            self.length[rows] += 1
            self.tokens[rows, column] = next_ids
            return
        self.length[rows.start + active] += 1
        if active_device is None:
            active_device = self.device_rows(batch, active)
        self.tokens[rows.start + active_device, column] = next_ids

    def end_step(self) -> None:
        """Rows that emitted eos this step finish (one device-to-host read per step, not per batch)."""
        if self.eos:
            column = self.tokens[:, self.prompt_len + self.generated]
            if self._eos_ids is None:
                self._eos_ids = torch.tensor(self.eos, device=column.device)
            self.finished |= torch.isin(column, self._eos_ids).cpu()
        self.generated += 1

    def new_tokens(self, row: int) -> list[int]:
        return self.tokens[row, self.prompt_len:self.prompt_len + int(self.length[row])].tolist()
