"""Standalone checks of issue 21's kernels (run by gpu_suite.py's step 3, or by hand):

    python benchmarks/gpu_checks.py [SECTION ...]         # on a CUDA machine (~1 min); SECTIONS below, all by default
    TRITON_INTERPRET=1 python benchmarks/gpu_checks.py    # a smoke on a CPU (without CUDA it interprets anyway)

1. the fused 4-bit dequantization (flexgen_lite/kernels/dequant_triton.py) against the torch path, bit for bit, over
   layouts (padded groups, inner > 1, the cache's), bits and dtypes; `compression.dequantize` takes it on CUDA;
2. its speed against the torch path and the link, on OPT-13B's weight shapes (CUDA);
3. the engine with 4-bit weights in host RAM (OPT-1.3B, dummy weights): token ids equal with the kernel and with
   the torch path; decode step against its link bound (CUDA);
4. CPU decode attention (native.decode_attention) over a position-major cache, all threads against one, beside
   the host's memory copy rate; the same over a 4-bit cache read as stored (quantized_attention);
5. a decode step's kernels by device time with everything on the GPU (OPT-1.3B, batch 64), against its wall time;
6. decode attention over a GPU cache: the Triton split-KV kernel (decode_attention_triton.py; its lanes variants: a
   lane a position where a kv head has one query head, a lane a warp for grouped heads) against SDPA as the engine
   calls it, at the suite's shapes: agreement, time, K+V bytes/s against a device copy, and which one the engine's
   measured choice (attention.faster) keeps;
7. a decode step's store of one token into a 4-bit cache part (QuantizedStore.write): the fused quantization
   (quantize_triton.py) against the torch path, bit for bit, and the time a store takes with each; and the load
   of a 4-bit part's prefix into a slot (dequant_triton.dequantize_prefix) against the torch path;
8. decode attention over a 4-bit cache in GPU memory read as stored (quantized_attention_triton.py) against the
   path it replaces (the prefix dequantized into a slot, then attended), at OPT-30B's, OPT-175B's and Llama-3-70B's
   heads: agreement with the fp32 reference, time, stored bytes/s;
9. a decode step's rows times a 4-bit weight in GPU memory read as stored (int4_gemv_triton.py) against its
   dequantization into a slot and a dense product, at OPT-30B's and Llama-3-70B's matrices, 1, 16 and 64 rows;
   the ratio for a step of 1 and of 4 GPU batches (one dequantization, a product each).
A short table each; the last line sums up; exit 1 on a mismatch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback

import torch

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decides how to jit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from flexgen_lite.kernels import dequant_triton, native  # noqa: E402
from flexgen_lite.kernels.compression import CompressionConfig, dequantize_reference, quantize  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
failures: list[str] = []


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def best(fn, reps: int | None = None) -> float:
    """The fastest of `reps` calls after a first (5 on a GPU; on a CPU, where the smoke only runs the code, 1)."""
    reps = reps or (5 if CUDA else 1)
    fn()
    sync()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return min(times)


def h2d_seconds(n: int) -> float:
    """Seconds of copying n bytes from page-locked host memory to the GPU."""
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=DEV)
    return best(lambda: dev.copy_(host, non_blocking=True))


def check_exact() -> None:
    print("## 1. fused dequantization == torch path (bit for bit)")
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: skipped")
        failures.append("no triton") if CUDA else None
        return
    shapes = [((5120, 5120), 1), ((1000, 333), 1), ((96, 200), 0), ((8, 32, 17, 128), -1), ((3, 100, 7), 1)]
    print("| shape | group dim | bits | dtype | exact | max diff |\n|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for shape, dim in shapes if CUDA else shapes[1:]:
        x = torch.randn(shape, generator=gen) * 3
        for bits in (4, 8) if dim == 0 else (4,):  # each kind compiles once (~1 s)
            for dtype in dequant_triton.DTYPES:
                q = quantize(x.to(dtype).to(DEV), CompressionConfig(bits, 64, dim))
                got, want = dequant_triton.dequantize(q, dtype), dequantize_reference(q, dtype, None)
                same = torch.equal(got, want)
                diff = (got.float() - want.float()).abs().max().item()
                print(f"| {shape} | {dim} | {bits} | {str(dtype)[6:]} | {'yes' if same else '**NO**'} | {diff:g} |")
                if not same:
                    failures.append(f"kernel != torch {shape} {dim} {bits} {dtype}")
                if CUDA and not dequant_triton.usable(q, dtype):
                    failures.append(f"compression.dequantize does not take the kernel: {shape} {dim} {bits} {dtype}")
    tic = time.perf_counter()
    dequant_triton.reset()
    q = quantize(torch.randn(64, 64, device=DEV), CompressionConfig(4, 64, 1))
    dequant_triton.usable(q, torch.float16)
    print(f"one kind's self-check (compiled if not cached): {time.perf_counter() - tic:.2f} s")


def speed() -> None:
    print("\n## 2. dequantization speed (OPT-13B shapes, float16 out)")
    print("| shape | fused ms | GB/s moved | torch ms | x faster | codes over the link ms |\n|---|---|---|---|---|---|")
    for shape in ((5120, 5120), (20480, 5120), (5120, 20480)):
        q = quantize(torch.randn(shape, device=DEV, dtype=torch.float16), CompressionConfig(4, 64, 1))
        out = torch.empty(shape, dtype=torch.float16, device=DEV)
        fused = best(lambda q=q, out=out: dequant_triton.dequantize(q, torch.float16, out))
        slow = best(lambda q=q, out=out: dequantize_reference(q, torch.float16, out), reps=2)
        moved = q.nbytes + out.numel() * 2
        link = h2d_seconds(q.data.numel())
        print(f"| {shape} | {fused * 1e3:.3f} | {moved / fused / 1e9:.0f} | {slow * 1e3:.2f} | {slow / fused:.0f} | "
              f"{link * 1e3:.2f} |")


def engine() -> None:
    print("\n## 3. engine: OPT-1.3B, 4-bit weights in host RAM (--percent 0 100 100 0 100 0)")
    from flexgen_lite import FlexGenLite, Policy, SamplingConfig
    from flexgen_lite.engine.weights import weight_bytes

    policy = Policy(gpu_batch_size=32, num_gpu_batches=2, weight_gpu_percent=0, weight_cpu_percent=100,
                    compress_weight=True)
    prompts = [[2] + [100 + (i * 7 + j) % 1000 for j in range(63)] for i in range(64)]
    sampling = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
    h2d = (1 << 28) / h2d_seconds(1 << 28)
    rows = {}
    with FlexGenLite("facebook/opt-1.3b", policy=policy, device="cuda") as m:
        link_bytes = weight_bytes(m.engine.weights, "cpu")
        for label, env in (("fused", "1"), ("torch", "0")):
            os.environ["FLEXGEN_LITE_TRITON"] = env
            dequant_triton.reset()
            ids = m.generate_ids(prompts, sampling)
            step = sorted(m.engine.times.decode)[len(m.engine.times.decode) // 2]
            rows[label] = (ids, step)
    os.environ.pop("FLEXGEN_LITE_TRITON")
    dequant_triton.reset()
    bound = link_bytes / h2d
    print(f"link {link_bytes / 1e9:.3f} GB a step, H2D {h2d / 1e9:.1f} GB/s: bound {bound * 1e3:.1f} ms")
    print("| dequantization | decode step ms | x link bound |\n|---|---|---|")
    for label, (_, step) in rows.items():
        print(f"| {label} | {step * 1e3:.1f} | {step / bound:.2f} |")
    same = rows["fused"][0] == rows["torch"][0]
    print(f"token ids equal: {same}")
    if not same:
        failures.append("engine ids differ between the kernel and the torch path")


def cpu_attention() -> None:
    print("\n## 4. CPU decode attention, position-major cache (Llama-2-7B heads, bfloat16)")
    b, heads, d, length = (64, 32, 128, 544) if CUDA else (8, 32, 128, 256)
    k, v = (torch.randn(length, b, heads, d).to(torch.bfloat16).permute(1, 2, 0, 3) for _ in range(2))
    q, mask = torch.randn(b, heads, 1, d).to(torch.bfloat16), torch.ones(b, 1, 1, length, dtype=torch.bool)
    nbytes = 2 * k.numel() * 2
    src, dst = torch.ones(nbytes // 2, dtype=torch.uint8), torch.empty(nbytes // 2, dtype=torch.uint8)
    copy = 2 * src.numel() / best(lambda: dst.copy_(src))
    print(f"host memcpy {copy / 1e9:.1f} GB/s (read + write); threads {native.threads()} of "
          f"{len(os.sched_getaffinity(0))} CPUs, torch {torch.get_num_threads()}")
    print("| threads | ms | K+V GB/s |\n|---|---|---|")
    all_threads = native.threads
    for label, fn in (("all", all_threads), ("1", lambda: 1)):
        native.threads = fn
        out = native.decode_attention(q, k, v, mask)
        if out is None:
            print("the C kernel is not built here: skipped")
            native.threads = all_threads
            return
        t = best(lambda: native.decode_attention(q, k, v, mask))
        print(f"| {label} ({fn()}) | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} |")
    native.threads = all_threads
    codes_attention(b, heads, d, length)


def codes_attention(b: int, heads: int, d: int, length: int) -> None:
    """The same shape over a 4-bit cache read as stored (kernels/quantized_attention.py), position-major as host
    RAM beside a GPU keeps it: the rate the cost model's cpu_attention_codes stands for."""
    from flexgen_lite.kernels import quantized_attention as qa

    if not qa.checked():
        print("\nthe 4-bit attention kernel is not built here: skipped")
        return
    config = CompressionConfig(4, 64, -1)
    k, v = (qa.position_major(torch.randn(length, b, heads, d), config) for _ in "kv")
    q, new = torch.randn(b, heads, 1, d).to(torch.bfloat16), torch.randn(b, heads, 1, d).to(torch.bfloat16)
    stored = sum(x.numel() * x.element_size() for part in (k, v) for x in part)
    print(f"\n4-bit cache as stored ({stored / 1e9:.2f} GB of codes, scales and minima)\n"
          "| threads | ms | stored GB/s |\n|---|---|---|")
    all_threads = native.threads
    for label, fn in (("all", all_threads), ("1", lambda: 1)):
        native.threads = fn
        t = best(lambda: qa.attend(q, k, v, config, None, length - 1, new, new))
        print(f"| {label} ({fn()}) | {t * 1e3:.1f} | {stored / t / 1e9:.1f} |")
    native.threads = all_threads


