"""Decode attention of one layer and GPU batch over its KV cache parts, each where it lives (Engine's part of it):
compute memory's and slots' on the compute device, host RAM's on the CPU, in the schedule's thread or, beside a
GPU, on the CPU worker (pending_attention.py); the new token's k, v written into each part first, and home where
the part is not used in place."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from .block import layer_mask
from .cache_attention import attend_part, joined_to, rows_to
from .pending_attention import PendingAttention, pipelined
from .trace import ATTENTION, COMPUTE_LANE, CPU_ATTENTION


class DecodeAttention:
    """Engine's methods for decode attention (block_schedule.py holds the state they use: config, policy, device,
    trace, acts, cpu_worker, _worker_tasks, _kernels, _sinks_on_host; _store_cache is transfers.py's)."""

    def _decode_attention(self, layer: int, b: int, views, q, k, v, inputs, start: int, sinks=None) -> torch.Tensor:
        """Attention of one new token per active row, part by part, each where its cache view is (sinks: the
        layer's, gpt-oss)."""
        outs, window = [], self.config.window(layer)
        ready = inputs.pop("cache ready", None)  # the copies into slots: waited for by the first part read from one
        worker = pipelined(views, self.policy.overlap, self.device.host_is_separate, self.acts.in_place(b),
                           self.config.attn_softcap is None)
        on_host = None  # the new token's q, k, v on the host for the worker: one copy, in this thread
        for view in views:
            if not view.part.direct:  # a part used where it lives (compute memory, or the CPU's) does not wait
                self.device.wait_for(ready)
                ready = None
            on_cpu = view.part.on_cpu
            mask = layer_mask(inputs, self.config, layer)
            if mask is not None and view.k.device != mask.device:  # the same for all layers alike: moved once a step
                hosted = inputs.setdefault("masks on host", {})
                if window not in hosted:
                    hosted[window] = mask.to(view.k.device)
                mask = hosted[window]
            if worker and on_cpu:
                on_host = on_host or self._to_worker(q, k, v)
                outs.append(self.cpu_worker.submit(self._attend_on_worker, view, *on_host, mask, start, inputs,
                                                   self._host_sinks(layer, sinks)))
                self._worker_tasks.append(outs[-1])
                continue
            with self.trace.span(CPU_ATTENTION if on_cpu else ATTENTION, stream=None if on_cpu else COMPUTE_LANE) as s:
                out = self._attend_part(layer, b, view, q, k, v, mask, start, inputs, s,
                                        self._host_sinks(layer, sinks) if on_cpu else sinks)
            if out is not None:
                outs.append(out)
        self.device.wait_for(ready)
        if worker:
            return PendingAttention(outs, lambda f: self._collect(layer, b, f, start))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _to_worker(self, q, k, v) -> tuple:
        """The new token's q, k, v on the host for the worker, and what it waits for before reading them: from a
        GPU one asynchronous copy into page-locked memory and its event (a synchronous copy would drain the GPU's
        queue at every such layer, and the schedule's thread would then launch into an idle GPU); else the
        tensors themselves, and nothing."""
        if not self.device.is_cuda:
            return (*rows_to(torch.device("cpu"), q.dtype, q, k, v), None)
        on_host = joined_to(torch.device("cpu"), q.dtype, (q, k, v), non_blocking=True)  # torch pins its output
        copied = torch.cuda.Event(blocking=True)  # the worker sleeps on it, no core spins
        copied.record(torch.cuda.current_stream(self.device.device))  # this device's, not the current device's
        return (*on_host, copied)

    def _attend_on_worker(self, view, q, k, v, copied, mask, start: int, inputs: dict, sinks=None):
        """attend_part on the CPU worker (q, k, v and sinks on the host, once `copied`): (view, what it found)."""
        if copied is not None:
            copied.synchronize()
        with self.trace.span(CPU_ATTENTION) as s:
            found = attend_part(view, q, k, v, mask, start, inputs, self.policy.attn_sparsity, sinks=sinks)
            if found is not None:
                s.nbytes = found[4]
        return view, found

    def _host_sinks(self, layer: int, sinks: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's sink logits on the host (the C kernels take them there), copied once per engine: a copy each
        step would wait for the GPU's stream."""
        if sinks is None or sinks.device.type == "cpu":
            return sinks
        if layer not in self._sinks_on_host:
            self._sinks_on_host[layer] = sinks.to("cpu", torch.float32)
        return self._sinks_on_host[layer]

    def _collect(self, layer: int, b: int, future: Future, start: int) -> torch.Tensor | None:
        """A worker's part, in the schedule's thread: `_settle`d, its output on the compute device."""
        view, found = future.result()
        if found is None:
            return None
        out = self._settle(layer, b, view, found, start)
        if self.device.is_cuda:  # from pageable memory the copy would wait for the GPU's queue to drain first
            out = out.pin_memory()
        return out.to(self.device.device, non_blocking=True)

    def _attend_part(self, layer: int, b: int, view, q, k, v, mask, start: int, inputs: dict, span, sinks=None):
        """Attention over one cache part where it is (None when none of its rows is active), `_settle`d."""
        found = attend_part(view, q, k, v, mask, start, inputs, self.policy.attn_sparsity, self.config.attn_softcap,
                            sinks)
        if found is None:
            return None
        span.nbytes = found[4]
        return self._settle(layer, b, view, found, start)

    def _settle(self, layer: int, b: int, view, found: tuple, start: int) -> torch.Tensor:
        """A part's attention done (attend_part's `found`): its kernel noted, a mapped part's pages released, the
        new token's k, v (written into the part first) stored home where the part is not used in place, or is
        compressed and attended as stored; its output."""
        out, k_new, v_new, kernel, _ = found
        self._kernels.add(kernel)
        view.part.release()
        if not view.part.direct or view.part.quantized:
            self._store_cache(layer, b, view.part, k_new, v_new, start)
        return out
