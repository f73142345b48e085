"""Measuring this machine's speeds (system/hardware.py holds them, system/profile_store.py stores them,
probes.py times each kernel, copy and disk); loading the stored profile, measuring it when there is none, and
re-measuring after a run faster than predicted.

`flexgen-lite profile` (or the first `--policy auto`) measures, in seconds: matmul rates per dtype over a
range of batch rows, link bandwidths (host<->device, pinned and pageable; a host memory copy without
CUDA), disk read/write of the offload directory (O_DIRECT where the file system allows, else buffered
after dropping the file's pages with posix_fadvise), page-cache reads, decode attention bandwidth on the
compute device and on the CPU, 4-bit (de)quantization rates, the CPU's int4 weight kernel and the cost of
one small op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from ..engine.block import Block
from ..engine.block_schedule import Engine
from ..engine.decode_fused import ENV as FUSED_ENV
from ..engine.decode_graph import ENV as GRAPHS_ENV
from ..engine.kv_cache import CacheSlots, KVCache
from ..engine.policy import DTYPES, Policy
from ..engine.storage import DiskStore, MemoryLedger, OffloadError, Staging, missing_folders, remove_empty
from ..engine.weight_sources import DummySource
from ..engine.weights import place_weights
from ..kernels import native
from ..kernels.compression import CompressionConfig
from ..kernels.sampling import SamplingConfig
from ..models.hf_config import config_from_dict
from ..models.specs import layer_specs
from ..planning.cost_model import predict
from ..planning.dtype_choice import compute_dtype, machine_dtype
from ..planning.layout import Workload
from ..system.devices import ComputeDevice, IOPool, host_available_bytes, keep_freed_memory
from ..system.hardware import HardwareProfile
from ..system.memory import gib, return_freed_memory
from ..system.profile_store import cache_dir, cached_profile, profile_in_force, profile_path, save_profile
from .attention_probes import attention_rates, codes_attention_rates
from .disk_probes import mapped_pages, measure_disk
from .int4_probes import int4_rates
from .probes import (
    MiB,
    best_matmul,
    compression_rates,
    compute_dtypes,
    contention,
    every_matmul_rate,
    fit,
    gemv_rates,
    host_contention,
    host_touch,
    int8_rates,
    link_rates,
    matmul_rates,
    matmul_shapes,
    offload_parent,
    others_cpu,
    timed,
)


def check_room(offload_dir: str, needed: int) -> None:
    """Refuse, before a minute of measuring, an offload file system without room for the disk's probe files
    (helper-35: a 40 MiB tmpfs ended the first run in 'No space left on device' after 50 s, nothing saved)."""
    where = offload_dir or tempfile.gettempdir()
    while where and not os.path.exists(where):
        where = os.path.dirname(where)
    free = shutil.disk_usage(where or ".").free
    if free < needed:
        raise OffloadError(f"measuring this machine writes {gib(needed)} of probe files into {where} (the offload "
                           f"directory's file system), which has {gib(free)} free: free space there, or point "
                           "--offload-dir at a larger disk")


def measure(device: ComputeDevice | None = None, offload_dir: str = "",
            progress: Callable[[str], None] | None = None, quick: bool = False) -> HardwareProfile:
    """Measure this machine. `quick` shrinks every size (tests); the default takes well under a minute
    on a 2-core VM and a few seconds with a GPU."""
    device = device or ComputeDevice()
    keep_freed_memory()  # as the engine does: on VMs fresh pages fault in slowly
    native.library()  # a first run's build of the C kernels (~20 s of gcc) before, not inside, a stage, and not
    # counted as other processes' load on the machine
    tic, start_cpu = time.perf_counter(), others_cpu()
    scale = 8 if quick else 1
    disk_size = 256 * MiB // (1 if scale == 1 else 16)
    check_room(offload_dir, disk_size + 32 * MiB // scale)  # the disk's and the mapped files' probes
    found: dict = {}
    stages = [("matmul", every_matmul_rate), ("few-row kernel", gemv_rates), ("8-bit head", int8_rates),
              ("int4 kernel", int4_rates),
              ("attention", attention_rates), ("attention over 4-bit caches", codes_attention_rates),
              ("links", link_rates), ("host memory", host_touch), ("CPU attention beside the link", host_contention),
              ("compression", compression_rates),
              ("KV cache parts", _cache_parts), ("overhead", _overhead),
              # a second trial, seconds after the first; before "engine", whose fit uses the matmul rates
              # of the dtypes the device computes in (float16 on a CPU only predicts a forced --dtype: ~6 s saved)
              ("matmul, second trial", lambda device, scale: best_matmul(
                  found, matmul_rates(device, scale, tuple(compute_dtypes(device))))),
              ("disk", lambda device, scale: measure_disk(offload_dir, disk_size, device)),
              ("mapped files", lambda device, scale: {} if device.is_cuda
               else mapped_pages(offload_dir, 32 * MiB // scale)),
              ("engine", lambda device, scale: _layer_overhead(device, found, offload_dir, quick=scale > 1))]
    stage_seconds, stage_compiles = {}, {}
    made = missing_folders(offload_dir) if offload_dir else []  # the probes' folders: not left behind, empty
    for i, (name, fn) in enumerate(stages):
        if progress:
            progress(f"profiling {device.device}: {name} ({i + 1}/{len(stages)})")
        begun, compiles = time.perf_counter(), [0, 0.0]
        with triton_compiles(compiles):
            found.update(fn(device, scale))
        stage_seconds[name] = round(time.perf_counter() - begun, 2)
        if compiles[0]:
            stage_compiles[name] = (compiles[0], round(compiles[1], 2))
    remove_empty(made)
    if progress:
        progress("")
    others = others_cpu(start_cpu) / max(1e-9, time.perf_counter() - tic)
    notes = [] if others < 0.25 else [
        f"note: other processes used {others:.1f} cores on average while this was measured: rates may be low; "
        "run `flexgen-lite profile --refresh` when the machine is idle"]
    return HardwareProfile(notes=notes,
        device=_device_name(device), is_cuda=device.is_cuda, offload_dir=offload_parent(offload_dir),
        threads=torch.get_num_threads(), host_memory=host_available_bytes(),
        measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), seconds=round(time.perf_counter() - tic, 1),
        stage_seconds=stage_seconds, stage_compiles=stage_compiles, **found)


@contextlib.contextmanager
def triton_compiles(counts: list):
    """Triton's compiles of kernels inside (not its cache's hits): counts[0] += 1 and counts[1] += the compiler's
    seconds each, by its compile listener where this triton has one; nothing where it has none (or no triton). A GPU
    profile's first probes of its Triton kernels compile them (~0.3-1 s each)."""
    try:
        from triton import knobs

        previous = knobs.compilation.listener
    except (ImportError, AttributeError):
        yield
        return

    def listen(*args, **kwargs) -> None:  # (src, metadata, metadata_group, times, cache_hit), by keyword in 3.4+
        hit = kwargs.get("cache_hit", args[4] if len(args) > 4 else True)
        if not hit:
            counts[0] += 1
            counts[1] += (getattr(kwargs.get("times", args[3] if len(args) > 3 else None), "total", 0) or 0) / 1e6
        if previous is not None:
            previous(*args, **kwargs)

    knobs.compilation.listener = listen
    try:
        yield
    finally:
        knobs.compilation.listener = previous


