"""The engine's Triton kernels compiled for an H100/H200 (sm_90) on this CPU, ahead of time, by the triton wheel's
own compiler and ptxas (tests/sm90_compile.py, in a process of its own): what Triton's interpreter (the other
tests) cannot see. Each kind of decode attention the engine launches must compile, keep its registers (no spills,
room for 3 programs of 4 warps per SM) and read the cache in 16-byte loads; the 4-bit quantization must compile
with correctly rounded divisions and no fused multiply-adds (it is bit-identical to torch's path), and the
dequantization of a cache prefix into a slot without FMAs, writing 16 bytes at a time; the attention over a 4-bit
cache as stored, and a few rows times a 4-bit weight as stored, within the registers of two programs of 8 warps
per SM."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUANTIZE = ["quantize,fp16,64", "quantize,bf16,64", "quantize,fp32,64", "quantize,fp16,128"]
CODES = ["codes,fp16,1,128", "codes,bf16,4,128", "codes,fp16,8,128", "codes,fp32,1,64", "codes,bf16,8,64",
         "codes,fp16,4,256", "codes,fp32,4,128"]  # decode attention over a 4-bit cache as stored (groups of 64)
GEMV = ["gemv,fp16,64,16", "gemv,bf16,64,16", "gemv,fp16,64,64", "gemv,bf16,32,64", "gemv,fp32,64,16",
        "gemv,fp16,128,32"]  # a few rows (padded) times a 4-bit weight as stored
PREFIX = ["prefix,fp16,64,128", "prefix,bf16,64,128", "prefix,fp32,64,64", "prefix,fp16,64,256",
          "prefix,bf16,32,32"]  # the last (a group a position): a weight's whole groups (dequant_triton.dequantize)
LANES = ["fp16,64", "bf16,128", "fp16,256", "fp32,64"]  # the lanes variants (one query head per kv head: OPT, Llama-2)
GROUPED_LANES = ["fp16,8,128,0", "bf16,8,128,1", "fp16,4,64,0"]  # the lanes for grouped heads: Llama-3-70B, -8B
KINDS = ["fp16,1,64", "fp16,1,128", "bf16,1,128", "fp16,8,128", "bf16,4,128", "fp32,1,64", "fp16,1,80", "bf16,1,256",
         "fp16,4,256", "fp16,2,64", "bf16,8,64,sinks", "fp16,8,64,sinks"]  # the last: gpt-oss's heads


def have_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return os.access(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas"), os.X_OK)


pytestmark = pytest.mark.skipif(not have_ptxas(), reason="no triton wheel with ptxas here")


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, dict]:
    """What ptxas says of each kind, compiled once per kernel sources, kinds and triton (~10-25 s of a core) and
    kept in the workers' shared temp dir (conftest.built_once)."""
    import triton

    from .conftest import built_once

    kinds = [",".join([*kind.split(",")[:3], str(one), *kind.split(",")[3:]]) for kind in KINDS for one in (1, 0)]
    kinds += QUANTIZE + PREFIX + GEMV + [f"{kind},{one}" for kind in CODES for one in (1, 0)]
    kinds += [f"lanes,{kind},{one},{ahead}" for kind in LANES for one, ahead in ((0, 0), (0, 1), (1, 1))]
    kinds += [f"glanes,{kind}" for kind in GROUPED_LANES]
    kinds += [f"{kind},{one},lanes" for kind in CODES if kind.split(",")[2] == "1" for one in (1, 0)]
    sources = sorted((REPO / "flexgen_lite" / "kernels").glob("*.py")) + [REPO / "tests" / "sm90_compile.py"]
    key = [*kinds, triton.__version__, *(p.read_text() for p in sources)]
    path = built_once("sm90", key, lambda part: part.write_text(_compile(kinds)), suffix=".jsonl")
    return {tuple(r["kind"]): r for r in map(json.loads, path.read_text().splitlines())}


