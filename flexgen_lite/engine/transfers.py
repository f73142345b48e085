"""The zig-zag schedule's transfers (Engine's part of it): a layer's weights fetched into their slot and a
batch's cache parts loaded on an I/O thread (the copy stream on a GPU), ahead of the compute that reads them;
new cache entries written home, in stream order where nothing waits for them, else in the background (files:
staged on the device, then copied out and written on the store stream), a later load of the same part waiting
for them. block_schedule.py holds the state they use: config, specs, weights, local, device, io, trace,
weight_slots, cache, cache_slots, staging, _in_place, _cache_loads, _pending_stores, _load_count."""

from __future__ import annotations

from concurrent.futures import Future

from .trace import CACHE_STORE, COMPUTE_LANE
from .weights import DECODER_KINDS


class Transfers:
    def _wait(self, future: Future):
        value, event = future.result()
        self.device.wait_for(event)
        return value

    def _prefetch_weights(self, j: int) -> Future | None:
        if self.local[j]:
            return None
        after = self.device.compute_event()  # the slot being refilled was last read by compute so far
        return self.io.submit(self._load_weights, j, self._slot_key(j), after)

    def _slot_key(self, j: int) -> tuple | None:
        spec = self.specs[j]
        return (spec.kind, spec.index % 2) if spec.kind in DECODER_KINDS else None

    def _load_weights(self, j: int, slot_key: tuple | None, after):
        with self.device.on_copy_stream(after) as done:
            return self.weight_slots.fetch(self.weights[j], slot_key, self.trace), done()

    def _prefetch_cache(self, layer: int, b: int, start: int) -> Future:
        for f in self._pending_stores.pop((layer, b), ()):
            f.result()  # the previous step's new entries must be home before they are read back
        self._load_count += 1
        after = self.device.compute_event()
        return self.io.submit(self._load_cache, layer, b, start, self._load_count % 2, after)

    def _prefetch_next_cache(self, layer: int, batches: list[int], i: int, start: int) -> None:
        if i + 1 < len(batches):
            key = (layer, batches[i + 1])
        elif layer + 1 < self.config.num_layers:
            key = (layer + 1, batches[0])
        else:
            return
        if not self._in_place[key[1]]:
            self._cache_loads[key] = self._prefetch_cache(*key, start)

    def _load_cache(self, layer: int, b: int, length: int, parity: int, after):
        with self.device.on_copy_stream(after, "cache") as done:
            return self.cache.load(layer, b, length, self.cache_slots, parity, self.trace,
                                   self.prefix_reads.get(b)), done()

    def _store_cache(self, layer: int, b: int, part, k_new, v_new, start: int) -> None:
        """Write new cache entries home. Memory in stream order (across the link: one asynchronous copy into
        page-locked host RAM). Files in the background: across the link laid out on the device here, then
        copied out and written on the store stream; on a CPU quantized there too. Later loads of the same
        part wait for them. A ring's part (kv_cache) keeps the positions its window holds, where it holds them."""
        k_new, v_new, start = part.placed(k_new, v_new, start)
        stage, nbytes = CACHE_STORE[part.tier], part.nbytes_at(k_new.shape[2])
        separate = self.device.host_is_separate
        # in order where no load waits for it: a compressed part attended as stored, in place
        if part.tier != "disk" and (separate or self.cache.compression is None or part.direct):
            with self.trace.span(stage, nbytes, stream=COMPUTE_LANE):
                self.cache.store(part, k_new, v_new, start)
            return
        if separate:
            staged, after = self.cache.stage(part, k_new, v_new), self.device.compute_event()
            future = self.io.submit(self._write_staged, stage, nbytes, part, staged, start, after)
        else:
            future = self.io.submit(self._store_in_background, stage, nbytes, part, k_new, v_new, start)
        self._pending_stores.setdefault((layer, b), []).append(future)

    def _store_in_background(self, stage: str, nbytes: int, part, k_new, v_new, start: int) -> None:
        with self.trace.span(stage, nbytes):
            self.cache.store(part, k_new, v_new, start)

    def _write_staged(self, stage: str, nbytes: int, part, staged, start: int, after) -> None:
        """On an I/O thread: `staged` (device tensors, kept alive here until copied) out to the part's file."""
        with self.trace.span(stage, nbytes), self.device.on_copy_stream(after, "store"):
            self.cache.write_staged(part, staged, start, self.staging)