def _device_name(device: ComputeDevice) -> str:
    if device.is_cuda:
        return f"{device.device} ({torch.cuda.get_device_name(device.device)})"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"cpu ({model or 'unknown'}, {os.cpu_count()} cores)"


def remeasure_matmul(device: ComputeDevice, hw: HardwareProfile) -> dict:
    """Matmul rates measured again, the faster of these and `hw`'s kept per dtype and row count."""
    found = matmul_rates(device, 1 if tuple(hw.matmul_shape) == matmul_shapes(device, 1)[0] else 8)
    return best_matmul({"matmul": hw.matmul, "matmul_shape": hw.matmul_shape}, found)["matmul"]


def measure_int4_matmul(device: ComputeDevice) -> dict:
    """The int4 kernel's rates alone (int4_matmul, int4_dequantize, int4_tiles): for a cached profile older than
    them (load_profile)."""
    return int4_rates(device, 1)


def _cache_parts(device: ComputeDevice, scale: int) -> dict:
    """The engine's own KVCache.load of a part that is not used in place, at a short and a long prefix:
    a fixed cost per load and a rate. A disk part (read from the page cache, then transposed), a compressed
    part in compute memory (dequantized); and one token stored into a compressed part."""

    rows, heads, hd, short, long = 8, 12, 64, 16, 512 // scale
    disk_load, comp_load, store_s = {}, {}, 0.0
    for name in compute_dtypes(device):
        dtype = DTYPES[name]
        for table, percents, comp in ((disk_load, (0, 0, 100), None),
                                      (comp_load, (100, 0, 0), CompressionConfig(4, 64, -1))):
            disk, ledger = DiskStore(), MemoryLedger()
            # prefixes of a longer cache, as decode reads them
            kv = KVCache(1, 1, rows, 2 * long, heads, hd, dtype, percents, device, disk, ledger, comp)
            slots = CacheSlots(ledger, Staging(pin=device.is_cuda))
            token = torch.randn(rows, heads, long, hd, device=device.device).to(dtype)
            kv.store(kv.parts[0][0][0], token, token, 0)
            times = [timed(lambda kv=kv, slots=slots, n=n: kv.load(0, 0, n, slots, 0), device.synchronize)
                     for n in (short, long)]
            amount = 2 * rows * heads * hd * (1 if comp else dtype.itemsize)  # elements, or bytes, per position
            rate, fixed = fit(amount * short, times[0], amount * long, times[1])
            table[name] = (fixed, rate)
            if comp:
                part, one = kv.parts[0][0][0], token[:, :, :1].contiguous()
                store_s = max(store_s, timed(lambda kv=kv, part=part, one=one: kv.store(part, one, one, 0),
                                             device.synchronize))
            disk.close()
    for table in (disk_load, comp_load):
        table.setdefault("float16", table["bfloat16"])
    return {"cache_disk_load": disk_load, "cache_dequantize": comp_load, "cache_store": store_s}


