"""How WeightSlots orders 4-bit weights across a CUDA link (issue 21), with fake streams and events on a CPU: the
codes cross on a stream of their own that waits only for the last dequantization out of the same codes buffer,
and are dequantized on the fetching thread's (weights) stream, which waits for them."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from flexgen_lite.engine.storage import MemoryLedger, Staging
from flexgen_lite.engine.weight_slots import WeightSlots
from flexgen_lite.engine.weights import StoredWeight
from flexgen_lite.kernels.compression import CompressionConfig, dequantize, quantize, to_bytes

CONFIG = CompressionConfig(4, 64, 1)


class FakeStream:
    def __init__(self, name: str = "link") -> None:
        self.name, self.waits = name, []

    def wait_event(self, event) -> None:
        self.waits.append(event)


class FakeEvent:
    def __init__(self, *args, **kwargs) -> None:
        self.stream = None

    def record(self, stream=None) -> None:
        self.stream = stream


def host_weight(seed: int) -> tuple[StoredWeight, torch.Tensor]:
    x = torch.randn(128, 192, generator=torch.Generator().manual_seed(seed))
    q = quantize(x, CONFIG)
    data = to_bytes(q)
    return StoredWeight(x.shape, torch.float32, "cpu", data, data.numel(), CONFIG), dequantize(q, torch.float32)


def test_codes_cross_on_their_own_stream_and_dequantize_on_the_weights_stream(monkeypatch):
    weights_stream, active, copied_on = FakeStream("weights"), [], []
    active.append(weights_stream)

    @contextlib.contextmanager
    def on(stream):
        active.append(stream)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: active[-1])
    real_copy = StoredWeight.copy_codes
    monkeypatch.setattr(StoredWeight, "copy_codes",
                        lambda self, codes, host: copied_on.append(active[-1].name) or real_copy(self, codes, host))
    device = SimpleNamespace(device=torch.device("cpu"), is_cuda=True, host_is_separate=True)
    slots = WeightSlots(device, MemoryLedger(), Staging(pin=False))

    first, first_values = host_weight(0)
    got = slots.fetch({"fc1.weight": first}, ("mlp", 0))["fc1.weight"]
    assert torch.equal(got, first_values) and copied_on == ["link"]
    link = slots.link_stream
    assert link.waits == []  # the codes buffer was never read: nothing to wait for
    arrived = weights_stream.waits[-1]
    assert arrived.stream is link  # the dequantization waited for the copy
    freed = slots.codes_free[("mlp", 0, "fc1.weight")]
    assert freed.stream is weights_stream  # recorded after the dequantization

    third, third_values = host_weight(2)  # layer 2: the same slot and codes buffer (parity 0)
    got = slots.fetch({"fc1.weight": third}, ("mlp", 0))["fc1.weight"]
    assert torch.equal(got, third_values)
    assert link.waits == [freed]  # the link waited only for layer 0's dequantization out of that buffer
    assert [k for k in slots.buffers if k[-1] == "codes"] == [("mlp", 0, "fc1.weight", "codes")]
