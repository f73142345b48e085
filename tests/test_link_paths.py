"""The data paths across the link to a GPU, on a CPU: host memory taken at its exact size (issue 12, finding 2),
the cache across the link position-major (finding 3), activations through host buffers and background writes
(finding 7), staging lanes (finding 8). CUDA itself (page-locking, streams, events) is what these cannot show."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine import weights
from flexgen_lite.engine.activations import Activations
from flexgen_lite.engine.kv_cache import KVCache
from flexgen_lite.engine.storage import PAGE, DiskStore, MemoryLedger, Staging
from flexgen_lite.kernels.compression import CompressionConfig
from flexgen_lite.system.devices import ComputeDevice, IOPool
from flexgen_lite.system.host_memory import ALIGN, HostArena, host_buffer, padded

from .conftest import PROMPTS

LINK = "cpu+link"


def inside(view: torch.Tensor, buf: torch.Tensor) -> tuple[int, int]:
    """(start, end) byte offsets of `view`'s memory within `buf`; fails if it lies outside."""
    start = view.data_ptr() - buf.data_ptr()
    end = start + view.numel() * view.element_size()
    assert start >= 0 and end <= buf.numel(), (start, end, buf.numel())
    return start, end


def assert_disjoint(spans: list[tuple[int, int]]) -> None:
    spans = sorted(spans)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start


def test_host_buffer_is_page_aligned_and_zeroed():
    buf = host_buffer(3 * PAGE + 5, pin=False)
    assert buf.data_ptr() % PAGE == 0 and buf.numel() == 3 * PAGE + 5 and not buf.any()


def test_arena_hands_out_aligned_disjoint_views_and_refuses_more_than_planned():
    sizes = [10, 64, 1, 200, 63]
    arena = HostArena(sum(padded(n) for n in sizes), pin=False)
    views = [arena.take(n) for n in sizes]
    assert [v.numel() for v in views] == sizes
    assert all((v.data_ptr() - arena.buffer.data_ptr()) % ALIGN == 0 for v in views)
    assert_disjoint([inside(v, arena.buffer) for v in views])
    assert arena.used == arena.nbytes
    with pytest.raises(MemoryError, match="planned wrong"):
        arena.take(1)


def test_cpu_tier_weights_share_one_arena_counted_exactly(tiny_models):
    """Across the link every cpu-homed weight is a view of one buffer of the planned size: the ledger's cpu
    bytes are the arena's, not a sum of rounded allocations."""
    policy = Policy(gpu_batch_size=2, weight_gpu_percent=20, weight_cpu_percent=50, dtype="float32")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=policy, device=LINK) as m:
        host = {id(t): t for layer in m.engine.weights for t in layer.values() if t.tier == "cpu"}.values()
        assert host and not any(t.resident for t in host)
        storages = {t.data.untyped_storage().data_ptr() for t in host}
        assert len(storages) == 1  # one buffer
        buffer = torch.empty(0, dtype=torch.uint8).set_(next(iter(host)).data.untyped_storage())
        spans = [inside(t.data, buffer) for t in host]
        assert_disjoint(spans)
        assert m.ledger.current["cpu"] == buffer.numel() == sum(padded(t.nbytes) for t in host)


def test_cache_across_the_link_is_position_major_in_one_arena():
    device, ledger = ComputeDevice(LINK), MemoryLedger()
    disk = DiskStore()
    cache = KVCache(2, 2, 3, 10, 2, 8, torch.float32, (34, 33), device, disk, ledger)
    host = [s for per_batch in cache.parts for parts in per_batch for p in parts if p.tier == "cpu" for s in (p.k, p.v)]
    assert host and all(s.position_major and s.positions[:4].is_contiguous() for s in host)
    assert_disjoint([inside(s.positions, cache.arena.buffer) for s in host])
    assert ledger.current["cpu"] == cache.arena.nbytes == sum(padded(s.nbytes) for s in host)
    files = [p for per_batch in cache.parts for parts in per_batch for p in parts if p.tier == "disk"]
    assert files and all(p.k.file is not None and p.k.position_major and not p.direct for p in files)
    disk.close()