def _overhead(device: ComputeDevice, scale: int) -> dict:
    """Seconds of one tiny op (dispatch and Python, what small layers and batches pay per op), of handing a
    task to an I/O thread, and how much dearer host I/O work gets when it runs beside compute."""
    x, w = torch.randn(1, 16, device=device.device), torch.randn(16, 16, device=device.device)

    def hundred_ops() -> None:
        for _ in range(100):
            F.linear(x, w)

    pool = IOPool(overlap=True)
    handoff = timed(lambda: [pool.submit(int).result() for _ in range(100)], lambda: None) / 100
    pool.close()
    return {"op_overhead": timed(hundred_ops, device.synchronize) / 100, "handoff": handoff,
            "contention": contention(device, scale)}


SMALL = {  # decode steps of these, less what the cost model already counts, are the engine's own overhead
    "opt": {"model_type": "opt", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
            "ffn_dim": 2048, "vocab_size": 1024, "max_position_embeddings": 128},
    "llama": {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4, "intermediate_size": 1536, "vocab_size": 1024,
              "max_position_embeddings": 128},
}


def _layer_overhead(device: ComputeDevice, found: dict, offload_dir: str = "", quick: bool = False) -> dict:
    """Seconds per layer and per (layer, GPU batch) of a decode step that the rest of the cost model does not
    count (Python, dispatch, futures, waking threads between ops): small models of each family run in the
    engine with 1 and 2 GPU batches of 8 rows, less their prediction without this term. The engine and its
    kernels choose their ways by the rates measured so far, as they will by the saved profile (on a first profile,
    the rules for none chose slower ways: a per-batch term 4-7x too large on this VM)."""
    fields = {**found, "layer_overhead": {f: (0.0, 0.0) for f in SMALL}, "offload_dir": "", "threads": 1,
              "host_memory": 0, "device": "", "is_cuda": device.is_cuda}
    partial = HardwareProfile(**fields)
    with profile_in_force(partial), _eager_schedule():
        overhead = _residuals(device, partial, quick)
        if device.is_cuda:
            return {"layer_overhead": overhead}
        partial = dataclasses.replace(partial, layer_overhead=overhead)
        return {"layer_overhead": overhead, **_mapped_overheads(device, partial, offload_dir, quick)}


