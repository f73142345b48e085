"""Compile the engine's Triton kernels for sm_90 ahead of time, without a GPU, and report what ptxas says of each
kind: `python -m tests.sm90_compile KIND...`, KIND one of
  dtype,group,head_dim,one_split[,sinks]      the decode attention;
  lanes,dtype,head_dim,one_split,ahead        its lanes variant (one query head per kv head);
  glanes,dtype,group,head_dim,one_split       its lanes variant for grouped heads (a lane a warp);
  quantize,dtype,group                        the 4-bit quantization;
  codes,dtype,group,head_dim,one_split[,lanes] the decode attention over a 4-bit cache as stored;
  gemv,dtype,group,rows                       a few rows times a 4-bit weight as stored;
  prefix,dtype,group,head_dim                 the dequantization of a cache prefix;
one JSON object a kind on stdout. Run in its own process without TRITON_INTERPRET: a process that interprets
Triton cannot compile for a GPU (test_triton_sm90.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

POINTERS = ("q", "k", "v", "seen", "out", "lse", "sinks")
# strides Triton's launcher finds divisible by 16 at the engine's shapes (head dims 64, 128; contiguous caches and
# masks of 16k positions): all but the mask's position stride (1, a constant) and the log-sum-exp's
NOT_DIVISIBLE = ("sm_l", "sl_b", "sl_h")


def ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_kind(dtype: str, group: int, head_dim: int, one_split: bool, sinks: bool = False) -> dict:
    import torch

    from flexgen_lite.kernels import decode_attention_triton as triton_decode

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    padded, block, dot = triton_decode.tiling(torch_dtype, group, head_dim)
    constants = dict(sm_l=1, G=group, GP=padded, D=head_dim, DP=triton_decode._pow2(head_dim), BLOCK=block, DOT=dot,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", MASKED=True, ONE_SPLIT=one_split, SINKS=sinks)
    src = _decode_source(triton_decode._kernels(False)[0], dtype, one_split, constants)
    return {"kind": [dtype, group, head_dim, one_split, sinks], "block": block, "dot": dot, **assemble(src, {})}


def compile_lanes(dtype: str, head_dim: int, one_split: bool, ahead: bool) -> dict:
    """The decode attention's lanes variant (each position lane its own softmax), masked, without sinks."""
    from flexgen_lite.kernels import decode_attention_lanes as lanes
    from flexgen_lite.kernels import decode_attention_triton as triton_decode

    dp = triton_decode._pow2(head_dim)
    block = lanes.block(dp, 1)
    constants = dict(sm_l=1, D=head_dim, DP=dp, BLOCK=block, MASKED=True, ONE_SPLIT=one_split, SINKS=False,
                     AHEAD=ahead)
    src = _decode_source(lanes.kernels(False)[0], dtype, one_split, constants)
    return {"kind": ["lanes", dtype, head_dim, one_split, ahead], "block": block, **assemble(src, {})}


def compile_grouped_lanes(dtype: str, group: int, head_dim: int, one_split: bool) -> dict:
    """The decode attention's lanes variant for grouped heads (a lane of positions a warp), masked, no sinks."""
    from flexgen_lite.kernels import decode_attention_lanes as lanes
    from flexgen_lite.kernels import decode_attention_triton as triton_decode

    constants = dict(sm_l=1, G=group, GP=max(16, triton_decode._pow2(group)), D=head_dim,
                     DP=triton_decode._pow2(head_dim), W=lanes.LANE_WARPS, SUB=lanes.LANE_POSITIONS, MASKED=True,
                     ONE_SPLIT=one_split, SINKS=False, UPCAST=False)
    src = _decode_source(lanes.kernels(False)[1], dtype, one_split, constants)
    return {"kind": ["glanes", dtype, group, head_dim, one_split],
            **assemble(src, {"num_warps": lanes.LANE_WARPS})}