def decode_kernels(steps: int = 8) -> None:
    """Where a decode step's device time goes with everything on the device (OPT-1.3B, batch 64, prompt 512: the
    suite's opt-1.3b-gpu-bs64 row): kernels by device time per step (torch.profiler, started after the prefill and
    stopped after `steps` steps, once a first run captured the step's graph), and their sum against the steps' wall
    time: the rest is the device idle, waiting on the host. Where the profiler sees no kernel inside the graphs'
    replays, again with eager steps. On a CPU: OPT-125M, ops by CPU time."""
    model, batch, prompt = ("facebook/opt-1.3b", 64, 512) if CUDA else ("facebook/opt-125m", 4, 32)
    print(f"\n## 5. decode step's kernels: {model}, batch {batch}, prompt {prompt}, all on {DEV.type}")
    step_us, rows = _profiled_steps(model, batch, prompt, steps)
    if CUDA and not rows:
        print(f"step {step_us / 1e3:.2f} ms (wall), no kernel seen inside the graphs' replays: again, eager")
        os.environ["FLEXGEN_LITE_CUDA_GRAPHS"] = "0"
        step_us, rows = _profiled_steps(model, batch, prompt, steps)
        del os.environ["FLEXGEN_LITE_CUDA_GRAPHS"]
    busy = sum(r[0] for r in rows)
    print(f"step {step_us / 1e3:.2f} ms (wall); {'kernels' if CUDA else 'ops'} {busy / 1e3:.2f} ms a step "
          f"({busy / step_us:.0%} of it){'; the rest: the GPU waiting' if CUDA else ''}")
    print("| kernel | us/step | calls/step | share of step |\n|---|---|---|---|")
    for us, calls, name in rows[:15]:
        print(f"| {name[:70]} | {us:.0f} | {calls:.0f} | {us / step_us:.1%} |")


