"""The disk tier: memory-mapped offload files (a CPU computes on their pages in place), pages released after
use, one extent per layer, O_DIRECT reads."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.engine.storage import PAGE, DiskFile, DiskStore
from flexgen_lite.planning.layout import Workload
from flexgen_lite.planning.memory_plan import peak_memory

from .conftest import PROMPTS

MiB = 2**20


def mapped_rss(directory: str) -> int:
    """Resident bytes of this process's mappings of files under `directory`: the mappings are found in
    /proc/self/maps, and their pages counted present in /proc/self/pagemap (bit 63), as the kernel counts Rss in
    smaps. Read before every release (hundreds of times a test): whole smaps took 12 ms a read."""
    wanted, ranges = directory.encode(), []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(wanted):
                start, end = (int(a, 16) for a in fields[0].split(b"-"))
                ranges.append((start, end))
    total = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for start, end in ranges:
            pagemap.seek(start // PAGE * 8)
            entries = torch.frombuffer(bytearray(pagemap.read((end - start) // PAGE * 8)), dtype=torch.int64)
            total += int((entries < 0).sum()) * PAGE  # bit 63 set: the page is present
    return total


def test_mapped_pages_are_faulted_in_and_released(tmp_path):
    store = DiskStore(str(tmp_path))
    f = store.create(64 * MiB, "w")
    values = torch.randn(16 * MiB)
    f.write(values)
    mapped = f.map(torch.float32, (16 * MiB,))
    assert torch.equal(mapped, values)  # the map shows what was written
    f.release()
    assert mapped_rss(store.directory) == 0
    f.prefetch(8 * MiB, 16 * MiB)
    assert 16 * MiB <= mapped_rss(store.directory) <= 16 * MiB + 2 * PAGE  # that range, no more
    f.release()
    assert mapped_rss(store.directory) == 0
    assert torch.equal(mapped, values)  # released pages come back from the file
    mapped[:4] = 7.0  # writes through the map reach the file, and survive a release
    f.release()
    assert torch.equal(f.read_into(torch.empty(4)), torch.full((4,), 7.0))
    store.close()
    assert not os.path.exists(store.directory)


def test_direct_reads_equal_buffered_reads(tmp_path):
    store = DiskStore(str(tmp_path))
    f = store.create(4 * PAGE, "w")
    data = torch.randint(0, 255, (4 * PAGE,), dtype=torch.uint8)
    f.write(data)
    aligned = torch.frombuffer(mmap.mmap(-1, 2 * PAGE), dtype=torch.uint8)  # page-aligned, like pinned staging
    assert aligned.data_ptr() % PAGE == 0
    assert torch.equal(f.read_into(aligned, PAGE, direct=True), data[PAGE:3 * PAGE])
    assert f.direct_fd is not None
    unaligned = torch.empty(2 * PAGE + 1, dtype=torch.uint8)[1:]  # falls back to a buffered read
    assert torch.equal(f.read_into(unaligned, 2 * PAGE, direct=True), data[2 * PAGE:])
    store.close()


def test_a_layers_disk_weights_are_one_page_aligned_file(tmp_path):
    with FlexGenLite("facebook/opt-125m", policy=Policy(weight_gpu_percent=0, weight_cpu_percent=0,
                                                        dtype="float32", offload_dir=str(tmp_path))) as m:
        for layer, spec in zip(m.engine.weights, m.engine.specs, strict=True):
            on_disk = [t for t in layer.values() if t.tier == "disk"]
            if spec.kind not in ("attention", "mlp"):
                assert not on_disk
                continue
            assert len({id(t.data) for t in on_disk}) == 1  # one file
            spans = sorted((t.offset, t.offset + t.nbytes) for t in on_disk)
            assert all(a % PAGE == 0 for a, _ in spans)
            assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
            assert on_disk[0].data.nbytes == -(-spans[-1][1] // PAGE) * PAGE


@pytest.mark.parametrize("compress", [False, True])
def test_pages_in_flight_stay_within_the_plan(tmp_path, monkeypatch, compress):
    """Weights and KV cache all on disk, on a CPU: pages of the offload files are in the process only while
    a layer uses them. Measured by the kernel (smaps) just before every release: never more than the
    memory plan's weight and cache windows; nothing left mapped after the run."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=0,
                    cache_gpu_percent=0, cache_cpu_percent=0, dtype="float32", offload_dir=str(tmp_path),
                    compress_weight=compress)
    seen = []
    real = DiskFile.release
    monkeypatch.setattr(DiskFile, "release", lambda f, *a: seen.append(mapped_rss(str(tmp_path))) or real(f, *a))
    prompts = [[2, 100, 200, 300], [2, 5], [2, 7, 8], [2, 9, 10, 11]]
    with FlexGenLite("facebook/opt-125m", policy=policy) as m:
        m.generate_ids(prompts, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
        after = mapped_rss(str(tmp_path))
        smallest = min(t.data.nbytes for layer in m.engine.weights for t in layer.values() if t.tier == "disk")
    plan, _ = peak_memory(m.config, Workload(4, 4), policy, cuda=False)
    window = plan["gpu"]["weight slots"] + plan["gpu"]["cache slots"] + plan["cpu"]["staging"]
    print(f"peak mapped {max(seen) / MiB:.1f} MiB, plan's windows {window / MiB:.1f} MiB")
    assert max(seen) >= smallest / 2  # a layer's weights (or 4-bit codes) really were used through the map
    assert max(seen) <= window + 16 * PAGE
    assert after == 0


def test_the_last_background_cache_write_is_waited_for(tmp_path, monkeypatch):
    """A disk cache write that fails in the last step (run in the background) surfaces from generate_ids,
    and the engine holds no pending write after a block."""
    from flexgen_lite.engine.kv_cache import KVCache
    from flexgen_lite.engine.storage import OffloadError

    policy = Policy(gpu_batch_size=2, cache_gpu_percent=0, cache_cpu_percent=0, compress_cache=True,
                    dtype="float32", offload_dir=str(tmp_path))
    real = KVCache.store
    with FlexGenLite("facebook/opt-125m", policy=policy) as m:
        m.generate_ids([[2, 5, 6], [2, 7]], SamplingConfig(max_new_tokens=3, stop_at_eos=False))
        assert not m.engine._pending_stores

        def store(cache, part, k, v, start):
            if start == 3 + 3 - 2:  # the new token of the last decode step (prompt 3, 3 new tokens)
                raise OffloadError(28, "offload disk is full")
            real(cache, part, k, v, start)

        monkeypatch.setattr(KVCache, "store", store)
        with pytest.raises(OffloadError, match="full"):
            m.generate_ids([[2, 5, 6], [2, 7]], SamplingConfig(max_new_tokens=3, stop_at_eos=False))


def test_a_longer_block_may_use_the_room_of_the_cache_it_replaces(monkeypatch):
    """With room for one KV cache only, a second, longer block runs: the old cache is freed before the
    new one is checked (on CUDA, mem_get_info would otherwise count both)."""
    from flexgen_lite.planning import budgets

    policy = Policy(gpu_batch_size=2, dtype="float32")
    with FlexGenLite("facebook/opt-125m", policy=policy) as m:
        weights = m.ledger.current["gpu"]
        per_token = m.config.kv_bytes_per_token(4) * policy.block_size
        room = weights + per_token * (30 + 4) + 2**20  # the longer block's cache and 1 MiB, no more

        def free(device, offload_dir):
            left = room - m.ledger.current["gpu"]
            return {"gpu": left, "cpu": left, "disk": 2**40}

        monkeypatch.setattr(budgets, "free_bytes", free)
        m.generate_ids([[2] + [5] * 11] * 2, SamplingConfig(max_new_tokens=4, stop_at_eos=False))  # 2 MiB cache
        m.generate_ids([[2] + [5] * 29] * 2, SamplingConfig(max_new_tokens=4, stop_at_eos=False))
        assert m.engine.cache.max_len == 34


@pytest.mark.parametrize("disk_gb_s,dequantize_g_s,compressed", [(0.5, 5.0, True), (20.0, 0.2, False)])
def test_search_compresses_weights_on_a_slow_cold_disk(disk_gb_s, dequantize_g_s, compressed):
    """A model larger than its RAM budget, read from a cold disk: 4-bit weights move ~7x fewer bytes than
    fp32, so the search takes them when dequantizing costs less than the reads it saves, and not otherwise."""
    import dataclasses

    from flexgen_lite.models.presets import preset_config
    from flexgen_lite.planning.budgets import Budgets
    from flexgen_lite.planning.policy_search import AutoPolicy, search_policy

    from .conftest import synthetic_profile

    hw = dataclasses.replace(synthetic_profile(), disk_read=disk_gb_s * 1e9,
                             dequantize=dict.fromkeys(("float32", "bfloat16", "float16"), dequantize_g_s * 1e9))
    result = search_policy(preset_config("facebook/opt-6.7b"), Workload(16, 8, 32), hw,
                           Budgets(None, 4 * 2**30, 100 * 2**30), AutoPolicy(base=Policy(dtype="float32")),
                           page_cache=0)
    assert result.policy.weight_gpu_percent + result.policy.weight_cpu_percent < 50  # most weights on disk
    assert result.policy.compress_weight == compressed


@pytest.mark.parametrize("dtype,compress", [("float32", False), ("float32", True), ("bfloat16", True)])
def test_a_cold_disk_is_read_directly_into_buffers_with_the_same_output(tmp_path, monkeypatch, tiny_models, dtype,
                                                                        compress):
    """Page cache bypassed (a cold disk, or more on disk than it keeps): a CPU reads each layer's file with
    O_DIRECT into a buffer of its own per (kind, parity), never through the mapping, and generates exactly
    what it does through mapped pages (plain, 4-bit, and 4-bit for the int4 kernel in bf16)."""
    policy = Policy(gpu_batch_size=2, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=0, dtype=dtype,
                    offload_dir=str(tmp_path), compress_weight=compress)
    sampling = SamplingConfig(max_new_tokens=4, stop_at_eos=False)

    def run(cold: bool):
        with monkeypatch.context() as patch:
            patch.setattr(DiskFile, "page_cache", not cold)
            if cold:
                patch.setattr(DiskFile, "prefetch", lambda *a: pytest.fail("a cold layer was read through its map"))
            with FlexGenLite(str(tiny_models["opt"][0]), policy=policy) as m:
                ids, logits = m.generate_ids(PROMPTS, sampling, return_logits=True)
                return ids, logits, len(m.engine.weight_slots.extents)

    ids, logits, buffers = run(cold=False)
    cold_ids, cold_logits, cold_buffers = run(cold=True)
    assert buffers == 0 and cold_buffers == 4  # (attention, mlp) x parity
    assert cold_ids == ids
    assert all(torch.equal(a, b) for a, b in zip(cold_logits, logits, strict=True))