def _decode_source(kernel, dtype: str, one_split: bool, constants: dict):
    from triton.compiler import ASTSource

    pointer, names = "*" + dtype, kernel.arg_names
    strides = names[names.index("scale") + 1:names.index("sl_h") + 1]
    signature = {"q": pointer, "k": pointer, "v": pointer, "seen": "*u8", "out": pointer if one_split else "*fp32",
                 "lse": "*fp32", "sinks": "*fp32", "length": "i32", "split_len": "i32", "scale": "fp32",
                 **dict.fromkeys(strides, "i32")}
    divisible = [n for n in (*POINTERS, *strides) if n not in NOT_DIVISIBLE]
    return ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                     constexprs={(names.index(k),): v for k, v in constants.items()},
                     attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})


def compile_codes(dtype: str, group: int, head_dim: int, one_split: bool, lanes: bool = False) -> dict:
    """The decode attention over a 4-bit cache as stored (quantized_attention_triton), groups of 64 along head_dim;
    `lanes`: its lanes variant (one query head per kv head)."""
    import torch
    from triton.compiler import ASTSource

    from flexgen_lite.kernels import decode_attention_triton as triton_decode
    from flexgen_lite.kernels import quantized_attention_triton

    kernel = quantized_attention_triton._kernel(False)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    padded, block, dot = quantized_attention_triton.tiling(torch_dtype, group, head_dim)
    pointer, names = "*" + dtype, kernel.arg_names
    strides = names[names.index("scale") + 1:names.index("G")]
    signature = {"q": pointer, "kc": "*u8", "ks": "*fp16", "km": "*fp16", "vc": "*u8", "vs": "*fp16", "vm": "*fp16",
                 "k_new": pointer, "v_new": pointer, "seen": "*u8", "row_of": "*i64",
                 "out": pointer if one_split else "*fp32", "lse": "*fp32", "length": "i32", "split_len": "i32",
                 "skip": "i32", "scale": "fp32", **dict.fromkeys(strides, "i32")}
    constants = dict(sm_l=1, ss_l=head_dim // 64, G=group, GP=padded, D=head_dim, DP=triton_decode._pow2(head_dim),
                     NG=max(1, triton_decode._pow2(head_dim) // 64), BLOCK=block, DOT=dot,
                     PRECISION="ieee" if dtype == "fp32" else "tf32", MASKED=True,
                     ROWS=True, ONE_SPLIT=one_split, LANES=lanes)
    strides = [n for n in strides if n not in constants]
    divisible = [n for n in signature if signature[n].startswith("*")] + [
        n for n in strides if n not in NOT_DIVISIBLE and n not in ("ss_b", "ss_h")]
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return {"kind": ["codes", dtype, group, head_dim, one_split, *(["lanes"] if lanes else [])], "block": block,
            "dot": dot,
            **assemble(src, {"num_warps": quantized_attention_triton.WARPS})}


def compile_gemv(dtype: str, group: int, rows: int) -> dict:
    """A few rows times a 4-bit weight as stored (int4_gemv_triton), `rows` padded rows."""
    from triton.compiler import ASTSource

    from flexgen_lite.kernels import int4_gemv_triton as gemv

    kernel, names = gemv._kernel(False), gemv._kernel(False).arg_names
    ints = names[names.index("rows"):names.index("MP")]
    signature = {"x": "*" + dtype, "codes": "*u8", "scale": "*fp16", "minimum": "*fp16", "out": "*fp32",
                 **dict.fromkeys(ints, "i32")}
    constants = dict(MP=rows, BN=gemv.BLOCK_N, BK=gemv.BLOCK_K, GS=group,
                     PRECISION="ieee" if dtype == "fp32" else "tf32")
    divisible = ("x", "codes", "scale", "minimum", "out", "k_in", "split_len", "sx_m", "sc_n", "so_s", "so_m")
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return {"kind": ["gemv", dtype, group, rows], **assemble(src, {"num_warps": gemv.WARPS})}


def compile_quantize(dtype: str, group: int) -> dict:
    from triton.compiler import ASTSource

    from flexgen_lite.kernels import quantize_triton

    kernel = quantize_triton._kernel(False)
    names = kernel.arg_names
    signature = {"x": "*" + dtype, "codes": "*u8", "scale": "*fp16", "minimum": "*fp16", "n_groups": "i32",
                 "inv_levels": "fp32"}
    constants = dict(G=group, LEVELS=15, BLOCK=quantize_triton.BLOCK, RECIPROCAL=True)
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ("x", "codes", "scale", "minimum")})
    return {"kind": ["quantize", dtype, group], **assemble(src, {"enable_fp_fusion": False})}