def test_cache_slots_of_device_and_cpu_attended_parts_are_apart():
    """A 4-bit part attended on the device and one attended on the CPU, of the same index and rows (batches 0
    and 1), each get slots in their own dtype and memory (issue 21, fix 5: they shared one, so on CUDA the CPU
    part's dequantization was handed a GPU buffer; here the CPU part got a float16 one for bfloat16)."""
    from flexgen_lite.engine.kv_cache import CacheSlots

    device, ledger, disk = ComputeDevice(LINK), MemoryLedger(), DiskStore()
    cache = KVCache(1, 3, 3, 10, 2, 64, torch.float16, (34, 33), device, disk, ledger, CompressionConfig(4, 64, -1),
                    torch.bfloat16)
    slots = CacheSlots(ledger, Staging(pin=False))
    cache.reserve_slots(slots)
    (gpu_part,), (cpu_part,) = cache.parts[0][0], cache.parts[0][1]
    assert (gpu_part.tier, cpu_part.tier, gpu_part.rows, cpu_part.on_cpu) == ("gpu", "cpu", cpu_part.rows, True)
    for part, dtype in ((gpu_part, torch.float16), (cpu_part, torch.bfloat16)):
        for parity in (0, 1):
            for buf, _ in cache._slots(0, part, parity, slots):
                assert buf.dtype == dtype
    values = [b for key, b in slots.buffers.items() if "values" in key]
    assert len({b.data_ptr() for b in values}) == len(values) == 2 * 2 * 2  # parts x parities x (k, v)
    disk.close()


GPU = torch.device("cuda", 0)  # where staged bytes were copied to (only named, never touched)


class FakeEvent:
    """A CUDA event's host side: done when the test says so."""

    made: list[FakeEvent] = []

    def __init__(self, blocking: bool = False) -> None:
        self.blocking, self.done, self.waited = blocking, False, False
        FakeEvent.made.append(self)

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