def _compile(kinds: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tests.sm90_compile", *kinds], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("kind", QUANTIZE)
def test_quantization_compiles_for_sm90_with_exact_divisions(compiled, kind):
    _, dtype, group = kind.split(",")
    r = compiled[("quantize", dtype, int(group))]
    assert r["spill_bytes"] == 0 and r["registers"] <= 128, r
    assert r["division"] == ["div.rn.f32"], r  # correctly rounded as torch's; no approximate division, no FMA


@pytest.mark.parametrize("kind", PREFIX)
def test_prefix_dequantization_compiles_for_sm90_writing_16_bytes_at_a_time(compiled, kind):
    _, dtype, group, head_dim = kind.split(",")
    r = compiled[("prefix", dtype, int(group), int(head_dim))]
    assert r["spill_bytes"] == 0 and r["registers"] <= 64 and r["vector_stores"], r
    assert r["division"] == [], r  # `code * scale` and `+ minimum` rounded apart, as the torch path: no FMA
    assert r["byte_loads"] == 0, r  # a group's codes loaded together


@pytest.mark.parametrize("one_split", [True, False], ids=["one-split", "splits"])
@pytest.mark.parametrize("kind", KINDS)
def test_decode_attention_compiles_for_sm90_within_its_registers(compiled, kind, one_split):
    dtype, group, head_dim, *sinks = kind.split(",")
    r = compiled[(dtype, int(group), int(head_dim), one_split, bool(sinks))]
    assert r["spill_bytes"] == 0 and r["registers"] <= 168, r  # 168 x 128 threads: 3 programs an SM at least
    assert r["vector_loads"], r  # K and V rows read 16 bytes at a time


@pytest.mark.parametrize("one_split,ahead", [(False, False), (False, True), (True, True)],
                         ids=["splits-loads-in-turn", "splits-loads-ahead", "one-split-loads-ahead"])
@pytest.mark.parametrize("kind", LANES)
def test_the_lanes_variants_compile_for_sm90_with_no_barrier_in_their_loop(compiled, kind, one_split, ahead):
    """What they are for: no reduction over the program's warps inside the loop over positions (the tiles' kernel
    has one at every tile: its max, its sum and its values); registers as the tiles' kernel's limit."""
    dtype, head_dim = kind.split(",")
    r = compiled[("lanes", dtype, int(head_dim), one_split, ahead)]
    assert r["spill_bytes"] == 0 and r["registers"] <= 168 and r["vector_loads"], r
    assert r["loop_barriers"] == 0, r
    tiles = compiled[(dtype, 1, int(head_dim), one_split, False)] if f"{dtype},1,{head_dim}" in KINDS else None
    assert tiles is None or tiles["loop_barriers"] > 0, tiles


@pytest.mark.parametrize("kind", GROUPED_LANES)
def test_the_grouped_heads_lanes_compile_for_sm90_with_fewer_barriers_in_their_loop(compiled, kind):
    """A lane a warp: the loop keeps the barriers of its staged loads (cp.async into shared memory for tl.dot,
    two) and none for a reduction over warps, where the tiles' kernel has 9; no spills at 4x the tiles'
    accumulator."""
    dtype, group, head_dim, one = kind.split(",")
    r = compiled[("glanes", dtype, int(group), int(head_dim), one == "1")]
    assert r["spill_bytes"] == 0 and r["registers"] <= 192 and r["vector_loads"] and r["async_16"] > 0, r
    tiles = compiled.get((dtype, int(group), int(head_dim), one == "1", False))
    assert r["loop_barriers"] <= 2 and (tiles is None or tiles["loop_barriers"] > r["loop_barriers"]), (r, tiles)


@pytest.mark.parametrize("one_split", [True, False], ids=["one-split", "splits"])
@pytest.mark.parametrize("kind", CODES)
def test_attention_over_4_bit_codes_compiles_for_sm90(compiled, kind, one_split):
    _, dtype, group, head_dim = kind.split(",")
    r = compiled[("codes", dtype, int(group), int(head_dim), one_split)]
    assert r["spill_bytes"] == 0 and r["registers"] <= 128, r  # 8 warps x 128: 2 programs an SM at least


@pytest.mark.parametrize("one_split", [True, False], ids=["one-split", "splits"])
@pytest.mark.parametrize("kind", [kind for kind in CODES if kind.split(",")[2] == "1"])
def test_attention_over_4_bit_codes_in_lanes_compiles_for_sm90_with_no_barrier_in_its_loop(compiled, kind,
                                                                                           one_split):
    _, dtype, group, head_dim = kind.split(",")
    r = compiled[("codes", dtype, int(group), int(head_dim), one_split, "lanes")]
    assert r["spill_bytes"] == 0 and r["registers"] <= 128 and r["loop_barriers"] == 0, r
    assert compiled[("codes", dtype, int(group), int(head_dim), one_split)]["loop_barriers"] > 0


@pytest.mark.parametrize("kind", GEMV)
def test_a_few_rows_times_4_bit_codes_compiles_for_sm90(compiled, kind):
    _, dtype, group, rows = kind.split(",")
    r = compiled[("gemv", dtype, int(group), int(rows))]
    assert r["spill_bytes"] == 0, r
    assert r["registers"] <= (128 if int(rows) <= 16 else 200), r  # 2 programs of 8 warps an SM at 16 rows, 1 at 64
    if dtype != "fp32":  # the codes staged ahead into shared memory, not a load per byte (fp32 keeps those)
        assert r["byte_loads"] == 0, r


def test_the_profile_counts_the_triton_compiles_a_stage_makes(tmp_path):
    """`measure.triton_compiles` (the profile's compiles a stage, which the GPU suite prints: a GPU's first probes of
    its kernels compile them): a kernel compiled once is counted with its seconds, its cache hit after is not."""
    script = (
        "import json\n"
        "from flexgen_lite.profiling.measure import triton_compiles\n"
        "from tests.sm90_compile import compile_quantize\n"
        "first, again = [0, 0.0], [0, 0.0]\n"
        "with triton_compiles(first):\n"
        "    compile_quantize('fp16', 64)\n"
        "with triton_compiles(again):\n"
        "    compile_quantize('fp16', 64)\n"
        "print(json.dumps([first, again]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    first, again = json.loads(out.stdout.splitlines()[-1])
    assert first[0] == 1 and 0 < first[1] < 60 and again == [0, 0.0]