def compile_prefix(dtype: str, group: int, head_dim: int) -> dict:
    from triton.compiler import ASTSource

    from flexgen_lite.kernels import dequant_triton

    kernel = dequant_triton._kernels(False)[1]
    names = kernel.arg_names
    ints = names[names.index("n_rows"):names.index("G")]
    signature = {"codes": "*u8", "scale": "*fp16", "minimum": "*fp16", "out": "*" + dtype, **dict.fromkeys(ints, "i32")}
    constants = dict(G=group, NG=head_dim // group, BLOCK=max(1, dequant_triton.TILE // group))
    divisible = ("codes", "scale", "minimum", "out", "c0", "c1", "c2", "o0", "o1", "o2")  # head dims of 32 and up
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return {"kind": ["prefix", dtype, group, head_dim], **assemble(src, {"enable_fp_fusion": False})}


def assemble(src, options: dict) -> dict:
    """PTX for sm_90 and what ptxas reports of it: registers, spills, 16-byte loads and stores."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options}).asm["ptx"]
    report = subprocess.run([ptxas(), "-v", "--gpu-name", "sm_90a", "-o", os.devnull, "-"], input=ptx,
                            capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "vector_loads": "ld.global.v4" in ptx, "vector_stores": "st.global.v4" in ptx,
            "byte_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.[bu]8\b", ptx)),
            "async_16": len(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)),
            "loop_barriers": loop_barriers(ptx), "ptx": ptx}


def loop_barriers(ptx: str) -> int:
    """bar.sync instructions inside loops (between a label and a branch back to it): a reduction over the
    program's warps at every iteration."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__\w+):", line.strip()))}
    inside = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            inside.update(range(labels[m.group(1)], i))
    return sum("bar.sync" in lines[i] for i in inside)


def main(kinds: list[str]) -> int:
    for kind in kinds:
        if kind.startswith("quantize,"):
            _, dtype, group = kind.split(",")
            found = compile_quantize(dtype, int(group))
        elif kind.startswith("gemv,"):
            _, dtype, group, rows = kind.split(",")
            found = compile_gemv(dtype, int(group), int(rows))
        elif kind.startswith("codes,"):
            _, dtype, group, head_dim, one, *lanes = kind.split(",")
            found = compile_codes(dtype, int(group), int(head_dim), one == "1", lanes == ["lanes"])
        elif kind.startswith("lanes,"):
            _, dtype, head_dim, one, ahead = kind.split(",")
            found = compile_lanes(dtype, int(head_dim), one == "1", ahead == "1")
        elif kind.startswith("glanes,"):
            _, dtype, group, head_dim, one = kind.split(",")
            found = compile_grouped_lanes(dtype, int(group), int(head_dim), one == "1")
        elif kind.startswith("prefix,"):
            _, dtype, group, head_dim = kind.split(",")
            found = compile_prefix(dtype, int(group), int(head_dim))
        else:
            dtype, group, head_dim, one, *sinks = kind.split(",")
            found = compile_kind(dtype, int(group), int(head_dim), one == "1", sinks == ["sinks"])
        found["division"] = sorted(set(re.findall(r"\b(div\.\w+\.f32|rcp\.\w+\.f32|fma\.rn\.f32)", found.pop("ptx"))))
        print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
