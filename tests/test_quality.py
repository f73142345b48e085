"""`flexgen-lite quality`: perplexities under a policy and uncompressed, the latter as transformers computes it."""

from __future__ import annotations

import json
import math
import random

import pytest

from flexgen_lite.cli.main import main
from flexgen_lite.engine.scoring import rolling_windows

from .test_scoring import hf_score


def quality(capsys, *argv: str) -> dict:
    main(["quality", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def hf_perplexity(model, ids: list[int], prefix: int, window: int) -> float:
    windows = rolling_windows(ids, prefix, window)
    return math.exp(-sum(lp for lp, _ in hf_score(model, windows)) / len(ids))


def test_tiny_model(tiny_models, tmp_path, capsys):
    path, model = tiny_models["llama"]
    rng = random.Random(0)
    ids = [rng.randrange(3, 512) for _ in range(200)]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in ids))
    out = quality(capsys, "--model", str(path), "--text", str(text), "--window", "48", "--compress-weight",
                  "--percent", "0", "100", "100", "0", "100", "0", "--gpu-batch-size", "2", "--num-gpu-batches", "2",
                  "--dtype", "float32", "--agreement", "4")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(path))(text.read_text(), add_special_tokens=False)["input_ids"]
    assert out["tokens"] == len(ids) > 150 and out["window"] == 48
    reference = hf_perplexity(model, ids, 2, 48)
    assert out["uncompressed"]["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert out["policy"]["perplexity"] != out["uncompressed"]["perplexity"]
    assert "--compress-weight" in out["policy"]["policy"] and "--compress" not in out["uncompressed"]["policy"]
    assert 0 <= out["greedy_agreement"]["identical"] <= 1


def test_smollm_with_4bit_weights(smollm, tmp_path, capsys):
    path, model = smollm
    from flexgen_lite.models.gguf_tokenizer import gguf_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Once upon a time, there was a little girl who "
                    "lived in a village near the forest. Whenever she went out, the little girl wore a red riding "
                    "cloak, so everyone in the village called her Little Red Riding Hood. " * 2)
    out = quality(capsys, "--model", path, "--text", str(text), "--window", "64", "--compress-weight",
                  "--gpu-batch-size", "4", "--dtype", "float32", "--agreement", "0")  # agreement: the test above
    tok = gguf_tokenizer(path)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert out["uncompressed"]["perplexity"] == pytest.approx(hf_perplexity(model, ids, prefix, 64), rel=1e-4)
    assert 1 < out["uncompressed"]["perplexity"] < 20  # a trained model on plain English
    assert abs(out["relative_difference"]) < 1  # 4-bit weights: a change, not noise
    assert "greedy_agreement" not in out


def test_unreadable_text_is_one_error_line(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quality", "--model", str(tiny_models["opt"][0]), "--text", str(tmp_path / "missing.txt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --text")


def test_the_uncompressed_run_keeps_the_budgets(tiny_models, tmp_path, capsys):
    """Weights on disk, 4 bits, within a --disk-mem that their uncompressed twin would pass: that run takes the
    uncompressed policy the search finds within the budgets (the twin used to run past them, unchecked)."""
    import dataclasses

    from flexgen_lite import Policy, Workload
    from flexgen_lite.model_source import model_config
    from flexgen_lite.planning.memory_plan import peak_memory

    path, model = tiny_models["llama"]
    rng = random.Random(1)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 512)}" for _ in range(120)))
    policy = Policy(gpu_batch_size=2, weight_gpu_percent=0, weight_cpu_percent=0, compress_weight=True,
                    dtype="float32")
    config, workload = model_config(str(path)), Workload(48, 1)
    small = peak_memory(config, workload, policy, False)[1]["disk"]
    large = peak_memory(config, workload, dataclasses.replace(policy, compress_weight=False), False)[1]["disk"]
    assert large > 2 * small
    out = quality(capsys, "--model", str(path), "--text", str(text), "--window", "48", "--compress-weight",
                  "--percent", "0", "0", "100", "0", "100", "0", "--gpu-batch-size", "2", "--dtype", "float32",
                  "--agreement", "0", "--disk-mem", str(int((small + large) / 2)), "--offload-dir", str(tmp_path))
    assert "--percent 0 0" in out["policy"]["policy"] and "--compress-weight" in out["policy"]["policy"]
    assert "--percent 0 0" not in out["uncompressed"]["policy"]  # off the disk, to fit
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(path))(text.read_text(), add_special_tokens=False)["input_ids"]
    assert out["uncompressed"]["perplexity"] == pytest.approx(hf_perplexity(model, ids, 2, 48), rel=1e-4)


def test_windows_of_the_whole_context_with_agreement_prompts(tiny_models, tmp_path, capsys):
    """--window at the model's context (64) under --policy auto: the windows are prefill rows and need no position
    past it, the agreement prompts' 32 + 16 fit (auto planned for 64 + 16 and refused)."""
    path, model = tiny_models["llama"]
    rng = random.Random(2)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 512)}" for _ in range(150)))
    out = quality(capsys, "--model", str(path), "--text", str(text), "--window", "64", "--compress-weight",
                  "--dtype", "float32", "--agreement", "2")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(path))(text.read_text(), add_special_tokens=False)["input_ids"]
    assert out["window"] == 64 and 0 <= out["greedy_agreement"]["identical"] <= 1
    assert out["uncompressed"]["perplexity"] == pytest.approx(hf_perplexity(model, ids, 2, 64), rel=1e-4)


def test_a_closed_model_gives_its_memory_back(tmp_path):
    """close() frees the engine's weights and returns their pages (freed memory is otherwise kept: a second model,
    quality's uncompressed twin, ran 29% past --cpu-mem beside the first's holes, helper-21)."""
    import gc

    from flexgen_lite import Budgets, FlexGenLite, Policy
    from flexgen_lite.system.memory import process_rss, return_freed_memory

    from .conftest import make_checkpoint

    path = tmp_path / "llama"
    make_checkpoint(path, "llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4)
    gc.collect()
    return_freed_memory()
    before = process_rss()
    m = FlexGenLite(str(path), policy=Policy(gpu_batch_size=2, dtype="bfloat16", compress_weight=True),
                    budgets=Budgets(None, 1 << 30))  # a promise: what makes close() give the pages back
    held = process_rss() - before
    m.close()
    assert held > 32 << 20  # 4-bit codes, bf16 ends and vectors on the heap
    assert process_rss() - before < held / 4