def _mapped_overheads(device: ComputeDevice, partial: HardwareProfile, offload_dir: str, quick: bool) -> dict:
    """A CPU's engine per layer whose weights it maps from an offload file and per cache part it maps, beyond what
    the cost model counts (hand-offs to the I/O thread, a file's calls, reading through 4 KiB page tables): the
    small Llama's decode steps with its weights on disk, with its cache there, each with overlap and without, and
    all in memory, alternated, each less its prediction."""
    config = config_from_dict(SMALL["llama"], name="small-llama")
    specs, gbs, prompt, gen, rounds = layer_specs(config), 8, 8, (4 if quick else 16), (1 if quick else 5)
    weights, cache = dict(weight_gpu_percent=0, weight_cpu_percent=0), dict(cache_gpu_percent=0, cache_cpu_percent=0)
    places = {"memory": {}, "weights": weights, "cache": cache, "weights_inline": dict(weights, overlap=False),
              "cache_inline": dict(cache, overlap=False)}
    with contextlib.ExitStack() as stack:
        engines = {k: _small_engine(stack, config, specs, device, partial, gbs, 1, offload_dir=offload_dir, **v)
                   for k, v in places.items()}
        residual = _alternated(engines, config, partial, device, prompt, gen, rounds)
    units = (("fetch", "weights", 2 * config.num_layers), ("part", "cache", config.num_layers))
    return {f"mapped_{unit}{way}": max(0.0, residual[place + way] - residual["memory"]) / count
            for unit, place, count in units for way in ("", "_inline")}


def _eager_schedule():
    """The engine and the cost model both without CUDA graphs (whole steps or layers) and the CPU's fused step:
    the overhead measured is the eager schedule's, which the cost model adds where neither runs (a graph's replay
    and the fused step are priced without it). The environment as it was after."""
    return mock.patch.dict(os.environ, dict.fromkeys((GRAPHS_ENV, FUSED_ENV), "0"))


def _residuals(device: ComputeDevice, partial: HardwareProfile, quick: bool) -> dict:
    """Per family, (per layer, per layer and batch) from the median decode step at 1 and at 2 GPU batches. The
    per-batch term is a difference of the two, so the runs alternate between them: a slow spell of the machine
    (this VM's come and go within seconds) lands on both rather than on one (one run after the other, two
    profiles' per-batch terms differed by 5x)."""
    out, gbs, prompt, gen, rounds = {}, 8, 8, (4 if quick else 16), (1 if quick else 5)
    for family, raw in SMALL.items():
        config = config_from_dict(raw, name=f"small-{family}")
        specs = layer_specs(config)
        with contextlib.ExitStack() as stack:
            engines = {nb: _small_engine(stack, config, specs, device, partial, gbs, nb) for nb in (1, 2)}
            residual = _alternated(engines, config, partial, device, prompt, gen, rounds)
        per_batch = max(0.0, residual[2] - residual[1]) / len(specs)
        out[family] = (max(0.0, residual[1] / len(specs) - per_batch), per_batch)
    return out


def _alternated(engines: dict, config, partial: HardwareProfile, device: ComputeDevice, prompt: int, gen: int,
                rounds: int) -> dict:
    """Per engine, its median decode step over `rounds` blocks of its policy's size, the engines run in turn, less
    the cost model's prediction by `partial`."""
    times = {k: [] for k in engines}
    for _ in range(rounds):
        for k, engine in engines.items():
            p = engine.policy
            block = Block.from_prompts([[5] * prompt] * p.block_size, p.block_size, p.gpu_batch_size, gen, 1, (),
                                       device.device)
            engine.run(block, SamplingConfig(max_new_tokens=gen, stop_at_eos=False))
            times[k] += engine.times.decode
    return {k: statistics.median(times[k]) - predict(config, Workload(prompt, gen), engine.policy,
                                                     partial).decode_step_s for k, engine in engines.items()}