@pytest.fixture
def fake_cuda_staging(monkeypatch):
    """A Staging that believes it is pinned, with fake events and plain memory."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr("flexgen_lite.engine.storage.host_buffer", lambda n, pin: torch.zeros(n, dtype=torch.uint8))
    FakeEvent.made = []
    ledger = MemoryLedger()
    return Staging(pin=True, ledger=ledger), ledger


def test_staging_reads_into_a_second_buffer_while_copies_leave_the_first(fake_cuda_staging):
    staging, ledger = fake_cuda_staging
    a = staging.take("weights", 100)
    staging.release(a, GPU)
    b = staging.take("weights", 100)  # a's copies still run: another buffer, no wait
    assert b is not a and not FakeEvent.made[0].waited
    staging.release(b, GPU)
    c = staging.take("weights", 100)  # both busy, the lane is full: wait for the oldest
    assert c is a and FakeEvent.made[0].waited and not FakeEvent.made[1].waited
    staging.release(c, None)  # host copies only: nothing recorded
    assert len(FakeEvent.made) == 2
    d = staging.take("weights", 100)
    assert d is a and len(staging.lanes["weights"]) == 2
    staging.release(d, None)
    other = staging.take("cache", 40)  # lanes do not share buffers
    assert other not in staging.lanes["weights"] and other.data.numel() == 40
    assert ledger.current["cpu"] == 2 * 100 + 40


def test_staging_grows_a_buffer_and_counts_only_the_larger(fake_cuda_staging):
    staging, ledger = fake_cuda_staging
    a = staging.take("store", 100)
    staging.release(a, None)
    b = staging.take("store", 300)
    assert b is a and b.data.numel() == 300
    import gc

    gc.collect()
    assert ledger.current["cpu"] == 300


def test_staging_lane_holds_more_only_while_more_are_held(fake_cuda_staging):
    staging, _ = fake_cuda_staging
    held = [staging.take("store", 10) for _ in range(3)]  # three I/O threads writing at once
    assert len({id(b) for b in held}) == 3
    for b in held:
        staging.release(b, None)
    assert staging.take("store", 10) in held


@pytest.mark.parametrize("percents", [(0, 100), (0, 0), (50, 0)], ids=["cpu", "disk", "gpu-and-disk"])
def test_activations_across_the_link_round_trip_prefill_then_decode(tmp_path, percents):
    device, ledger, disk, io = ComputeDevice(LINK), MemoryLedger(), DiskStore(str(tmp_path)), IOPool(True)
    acts = Activations(2, percents, device, disk, ledger, io, Staging(pin=False))
    for shape in ((2, 7, 16), (2, 1, 16), (2, 1, 16)):  # prefill, then decode steps in the same buffers
        hs = [torch.randn(shape) for _ in range(2)]
        for b, h in enumerate(hs):
            acts.put(b, h)
        for b, h in enumerate(hs):
            got = acts.get(b)
            assert torch.equal(got, h)
            if acts.tiers[b] != "gpu":
                assert got.data_ptr() != h.data_ptr()  # a copy from its home, not the tensor put
    io.close()
    disk.close()


def test_a_failed_activation_write_surfaces_at_its_read(tmp_path, monkeypatch):
    device, disk, io = ComputeDevice(LINK), DiskStore(str(tmp_path)), IOPool(True)
    acts = Activations(1, (0, 0), device, disk, MemoryLedger(), io, Staging(pin=False))

    def full(self, src, offset=0):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("flexgen_lite.engine.storage.DiskFile.write", full)
    acts.put(0, torch.randn(1, 3, 4))
    with pytest.raises(OSError, match="No space"):
        acts.get(0)
    io.close()
    disk.close()


def test_link_runs_with_4_bit_weights_and_cache_equal_the_cpu_run(tiny_models, monkeypatch):
    """Every tier, 4-bit weights and cache: the copies and layouts change no value but the order of sums (fp32; the
    CPU multiplies its 4-bit weights with the int4 kernel, which a GPU does not have; its embedding and head are
    kept dense here, which a CPU would hold in 8 bits)."""
    monkeypatch.setattr(weights, "EIGHT_BIT", ())
    policy = Policy(gpu_batch_size=2, num_gpu_batches=3, weight_gpu_percent=30, weight_cpu_percent=30,
                    cache_gpu_percent=30, cache_cpu_percent=40, act_gpu_percent=30, act_cpu_percent=30,
                    dtype="float32", compress_weight=True, compress_cache=True)
    out = {}
    for device in ("cpu", LINK):
        with FlexGenLite(str(tiny_models["llama"][0]), policy=policy, device=device) as m:
            out[device] = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                         return_logits=True)
            codes = [k for k in m.engine.weight_slots.buffers if k[-1] == "codes"]
            assert bool(codes) == (device == LINK)  # 4-bit codes cross into slots of their own, then decompress
    assert out["cpu"][0] == out[LINK][0]
    # the CPU's int4 kernel sums in another order than the link's dequantized slots: ~1e-5 apart, except where such a
    # difference moves a new cache value across a 4-bit rounding boundary (one code off: measured 1.1e-3 at one step
    # of one row on an AVX2 CPU, 0.02% of the largest logit)
    diffs = [float((a - b).abs().max()) for x, y in zip(out["cpu"][1], out[LINK][1], strict=True)
             for a, b in zip(x, y, strict=True)]
    assert max(diffs) < 2e-3 and sorted(diffs)[len(diffs) // 2] < 5e-5


@pytest.mark.parametrize("policy", [
    Policy(gpu_batch_size=3, num_gpu_batches=2, weight_gpu_percent=30, weight_cpu_percent=30, cache_gpu_percent=34,
           cache_cpu_percent=33, act_gpu_percent=50, act_cpu_percent=0),
    Policy(gpu_batch_size=4, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=0, cache_gpu_percent=0,
           cache_cpu_percent=0, compress_cache=True),
    Policy(gpu_batch_size=7, compress_weight=True, weight_gpu_percent=20, weight_cpu_percent=50),
    Policy(gpu_batch_size=3, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100, cache_gpu_percent=0,
           cache_cpu_percent=100, act_gpu_percent=0, act_cpu_percent=100, cpu_cache_compute=True),
    Policy(gpu_batch_size=2, num_gpu_batches=3, weight_gpu_percent=50, weight_cpu_percent=0, cache_gpu_percent=20,
           cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0, cpu_cache_compute=True),
    Policy(gpu_batch_size=3, num_gpu_batches=3, cache_gpu_percent=34, cache_cpu_percent=33, compress_cache=True,
           cpu_cache_compute=True),
    Policy(gpu_batch_size=3, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True,
           cpu_attention_percent=50),
    Policy(gpu_batch_size=3, num_gpu_batches=3, cache_gpu_percent=20, cache_cpu_percent=50, cpu_cache_compute=True,
           cpu_attention_percent=40, compress_cache=True),
], ids=["three-tiers", "all-disk-4-bit-cache", "4-bit-weights", "cpu-attention", "cpu-attention-disk-cache",
        "4-bit-cache-on-the-device-beside-cpu-attention", "cpu-attention-and-the-link",
        "cpu-attention-and-the-link-4-bit-three-tiers"])
def test_gpu_memory_plan_matches_what_the_link_path_allocates(tiny_models, policy):
    """The memory plan for CUDA is what the engine takes on its way across the link: compute memory exactly
    (weights, their slots and codes, cache, cache slots), host RAM exactly but for staging, within its bound."""
    check_gpu_memory_plan(tiny_models["opt"][0], policy)


def check_gpu_memory_plan(path, policy: Policy) -> None:
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.layout import Workload
    from flexgen_lite.planning.memory_plan import peak_memory

    policy = dataclasses.replace(policy, dtype="float32")
    with FlexGenLite(str(path), policy=policy, device=LINK) as m:
        m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=4))
        peak = m.memory_report()["peak"]
        staging = sum(b.memory.numel() for lane in m.engine.staging.lanes.values() for b in lane)
    plan, _ = peak_memory(model_config(str(path)), Workload(max(map(len, PROMPTS)), 4), policy, cuda=True)
    assert peak["gpu"] == sum(plan["gpu"].get(k, 0) for k in ("weights", "weight slots", "kv cache", "cache slots"))
    host = ("weights", "kv cache", "activations", "cache slots")  # cache slots: CPU attention's, in host RAM
    assert peak["cpu"] - staging == sum(plan["cpu"].get(k, 0) for k in host)
    assert staging <= plan["cpu"]["staging"]
    assert peak["disk"] == sum(plan["disk"].values())


class FakeCudart:
    """cudaHostRegister and friends as torch.cuda.cudart() offers them (no cudaGetLastError), answering `err`."""

    def __init__(self, err: int) -> None:
        self.err, self.registered, self.unregistered = err, [], []

    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 (CUDA's name)
        self.registered.append((ptr, nbytes))
        return self.err

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0


def test_host_buffer_is_page_locked_in_place_until_its_last_view_goes(monkeypatch):
    import gc

    cudart = FakeCudart(0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    buf = host_buffer(5 * PAGE, pin=True)
    ptr = buf.data_ptr()
    assert cudart.registered == [(ptr, 5 * PAGE)]  # exactly its size: no rounding up
    view = buf[PAGE:]
    del buf
    gc.collect()
    assert cudart.unregistered == []  # a view still reads it
    del view
    gc.collect()
    assert cudart.unregistered == [ptr]


def test_memory_that_cannot_be_page_locked_is_used_unlocked_with_a_warning(monkeypatch):
    cudart, cleared = FakeCudart(2), []  # 2: cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr("flexgen_lite.system.host_memory.clear_cuda_error", lambda: cleared.append(1) or True)
    with pytest.warns(RuntimeWarning, match="could not page-lock"):
        buf = host_buffer(PAGE, pin=True)
    assert buf.numel() == PAGE and cleared == [1]  # the runtime's error cleared, not left for a later check
    del buf
    assert cudart.unregistered == []


def test_a_page_lock_error_that_cannot_be_cleared_stops_there(monkeypatch):
    """Rather than a later, unrelated kernel launch reporting it."""
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(2))
    monkeypatch.setattr("flexgen_lite.system.host_memory.clear_cuda_error", lambda: False)
    with pytest.raises(MemoryError, match="could not page-lock .* --no-pin-weight"):
        host_buffer(PAGE, pin=True)


def test_no_cuda_runtime_here_to_clear():
    from flexgen_lite.system.host_memory import clear_cuda_error

    assert clear_cuda_error() is False  # it does not claim to clear what is not loaded


def test_gpu_mem_is_the_whole_process_on_a_gpu(monkeypatch):
    """--gpu-mem covers the CUDA context, as --cpu-mem covers the runtime in host RAM."""
    import argparse

    from flexgen_lite.cli import options
    from flexgen_lite.cli.checks import UsageError

    class CudaDevice:
        is_cuda = True

        def __init__(self, device=None) -> None:
            pass

        def runtime_bytes(self) -> int:
            return 600 * 2**20

    monkeypatch.setattr("flexgen_lite.system.devices.ComputeDevice", CudaDevice)
    args = argparse.Namespace(gpu_mem=16 * 2**30, cpu_mem=None, disk_mem=None, device="cuda")
    assert options.budgets_from_args(args).gpu == 16 * 2**30 - 600 * 2**20
    args.gpu_mem = 512 * 2**20
    with pytest.raises(UsageError, match="--gpu-mem 0.50 GiB does not cover .* the CUDA context"):
        options.budgets_from_args(args)


def test_cpu_attention_inputs_cross_in_one_copy_and_attend_as_separate_ones():
    """Beside a GPU, a part's q, k, v reach CPU attention as views of one copied tensor: the same values, and
    attention over them (the C kernel where it takes such views, else SDPA) equals attention over plain copies."""
    from flexgen_lite.engine.cache_attention import joined_to
    from flexgen_lite.kernels.attention import attend

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, h, 1, 16, generator=gen) for h in (8, 2, 2))
    cache_k, cache_v = torch.randn(5, 2, 12, 16, generator=gen), torch.randn(5, 2, 12, 16, generator=gen)
    q2, k2, v2 = joined_to(torch.device("cpu"), torch.bfloat16, (q, k, v))
    for ours, plain in zip((q2, k2, v2), (q, k, v), strict=True):
        assert torch.equal(ours, plain.to(torch.bfloat16))
    cache_k[:, :, 11:], cache_v[:, :, 11:] = k2, v2
    mask = torch.ones(5, 1, 1, 12, dtype=torch.bool)
    kb, vb = cache_k.to(torch.bfloat16), cache_v.to(torch.bfloat16)
    torch.testing.assert_close(attend(q2, kb, vb, mask), attend(q2.contiguous(), kb, vb, mask), atol=0, rtol=0)


def test_staging_is_taken_once_not_regrown_as_the_prefix_grows(tiny_models, monkeypatch):
    """A disk part's prefix grows a position a step: its staging buffer is its whole size from the start (a
    regrown one would be mapped and page-locked anew every step)."""
    import flexgen_lite.engine.storage as storage

    made = []
    real = storage.host_buffer
    monkeypatch.setattr(storage, "host_buffer", lambda n, pin: made.append(n) or real(n, pin))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, cache_gpu_percent=0, cache_cpu_percent=0, dtype="float32")
    counts = []
    for steps in (3, 9):
        made.clear()
        with FlexGenLite(str(tiny_models["opt"][0]), policy=policy, device=LINK) as m:
            m.generate_ids(PROMPTS[:4], SamplingConfig(max_new_tokens=steps, stop_at_eos=False))
        counts.append(len(made))
    assert counts[0] == counts[1] <= 8, counts


def test_activation_buffers_are_kept_across_blocks(tiny_models, monkeypatch):
    """Hidden states' page-locked buffers are made once, not per block (mapping and locking them anew costs
    as much as the copies they serve)."""
    import flexgen_lite.engine.activations as activations

    made = []
    real = activations.host_buffer
    monkeypatch.setattr(activations, "host_buffer", lambda n, pin: made.append(n) or real(n, pin))
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, act_gpu_percent=0, act_cpu_percent=100, dtype="float32")
    with FlexGenLite(str(tiny_models["opt"][0]), policy=policy, device=LINK) as m:
        first = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False))
        once = len(made)
        assert m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=3, stop_at_eos=False)) == first
    assert 0 < once <= len(PROMPTS) and len(made) == once
