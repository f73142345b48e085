"""Weight slots: the compute-device buffers that non-resident weights are copied or decompressed into for a
layer's run, and the fetch that fills them (from host RAM, staging, or a CPU's mapped or directly read pages)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..kernels import int4_gemv_triton, native
from ..kernels.compression import dequantize, from_bytes
from ..kernels.int4_cost import int4_path
from ..kernels.int4_gemv_triton import CodesMatrix
from ..kernels.int4_matmul import Int4Weight
from ..kernels.quantization import QuantizedTensor
from ..system.devices import ComputeDevice
from .storage import PAGE, DiskFile, MemoryLedger, Staging
from .trace import DEQUANTIZE, NULL, WEIGHT_LOAD
from .weights import StoredWeight


@dataclass
class Deferred:
    """A mapped compressed weight fetched but not yet dequantized into its slot (see WeightSlots.complete)."""

    weight: StoredWeight
    slot: torch.Tensor


class WeightSlots:
    """Compute-device buffers that non-resident weights are copied or decompressed into, allocated on first
    use: two per decoder layer kind and name (the layer computed and the one prefetched), one per weight of
    the embedding and head. A slot that still holds the weight asked for is not filled again (a tied
    embedding and head share one).

    On a CPU, disk-homed weights need no slot: their layer's file is memory-mapped, its pages faulted in
    by `fetch` (on an I/O thread, beside compute) and unmapped by `release` once the layer has run. At most
    one layer per name is mapped at a time; the ledger counts that window once per name."""

    def __init__(self, device: ComputeDevice, ledger: MemoryLedger, staging: Staging,
                 direct_reads: bool = False) -> None:
        """direct_reads: read layer extents with O_DIRECT (when the page cache cannot keep them): into staging
        with CUDA, into buffers of their own on a CPU (`into_buffers`: nothing of the files is mapped then)."""
        self.device, self.ledger, self.staging, self.direct_reads = device, ledger, staging, direct_reads
        self.into_buffers = direct_reads and not device.host_is_separate
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.extents: dict[tuple, torch.Tensor] = {}  # CPU, direct reads: a layer file's bytes, per (kind, parity)
        self.holds: dict[tuple, StoredWeight] = {}
        self.windows: set[tuple] = set()
        self.link_stream = None  # CUDA: 4-bit codes cross on it (_codes_then_dequantize)
        self.codes_free: dict[tuple, torch.cuda.Event] = {}  # per codes buffer: its last dequantization done
        self.step_rows = 0  # rows of the step being fetched for (the schedule sets it; 0: unknown)
        self.step_uses = 1  # GPU batches of that step, each a product by every matrix

    def fetch(self, weights: dict[str, StoredWeight], slot_key: tuple | None, trace=NULL) -> dict[str, torch.Tensor]:
        """`slot_key` (kind, parity) for decoder layers; None for one slot per weight. `trace` gets a span per
        disk read (its bytes: the weights' stored bytes) and per copy or decompression into a slot."""
        to_fill = {name: t for name, t in weights.items()
                   if not t.resident and self.holds.get(self._key(slot_key, name, t)) is not t}
        from_disk = [t for t in to_fill.values() if t.tier == "disk"]
        host, held = {}, []
        if from_disk:
            with trace.span(WEIGHT_LOAD["disk"], sum(t.nbytes for t in from_disk)):
                host, held = self._read_layer(from_disk, slot_key)
        out = {}
        for name, t in weights.items():
            key = self._key(slot_key, name, t)
            if t.resident:
                out[name] = t.data
            elif t.mapped is not None and t.compression is None:
                window = key if slot_key is None else (slot_key[0], name)
                if window not in self.windows:
                    self.windows.add(window)
                    self.ledger.add("gpu", t.nbytes)
                out[name] = t.mapped
            else:
                buf = self._buffer(key, t.shape, t.dtype)
                kept = name in to_fill and self._kept_as_codes(t)
                if name not in to_fill:
                    out[name] = buf
                elif t.mapped is not None or t.int4 or kept:  # dequantized (or not) by complete(), in the
                    out[name] = Deferred(t, buf)             # compute thread
                else:
                    codes = self._buffer((*key, "codes"), (t.nbytes,), torch.uint8) \
                        if t.compression is not None and t.tier != "gpu" and self.device.host_is_separate else None
                    if codes is not None and self.device.is_cuda:
                        out[name] = self._codes_then_dequantize(t, key, buf, codes, host.get(id(t)), trace)
                    else:
                        with trace.span(*self._fill_stage(t), stream="copy:weights"):
                            out[name] = t.fetch(self.device, buf, host.get(id(t)), codes)
                if kept:  # its product may go through the slot (CodesMatrix.dense): no longer what it held
                    self.holds.pop(key, None)
                elif not t.int4:  # the kernel's weights may never fill their slot
                    self.holds[key] = t
        for buf in held:  # copied out of on this thread's stream: reused once those copies are done
            self.staging.release(buf, self.device.device)
        return out

    def _codes_then_dequantize(self, t: StoredWeight, key: tuple, slot: torch.Tensor, codes: torch.Tensor,
                               host: torch.Tensor | None, trace) -> torch.Tensor:
        """CUDA: 4-bit codes across the link on a stream of their own, then dequantized into the slot on this
        thread's (weights) copy stream, which the engine ordered after compute's last read of the slot and which
        compute waits for. The link then waits only for the last dequantization out of this codes buffer (two
        layers back), never for compute or for this layer's dequantization: the next layer's codes cross
        while this one is dequantized and computed."""
        device = self.device.device
        if self.link_stream is None:
            self.link_stream = torch.cuda.Stream(device)
        here, link = torch.cuda.current_stream(device), self.link_stream
        with torch.cuda.stream(link):
            if (free := self.codes_free.get(key)) is not None:
                link.wait_event(free)
            with trace.span(WEIGHT_LOAD[t.tier], 0 if t.tier == "disk" else t.nbytes, stream="copy:weights"):
                t.copy_codes(codes, host)
            arrived = torch.cuda.Event()
            arrived.record(link)
        here.wait_event(arrived)  # staging released after this (fetch) waits for the copy too
        with trace.span(DEQUANTIZE, math.prod(t.shape) * t.dtype.itemsize, stream="copy:dequantize"):
            dequantize(from_bytes(codes, t.shape, t.compression), t.dtype, out=slot)
        self.codes_free[key] = done = torch.cuda.Event()
        done.record(here)
        return slot

    def _buffer(self, key: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A slot of the compute device, made on first use and counted."""
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, device=self.device.device)
            self.ledger.add("gpu", buf.numel() * buf.element_size())
        return buf

    def _fill_stage(self, t: StoredWeight) -> tuple[str, int]:
        """(stage, bytes) of filling a slot: across a link a load from t's tier (its bytes counted at the disk
        read for disk weights; a compressed one's decompression included); on a CPU only a decompression
        (bytes: its output)."""
        if self.device.host_is_separate:
            return WEIGHT_LOAD[t.tier], 0 if t.tier == "disk" else t.nbytes
        return DEQUANTIZE, math.prod(t.shape) * t.dtype.itemsize

    def complete(self, fetched: dict, rows: int, trace=NULL, uses: int = 1) -> dict[str, torch.Tensor]:
        """Dequantize, in the calling (compute) thread, the weights `fetch` left mapped. On a CPU an I/O
        thread dequantizing beside compute only oversubscribes the same cores; there it only pages in.
        Weights stored for the int4 kernel stay as they are when it multiplies `uses` batches of `rows` rows
        faster."""
        for name, value in fetched.items():
            if isinstance(value, Deferred) and self._kept_as_codes(value.weight):
                t = value.weight
                fetched[name] = CodesMatrix(t.data, value.slot, self.step_uses,
                                            t.row_groups if self.device.device.type == "cpu" else None)
            elif isinstance(value, Deferred) and value.weight.int4:
                fetched[name] = self._int4(value, rows, uses, trace)
            elif isinstance(value, Deferred):
                t = value.weight
                with trace.span(DEQUANTIZE, math.prod(t.shape) * t.dtype.itemsize, stream="compute"):
                    fetched[name] = t.fetch(self.device, value.slot, None)
                if not self.into_buffers:
                    t.data.release(t.offset, t.nbytes)  # the codes were read: unmap them
        return fetched

    def _int4(self, value: Deferred, rows: int, uses: int, trace) -> torch.Tensor | Int4Weight:
        """The kernel's weight (multiplied as stored, or by tiles through the slot), or its dequantization into
        the slot (as W.T, stored (K, N)). Mapped pages stay until `release`: the layer reads them as it runs."""
        t, weight = value.weight, value.weight.int4_weight()
        path = int4_path(weight, rows, t.dtype, value.slot, uses)
        if path == "kernel":
            return weight
        if path == "tiles":
            return dataclasses.replace(weight, tiles=value.slot.view(-1))
        n, k = t.shape
        with trace.span(DEQUANTIZE, math.prod(t.shape) * t.dtype.itemsize, stream="compute"):
            return weight.dequantize_t(value.slot.view(k, n)).t()

    def _kept_as_codes(self, t: StoredWeight) -> bool:
        """A 4-bit matrix in compute memory that a decode step of `step_rows` rows multiplies as stored
        (int4_gemv_triton.CodesMatrix), not dequantized into its slot beforehand: unless this kind of product
        measured faster through the slot, which is then filled beside compute as before."""
        return (0 < self.step_rows <= codes_rows(self.device.device) and codes_in_memory(t, self.device.device)
                and not int4_gemv_triton.slot_chosen(t.shape, self.step_rows, t.dtype, t.compression.group_size,
                                                     self.step_uses))

    @staticmethod
    def _key(slot_key: tuple | None, name: str, t: StoredWeight) -> tuple:
        return (*slot_key, name) if slot_key is not None else (id(t),)

    def _read_layer(self, weights, slot_key: tuple | None) -> tuple[dict[int, torch.Tensor], list]:
        """Disk-homed weights of one layer: on a CPU, mapped pages faulted in, or (direct reads: a cold disk,
        or more on disk than the page cache keeps) the file's extent read with O_DIRECT into a buffer of its
        own that the weights then use in place of their mapping; with CUDA each file's extent read with one
        large read into staging. ({id(weight): its bytes in staging}, staging buffers held) across a link."""
        files: dict[int, tuple[DiskFile, list[StoredWeight]]] = {}
        for t in weights:
            if isinstance(t.data, DiskFile):
                files.setdefault(id(t.data), (t.data, []))[1].append(t)
        if not self.device.host_is_separate:
            for file, ts in files.values():
                if self.into_buffers and slot_key is not None:
                    self._read_extent(file, ts, slot_key)
                else:
                    file.prefetch()
            return {}, []
        host, held = {}, []
        for file, ts in files.values():  # one file per layer: a layer's extent
            held.append(buf := self.staging.take("weights", file.nbytes))
            file.read_into(buf.data, direct=self.direct_reads)
            host.update({id(t): buf.data[t.offset:t.offset + t.nbytes] for t in ts})
        return host, held

    def _read_extent(self, file: DiskFile, ts: list[StoredWeight], slot_key: tuple) -> None:
        """A CPU's direct read: page cache churn (faulting pages in, dropping them) costs the cores more than
        compute can spare (measured: a bf16 matmul beside it ran 4.3x slower; beside O_DIRECT reads of the
        same rate 1.16x). The buffer, page-aligned, is allocated once per (kind, parity) and counted."""
        buf = self.extents.get(slot_key)
        if buf is None or buf.numel() < file.nbytes:
            raw = torch.empty(file.nbytes + PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % PAGE
            buf = self.extents[slot_key] = raw[start:start + file.nbytes]
            self.ledger.track(buf, "gpu", raw.numel())  # until a larger one replaces it
        file.read_into(buf[:file.nbytes], direct=True)
        for t in ts:
            part = buf[t.offset:t.offset + t.nbytes]
            t.mapped = part if t.compression is not None else part.view(t.dtype).view(t.shape)

    def release(self, weights: dict[str, StoredWeight]) -> None:
        """Unmap a layer's mapped disk pages once it has run (memory budgets count one layer per name)."""
        if self.into_buffers:
            return  # read into buffers of their own (_read_extent): nothing mapped
        done = set()
        for t in weights.values():
            if t.mapped is not None and (t.compression is None or t.int4) and id(t.data) not in done:
                done.add(id(t.data))
                t.data.release()


def codes_in_memory(t: StoredWeight, device: torch.device) -> bool:
    """Whether `t` is a 4-bit matrix held as codes in `device`'s memory that a kernel may multiply as stored: the
    GPU's (int4_gemv_triton: a layout it reads, enabled there), a CPU's for FlexGen's grouping (row_groups_fit)."""
    if not (isinstance(t.data, QuantizedTensor) and t.mapped is None and t.data.data.device == device):
        return False
    if int4_gemv_triton.supported(t.data, t.dtype) and int4_gemv_triton.enabled_on(device):
        return True
    return device.type == "cpu" and int4_gemv_triton.row_groups_fit(t.data)


def codes_rows(device: torch.device) -> int:
    """Rows a decode step may have for its 4-bit matrices to be kept as codes: the GPU kernel's, the CPU's."""
    return native.ROW_GROUP_ROWS if device.type == "cpu" else int4_gemv_triton.GEMV_ROWS
