"""A Q4_0/Q4_1 GGUF's weights compressed as the file stores them: its own groups of 32, no second rounding. The
codes decode bit for bit to what gguf dequantizes, so compressed weights give the uncompressed model's outputs,
and the search weighs them as lossless; only the decoder layers' matrices are compressed (weights.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig, default_model_path
from flexgen_lite.engine.weight_sources import STORED_GROUPS
from flexgen_lite.kernels.compression import dequantize
from flexgen_lite.model_source import compression_notice, for_model, kept_as_stored
from flexgen_lite.models.gguf_weights import gguf_tensors, read_gguf_tensor
from flexgen_lite.models.specs import layer_specs
from flexgen_lite.planning.policy_search import AutoPolicy

from .test_gguf_file import _write_tiny_llama

Q = gguf.GGMLQuantizationType
PROMPTS = [[3, 7, 11, 2, 5], [9, 4, 1], [6, 6, 8, 10, 12, 14]]
FP32 = Policy(gpu_batch_size=2, num_gpu_batches=2, dtype="float32")
SPREAD = dataclasses.replace(FP32, weight_gpu_percent=30, weight_cpu_percent=30)  # the rest on disk


@pytest.fixture(scope="module", params=[Q.Q4_0, Q.Q4_1])
def tiny_q4(request, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("q4") / f"tiny-{request.param.name}.gguf"
    _write_tiny_llama(path, weight_type=request.param, ends_type=Q.Q8_0)  # as llama.cpp's Q4_0 files: Q8_0 ends
    return str(path)


def decoder_matrices(m: FlexGenLite):
    for layer, weights in zip(layer_specs(m.config), m.engine.weights, strict=True):
        for spec in layer.weights:
            if layer.kind in ("attention", "mlp") and len(spec.shape) == 2:
                yield spec, weights[spec.name]


@pytest.mark.parametrize("policy,device", [(FP32, "cpu"), (SPREAD, "cpu"), (SPREAD, "cpu+link")],
                         ids=["compute-memory", "three-tiers", "three-tiers-across-a-link"])
def test_compressed_weights_are_the_files_own_and_give_its_outputs(tiny_q4, policy, device):
    plan = gguf_tensors(tiny_q4)
    with FlexGenLite(tiny_q4, policy=policy, device=device) as plain:
        want_ids, want_logits = plain.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                                   return_logits=True)
    compressed = dataclasses.replace(policy, compress_weight=True)
    with FlexGenLite(tiny_q4, policy=compressed, device=device) as m:
        assert m.policy.weight_compression() == STORED_GROUPS and m.kept_as_stored
        if device == "cpu" and policy is FP32:  # in compute memory: the codes as the file's, in the CPU's int4
            for spec, stored in decoder_matrices(m):  # layout where it takes them, else as QuantizedTensors
                if stored.int4:
                    weight = stored.int4_weight()
                    values = weight.dequantize_t(torch.empty(weight.shape[1], weight.shape[0])).T
                else:
                    values = dequantize(stored.data, torch.float32)
                assert torch.equal(values, read_gguf_tensor(plan[spec.hf_name]))
            assert any(stored.int4 for _, stored in decoder_matrices(m))
        ids, logits = m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=6, stop_at_eos=False),
                                     return_logits=True)
    assert ids == want_ids
    for ours, theirs in zip(logits, want_logits, strict=True):  # the same weights; multiplied as stored, the sums
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)  # in another order, through every layer


def test_other_sources_and_groupings_are_rounded_as_before(tmp_path: Path):
    """An F32 file, or a Q4 file with FlexGen's grouping (along the output dimension), is quantized by
    flexgen_lite: 64-value groups, and a lossy note."""
    f32 = tmp_path / "tiny-f32.gguf"
    _write_tiny_llama(f32)
    q41 = tmp_path / "tiny-q41.gguf"
    _write_tiny_llama(q41, weight_type=Q.Q4_1)
    asked = dataclasses.replace(FP32, compress_weight=True)
    assert for_model(asked, str(f32)).weight_compression().group_size == 64
    output_dim = for_model(dataclasses.replace(asked, weight_group_dim=0), str(q41))
    assert output_dim.weight_compression().group_size == 64 and not kept_as_stored(output_dim, str(q41))
    assert for_model(FP32, str(q41)).weight_group_size == 0  # not compressed: nothing to resolve


def test_the_search_weighs_the_files_groups_as_lossless():
    model = default_model_path()  # SmolLM2: Q4_1 decoder matrices (its embedding is Q8_0, never compressed)
    auto = for_model(AutoPolicy(), model)
    assert auto.exact_weights and auto.compress_weight is None and auto.base.weight_group_size == 32
    grouped_by_output = for_model(AutoPolicy(Policy(weight_group_dim=0)), model)
    assert not grouped_by_output.exact_weights and grouped_by_output.compress_weight is False


def test_the_notice_says_the_weights_are_kept_and_what_is_lossy():
    kept = compression_notice(Policy(compress_weight=True, weight_group_size=32), False, ["Q4_1"], kept=True)
    assert "as the file stores them (Q4_1" in kept and "lossy" not in kept and "\n" not in kept
    both = compression_notice(Policy(compress_weight=True, compress_cache=True), True, ["Q4_1"], kept=True)
    assert "KV cache compressed to 4 bits, which is lossy" in both and "weights compressed" not in both
    assert "--policy auto" in both


def test_a_gguf_without_a_tokenizer_takes_token_ids_and_refuses_text(tiny_q4, capsys):
    """A file with weights but no tokenizer metadata opens (token ids in and out, as dummy weights do); text is
    refused in one line that says why."""
    from flexgen_lite.cli.main import main

    with FlexGenLite(tiny_q4, policy=FP32) as m:
        assert m.tokenizer is None
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", tiny_q4, "--max-new-tokens", "2", "--policy", "manual", "hello"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "has no tokenizer" in err and "none among its files" in err