def _small_engine(stack: contextlib.ExitStack, config, specs, device: ComputeDevice, partial: HardwareProfile,
                  gbs: int, nb: int, **placed) -> Engine:
    """An engine of `config` (dummy weights, in memory unless `placed` says otherwise: Policy's fields) at nb GPU
    batches of gbs rows, closed with `stack`."""
    policy = Policy(gpu_batch_size=gbs, num_gpu_batches=nb, dtype=machine_dtype(partial).dtype, **placed)
    dtype = compute_dtype(policy, device.device.type)
    disk, ledger = DiskStore(policy.offload_dir), MemoryLedger()
    stack.callback(disk.close)
    weights = place_weights(specs, policy.percents("weight"), DummySource(), dtype, device, disk, ledger, pin=False)
    engine = Engine(config, policy, specs, weights, device, dtype, disk, ledger)
    stack.callback(engine.close)
    return engine


def load_profile(device: ComputeDevice | None = None, offload_dir: str = "", refresh: bool = False,
                 progress: Callable[[str], None] | None = None) -> HardwareProfile:
    """The cached profile of this machine, measuring it first if there is none (or with `refresh`).

    FLEXGEN_LITE_PROFILE=FILE uses that file instead (tests, or a profile copied from a like machine)."""
    device = device or ComputeDevice()
    if not refresh:
        found = cached_profile(device, offload_dir)
        if found is not None:
            return _with_int4_rates(found, device, offload_dir)
        print(f"no profile of this machine yet: measuring it now (~35-55 s on 2 cores, once; cached in {cache_dir()}). "
              "Other processes' load would make the plans wrong: `flexgen-lite profile --refresh` measures again",
              file=sys.stderr)
    profile = measure(device, offload_dir, progress)
    return_freed_memory()  # the measurement's buffers: not resident beyond what budgets count
    if profile.notes and not refresh:
        print("\n" + "\n".join(profile.notes), file=sys.stderr)
    save_profile(profile, profile_path(device, offload_dir))
    return profile


def _with_int4_rates(hw: HardwareProfile, device: ComputeDevice, offload_dir: str) -> HardwareProfile:
    """A cached profile without the int4 kernel's rates (None: a hand-made file) gets them measured now (~10 s on
    2 cores) and saved; FLEXGEN_LITE_PROFILE's file is left as it is (the cost model then assumes no kernel)."""
    measured = (hw.int4_matmul, hw.int4_dequantize, hw.int4_tiles)
    if all(found is not None for found in measured) or os.environ.get("FLEXGEN_LITE_PROFILE"):
        return hw
    updated = dataclasses.replace(hw, **measure_int4_matmul(device))
    save_profile(updated, profile_path(device, offload_dir))
    return updated


def remeasure_after_fast_run(device: ComputeDevice, offload_dir: str = "") -> str:
    """After a compute-bound run more than 2x faster than predicted (a profile taken while the machine was
    busy): measure the matmul rates again, keep the faster per point, and save them for the next plan."""
    if os.environ.get("FLEXGEN_LITE_PROFILE"):
        return "the profile is FLEXGEN_LITE_PROFILE's file: left as it is"
    hw = cached_profile(device, offload_dir)
    if hw is None:
        return "no cached profile to update"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    updated = dataclasses.replace(hw, matmul=remeasure_matmul(device, hw),
                                  notes=[*hw.notes, f"matmul rates re-measured {stamp} after a run 2x faster "
                                         "than predicted"])
    save_profile(updated, profile_path(device, offload_dir))
    return f"matmul rates measured again and kept where faster, in {profile_path(device, offload_dir)}: the next " \
           "plan uses them"