def _profiled_steps(model: str, batch: int, prompt: int, steps: int) -> tuple[float, list[tuple[float, float, str]]]:
    """(wall us a decode step, [(us a step, calls a step, name)] by device time, largest first) over `steps`
    decode steps after the first, the block run once before."""
    from torch.profiler import ProfilerActivity, profile

    from flexgen_lite import FlexGenLite, Policy, SamplingConfig

    prompts = [[2] + [100 + (i * 7 + j) % 1000 for j in range(prompt - 1)] for i in range(batch)]
    sampling = SamplingConfig(max_new_tokens=steps + 2, stop_at_eos=False)
    prof = profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU])
    wall = {}

    def window(block) -> None:  # the profiler around decode steps 2 .. steps + 1
        if block.generated in (2, steps + 2):
            sync()
            if block.generated == 2:
                prof.start()
                wall["start"] = time.perf_counter()
            else:
                wall["s"] = time.perf_counter() - wall["start"]
                prof.stop()

    with FlexGenLite(model, policy=Policy(gpu_batch_size=batch), device=DEV.type) as m:
        m.generate_ids(prompts, sampling)  # kernels chosen, the step's graph captured
        m._check_prompts(prompts, [sampling.max_new_tokens] * len(prompts))
        m._run_block(prompts, sampling, label="kernels", report=window)
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) if CUDA
              else e.self_cpu_time_total)
        if us:
            rows.append((us / steps, e.count / steps, e.key))
    return wall["s"] / steps * 1e6, sorted(rows, reverse=True)


ATTENTION_SHAPES = [  # (label, rows, query heads, kv heads, head dim, positions); left padding on every 4th row
    ("OPT-1.3B, 64 rows", 64, 32, 32, 64, 544), ("OPT-30B, 48 rows", 48, 56, 56, 128, 544),
    ("Llama-3-70B, 32 rows", 32, 64, 8, 128, 544), ("Llama-2-7B, 8 rows, long", 8, 32, 32, 128, 8192),
]


def decode_attention() -> None:
    from flexgen_lite.kernels import attention
    from flexgen_lite.kernels import decode_attention_triton as triton_decode

    print("\n## 6. decode attention over a GPU cache: Triton split-KV against SDPA (masked, as the engine calls it)")
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: skipped")
        return
    dtype = torch.float16  # on a CPU too: the grouped heads' lanes take 16-bit values
    shapes = ATTENTION_SHAPES if CUDA else [("tiny", 4, 4, 2, 64, 40), ("tiny, no groups", 2, 4, 4, 64, 40)]
    n = 1 << 28 if CUDA else 1 << 20
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
    copy = 2 * n / best(lambda: dst.copy_(src))
    print(f"device copy {copy / 1e9:.0f} GB/s (read + write)")
    print("| shape | max diff | triton ms | K+V GB/s | SDPA ms | K+V GB/s | lanes ms (ahead) | K+V GB/s (ahead) | kept "
          "| triton ms at 1, 2, 4, 8 splits |\n|---|---|---|---|---|---|---|---|---|---|")
    for label, rows, heads, kv_heads, hd, length in shapes:
        q = torch.randn(rows, heads, 1, hd, device=DEV, dtype=dtype)
        k, v = (torch.randn(rows, kv_heads, length, hd, device=DEV, dtype=dtype) for _ in "kv")
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=DEV)
        mask[::4, ..., :length // 8] = False
        why = triton_decode.refusal(q, k)
        if why is not None:
            print(f"| {label} | refused: {why} | | | | | |")
            failures.append(f"triton decode attention refused: {why}") if CUDA else None
            continue
        def triton_call(splits=None, q=q, k=k, v=v, mask=mask):
            return triton_decode.attend(q, k, v, mask, splits)

        def sdpa_call(q=q, k=k, v=v, mask=mask):  # as the engine calls SDPA on CUDA; on a CPU, its own attention
            return attention._cuda_attend(q, k, v, mask)[0] if CUDA else attention.attend(q, k, v, mask)

        diff = (triton_call().float() - sdpa_call().float()).abs().max().item()
        if not diff <= 2e-2:
            failures.append(f"triton decode attention differs from SDPA at {label}: {diff:g}")
        ours, theirs = best(triton_call), best(sdpa_call)
        nbytes = 2 * k.numel() * k.element_size()
        lanes, rates = [], []
        for variant in triton_decode.variants(q, k)[1:]:  # each lane its own softmax (grouped heads: a lane a warp)
            refused = triton_decode.refusal(q, k, variant=variant)
            if refused is not None:
                lanes.append("refused")
                rates.append("-")
                failures.append(f"triton decode attention ({variant}) refused at {label}: {refused}")
                continue

            def lanes_call(q=q, k=k, v=v, mask=mask, variant=variant):
                return triton_decode.attend(q, k, v, mask, variant=variant)

            lanes_diff = (lanes_call().float() - sdpa_call().float()).abs().max().item()
            if not lanes_diff <= 2e-2:
                failures.append(f"triton decode attention ({variant}) differs from SDPA at {label}: {lanes_diff:g}")
            seconds = best(lanes_call)
            lanes.append(f"{seconds * 1e3:.3f}")
            rates.append(f"{nbytes / seconds / 1e9:.0f}")
        candidates = attention.decode_candidates(q, k, v, mask)
        kept = attention.faster(("check", label), candidates, DEV) if CUDA else "-"
        sweep = ", ".join(f"{best(lambda n=n: triton_call(n)) * 1e3:.3f}" for n in (1, 2, 4, 8))  # against split_plan
        lanes_cell, rates_cell = (" ".join(f"({x})" if i else x for i, x in enumerate(xs)) or "-"
                                  for xs in (lanes, rates))  # grouped heads: the lanes alone, no "ahead"
        print(f"| {label} | {diff:.2g} | {ours * 1e3:.3f} | {nbytes / ours / 1e9:.0f} | {theirs * 1e3:.3f} | "
              f"{nbytes / theirs / 1e9:.0f} | {lanes_cell} | {rates_cell} | {kept} | {sweep} |")


def quantized_store() -> None:
    from flexgen_lite.engine.cache_store import QuantizedStore
    from flexgen_lite.kernels import quantize_triton
    from flexgen_lite.kernels.compression import quantize_reference

    print("\n## 7. one token into a 4-bit cache part (a decode step's store): fused quantization against torch's")
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: skipped")
        return
    config = CompressionConfig(4, 64, -1)
    print("| rows x kv heads x head dim | exact | store ms fused | store ms torch | x faster |\n|---|---|---|---|---|")
    for rows, heads, d in ((16, 56, 128), (48, 56, 128), (12, 96, 128), (4, 4, 64)) if CUDA else ((4, 4, 64),):
        token = torch.randn(rows, heads, 1, d, device=DEV, dtype=torch.float16 if CUDA else torch.float32)
        store = QuantizedStore((rows, heads, 64, d), config, "device", DEV)
        got, want = quantize_triton.quantize(token, config), quantize_reference(token, config)
        same = all(torch.equal(getattr(got, n), getattr(want, n).reshape(getattr(got, n).shape))
                   for n in ("data", "scale", "minimum"))
        if not same:
            failures.append(f"fused quantization != torch at {(rows, heads, d)}")
        fused = best(lambda store=store, token=token: store.write(token, 3), reps=20)
        os.environ["FLEXGEN_LITE_TRITON"] = "0"
        quantize_triton.reset()
        slow = best(lambda store=store, token=token: store.write(token, 3), reps=20)
        os.environ.pop("FLEXGEN_LITE_TRITON")
        quantize_triton.reset()
        print(f"| {rows} x {heads} x {d} | {'yes' if same else '**NO**'} | {fused * 1e3:.3f} | {slow * 1e3:.3f} | "
              f"{slow / fused:.1f} |")
    print("\nand a 4-bit part's first positions into a slot (KVCache.load of a compressed part in GPU memory):")
    print("| rows x kv heads x positions x head dim | exact | fused ms | values/s | torch ms | values/s |\n"
          "|---|---|---|---|---|---|")
    for rows, heads, length, d in ((16, 56, 512, 128), (12, 96, 512, 128)) if CUDA else ((2, 3, 9, 64),):
        store = QuantizedStore((rows, heads, length + 32, d), config, "device", DEV)
        store.write(torch.randn(rows, heads, length, d, device=DEV, dtype=torch.float16), 0)
        slot = torch.empty(rows, heads, length + 32, d, device=DEV, dtype=torch.float16)
        read = lambda store=store, slot=slot, n=length: store.read(slot, n, None, [None] * 3, True)  # noqa: E731
        fused, got = best(read), slot.clone()
        os.environ["FLEXGEN_LITE_TRITON"] = "0"
        dequant_triton.reset()
        slow = best(read)
        os.environ.pop("FLEXGEN_LITE_TRITON")
        dequant_triton.reset()
        same = torch.equal(got[:, :, :length], slot[:, :, :length])
        if not same:
            failures.append(f"prefix dequantization != torch at {(rows, heads, length, d)}")
        n = rows * heads * length * d
        print(f"| {rows} x {heads} x {length} x {d} | {'yes' if same else '**NO**'} | {fused * 1e3:.3f} | "
              f"{n / fused / 1e9:.0f} G | {slow * 1e3:.3f} | {n / slow / 1e9:.0f} G |")


def codes_section(title: str, env: str) -> torch.dtype | None:
    """Sections 8 and 9: the title; their dtype, or None where Triton is not installed. A CPU runs the kernels in
    Triton's interpreter when asked (`env`)."""
    print("\n" + title)
    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: skipped")
        return None
    if not CUDA:
        os.environ[env] = "triton"
    return torch.float16 if CUDA else torch.float32


def refused(row: str, what: str, why: str, empty: int) -> None:
    """A table row for a kernel its check refused (a failure on a GPU), `empty` cells left blank."""
    print(f"| {row} | refused: {why} |" + " |" * empty)
    if CUDA:
        failures.append(f"{what} refused: {why}")


def codes_decode_attention() -> None:
    from flexgen_lite.engine.cache_store import QuantizedStore
    from flexgen_lite.kernels import attention
    from flexgen_lite.kernels import quantized_attention as qa
    from flexgen_lite.kernels import quantized_attention_triton as qt

    dtype = codes_section("## 8. decode attention over a 4-bit GPU cache: read as stored (Triton) against a slot's "
                          "dequantization and attention", qt.ENV)
    if dtype is None:
        return
    config = CompressionConfig(4, 64, -1)
    print("| rows x heads / kv heads x positions x head dim | max diff | codes ms | stored GB/s | slot ms "
          "(dequantize + attend) | x faster | codes ms, tiles of twice the positions | lanes ms (x faster than the "
          "slot) |\n|---|---|---|---|---|---|---|---|")
    shapes = ((16, 56, 56, 512, 128), (12, 96, 96, 512, 128), (32, 64, 8, 1024, 128)) if CUDA else \
        ((2, 4, 2, 40, 64), (2, 4, 4, 40, 64))
    for rows, heads, kv_heads, length, d in shapes:
        why = qt.refusal(DEV, dtype, heads // kv_heads, d, 64)
        if why is not None:
            refused(f"{rows} x {heads} / {kv_heads} x {length} x {d}", "4-bit cache attention", why, 4)
            continue
        stores = [QuantizedStore((rows, kv_heads, length + 32, d), config, "device", DEV) for _ in "kv"]
        for s in stores:
            s.write(torch.randn(rows, kv_heads, length, d, device=DEV, dtype=dtype), 0)
        q = torch.randn(rows, heads, 1, d, device=DEV, dtype=dtype)
        new = torch.randn(rows, kv_heads, 1, d, device=DEV, dtype=dtype)
        mask = torch.ones(rows, 1, 1, length, dtype=torch.bool, device=DEV)
        mask[::4, ..., :length // 8] = False
        slots = [torch.empty(rows, kv_heads, length + 32, d, device=DEV, dtype=dtype) for _ in "kv"]
        arrays = [s.arrays(length) for s in stores]

        def codes(arrays=arrays, q=q, new=new, mask=mask, n=length, variant="tiles"):
            return qt.attend(q, *arrays, mask, n - 1, new, new, variant=variant)

        def slot(stores=stores, slots=slots, q=q, new=new, mask=mask, n=length):  # KVCache.load, then attend_part
            for store, buf in zip(stores, slots, strict=True):
                store.read(buf, n, None, [None] * 3, True)
                buf[:, :, n - 1:n] = new
            return attention.attend_named(q, slots[0][:, :, :n], slots[1][:, :, :n], mask)[0]

        want = qa.reference(q.float().cpu(), *[tuple(x.cpu() for x in a) for a in arrays], config, mask.cpu(),
                            length - 1, new.float().cpu(), new.float().cpu())
        diff = (codes().float().cpu() - want).abs().max().item()
        if not diff <= 2e-2:
            failures.append(f"4-bit cache attention differs from the reference at {(rows, heads, length, d)}: {diff:g}")
        ours, theirs = best(codes), best(slot)
        wider = tiles_of_twice(codes, want)
        stored = 2 * sum(x.numel() * x.element_size() for x in arrays[0])
        lanes = "-"
        if "lanes" in qt.variants(heads // kv_heads):  # one query head a kv head: each lane its own softmax
            lanes_diff = (codes(variant="lanes").float().cpu() - want).abs().max().item()
            if not lanes_diff <= 2e-2:
                failures.append(f"4-bit cache attention (lanes) differs at {(rows, heads, length, d)}: {lanes_diff:g}")
            seconds = best(lambda: codes(variant="lanes"))
            lanes = f"{seconds * 1e3:.3f} ({theirs / seconds:.1f})"
        print(f"| {rows} x {heads} / {kv_heads} x {length} x {d} | {diff:.2g} | {ours * 1e3:.3f} | "
              f"{stored / ours / 1e9:.0f} | {theirs * 1e3:.3f} | {theirs / ours:.1f} | {wider} | {lanes} |")


def tiles_of_twice(codes, want) -> str:
    """The 4-bit cache kernel timed with tiles of twice the positions (quantized_attention_triton.TILE_DIVISOR 1):
    its ms, or why not (it failed, or differed from the reference)."""
    from flexgen_lite.kernels import quantized_attention_triton as qt

    divisor, qt.TILE_DIVISOR = qt.TILE_DIVISOR, 1
    try:
        if not (codes().float().cpu() - want).abs().max().item() <= 2e-2:
            return "differs"
        return f"{best(codes) * 1e3:.3f}"
    except Exception as e:  # noqa: BLE001 - a tiling that does not compile or fit here: said, not fatal
        return f"failed: {type(e).__name__}"
    finally:
        qt.TILE_DIVISOR = divisor


def codes_matmul() -> None:
    import torch.nn.functional as F

    from flexgen_lite.kernels import int4_gemv_triton as gemv
    from flexgen_lite.kernels.compression import dequantize

    dtype = codes_section("## 9. a decode step's rows times a 4-bit weight in GPU memory: read as stored (Triton) "
                          "against its dequantization into a slot and a dense product", gemv.ENV)
    if dtype is None:
        return
    print("| weight (out x in) | rows | max diff / max | codes ms | codes GB/s | dequantize ms | matmul ms | "
          "x faster, 1 batch | x faster, 4 batches |\n|---|---|---|---|---|---|---|---|---|")
    shapes = ((7168, 28672), (28672, 7168), (8192, 8192), (1024, 8192)) if CUDA else ((128, 256),)
    for n, k in shapes:
        q = quantize(torch.randn(n, k, device=DEV, dtype=dtype), CompressionConfig(4, 64, 1))
        slot = torch.empty(n, k, device=DEV, dtype=dtype)
        for rows in (1, 16, 64) if CUDA else (3,):
            x = torch.randn(rows, k, device=DEV, dtype=dtype)
            why = gemv.refusal(DEV, dtype, 64)
            if why is not None:
                refused(f"{n} x {k} | {rows}", "4-bit matmul", why, 4)
                break
            codes = lambda x=x, q=q: gemv.matmul(x, q)  # noqa: E731
            dense = lambda x=x, q=q, slot=slot: F.linear(x, dequantize(q, dtype, out=slot))  # noqa: E731
            want = dense().float()
            diff = ((codes().float() - want).abs().max() / want.abs().max()).item()
            if not diff <= 1e-2:
                failures.append(f"4-bit matmul differs from the slot path at {(n, k, rows)}: {diff:g}")
            # a step fills the slot once and its batches each multiply it (CodesMatrix measures so)
            ours, fill = best(codes), best(lambda q=q, slot=slot: dequantize(q, dtype, out=slot))
            matmul = best(lambda x=x, slot=slot: F.linear(x, slot))
            stored = q.data.numel() + 2 * q.scale.numel() * q.scale.element_size()
            print(f"| {n} x {k} | {rows} | {diff:.2g} | {ours * 1e3:.3f} | {stored / ours / 1e9:.0f} | "
                  f"{fill * 1e3:.3f} | {matmul * 1e3:.3f} | {(fill + matmul) / ours:.1f} | "
                  f"{(fill + 4 * matmul) / (4 * ours):.1f} |")


SECTIONS = {"exact": check_exact, "speed": speed, "engine": engine, "cpu": cpu_attention, "kernels": decode_kernels,
            "attention": decode_attention, "quantize": quantized_store, "codes": codes_decode_attention,
            "matmul": codes_matmul}
CUDA_ONLY = ("speed", "engine")


def main(argv: list[str]) -> int:
    """argv: the sections to run (SECTIONS' names, in their order), all by default."""
    unknown = set(argv) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}: choose among {', '.join(SECTIONS)}")
    print(f"device {DEV}{' (' + torch.cuda.get_device_name() + ')' if CUDA else ''}, torch {torch.__version__}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    for name, section in SECTIONS.items():
        if (not argv or name in argv) and (CUDA or name not in CUDA_ONLY):
            try:  # one section failing (a kernel that does not build on this GPU's triton) leaves the others to run
                section()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"section {name} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"\ngpu_checks: {'FAILED: ' + '; '.join(failures) if failures else 'all checks passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
