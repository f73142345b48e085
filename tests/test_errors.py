"""Every way to misuse FlexGen-Lite ends in a clear exception that says what is wrong and what to do."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal

import pytest
import torch

from flexgen_lite import Budgets, FlexGenLite, ModelError, OffloadError, Policy, PolicyError, SamplingConfig
from flexgen_lite.engine.storage import DiskStore
from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.planning import budgets as budgets_module
from flexgen_lite.system.memory import GiB, gib

from .conftest import PROMPTS


@pytest.fixture(scope="module")
def opt_dir(tiny_models):
    return tiny_models["opt"][0]


@pytest.fixture(scope="module")
def model(opt_dir):
    with FlexGenLite(str(opt_dir), policy=Policy(gpu_batch_size=2, dtype="float32")) as m:
        yield m


@pytest.fixture
def copy_of(opt_dir, tmp_path):
    """A writable copy of the tiny OPT checkpoint."""
    path = tmp_path / "model"
    shutil.copytree(opt_dir, path)
    return path


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


# ---- checkpoints ------------------------------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="neither an existing checkpoint directory nor a known model") as e:
        FlexGenLite(str(tmp_path / "nowhere"))
    assert "opt-125m" in str(e.value)  # says what would work


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json.*Hugging Face checkpoint directory") as e:
        FlexGenLite(str(tmp_path))
    assert "here" not in str(e.value)  # no GGUF file to point to


def test_a_directory_of_gguf_files_names_one_to_pass(tmp_path):
    """A folder holding a GGUF model (whole, or in parts) is not a checkpoint directory: the error names the
    file to pass, the first part of a split one."""
    (tmp_path / "model-00002-of-00002.gguf").write_bytes(b"GGUF")
    (tmp_path / "model-00001-of-00002.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"2 GGUF files are here: pass one, e\.g\. --model .*model-00001-of-00002"):
        FlexGenLite(str(tmp_path))
    (tmp_path / "model-00002-of-00002.gguf").unlink()
    with pytest.raises(ModelError, match=r"a GGUF file is here: --model .*model-00001-of-00002\.gguf\)"):
        FlexGenLite(str(tmp_path))


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a checkpoint directory"):
        FlexGenLite(str(tmp_path / "model.bin"))


def test_config_without_weights(opt_dir, tmp_path):
    shutil.copy(opt_dir / "config.json", tmp_path)
    with pytest.raises(ModelError, match=r"no \*.safetensors or pytorch_model\*.bin weights"):
        FlexGenLite(str(tmp_path))


def test_invalid_config_json(copy_of):
    (copy_of / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON.*re-download"):
        FlexGenLite(str(copy_of))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(copy_of, damage):
    file = copy_of / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(ModelError, match="not a readable safetensors file.*re-download"):
        FlexGenLite(str(copy_of))


def test_corrupt_pytorch_bin(copy_of):
    (copy_of / "model.safetensors").unlink()
    (copy_of / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 100)
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint.*re-download"):
        FlexGenLite(str(copy_of))


def test_checkpoint_missing_a_tensor(copy_of, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy_of / "model.safetensors"))
    del state["model.decoder.layers.1.fc2.weight"]
    save_file(state, str(copy_of / "model.safetensors"), metadata={"format": "pt"})
    offload = tmp_path / "offload"
    with pytest.raises(ModelError, match="lacks the tensor 'model.decoder.layers.1.fc2.weight'.*complete"):
        FlexGenLite(str(copy_of), policy=Policy(weight_gpu_percent=0, weight_cpu_percent=0, offload_dir=str(offload)))
    assert not offload.exists()  # the weights already written to disk are gone, and the folder made for them


def test_checkpoint_missing_a_shard(copy_of):
    index = {"metadata": {}, "weight_map": {"model.decoder.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (copy_of / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lacks the shard.*model-00002-of-00002.safetensors"):
        FlexGenLite(str(copy_of))


def test_a_weight_stored_as_integers_is_refused(copy_of):
    """A float weight stored as int8 (a corrupt file, or another format's codes) was cast and ran: other text."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy_of / "model.safetensors"))
    name = "model.decoder.layers.0.self_attn.k_proj.weight"
    state[name] = state[name].to(torch.int8)
    save_file(state, str(copy_of / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"{name}' is stored as torch.int8, not as floating-point.*GGUF"):
        FlexGenLite(str(copy_of))


def test_checkpoint_not_matching_its_config(copy_of):
    edit_config(copy_of, ffn_dim=384)
    with pytest.raises(ModelError, match="fc1.weight has shape"):
        FlexGenLite(str(copy_of))


def test_unsupported_architecture(copy_of):
    edit_config(copy_of, model_type="gpt2")
    with pytest.raises(ModelError,
                       match="'gpt2' is not supported; supported: gemma, gemma2, gemma3, gemma3_text, gpt_oss, "
                             "granite, granitemoe, llama, mistral, mixtral, olmo2"):
        FlexGenLite(str(copy_of))


@pytest.mark.parametrize(("changes", "words"), [
    (dict(activation_function="tanh"), "OPT activation 'tanh' is not supported"),
    (dict(num_attention_heads=5), "not divisible by num_heads"),
    (dict(hidden_size=None), "lacks the field"),
])
def test_unsupported_opt_config(changes, words):
    config = dict(model_type="opt", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                  max_position_embeddings=64, vocab_size=512)
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ModelError, match=words):
        config_from_dict(config)


@pytest.mark.parametrize("scaling,words", [({"rope_type": "dynamic", "factor": 4.0}, "rope scaling 'dynamic' is not "
                                            "supported"),
                                           ({"rope_type": "yarn", "factor": 4.0}, "without original_max_position")])
def test_unsupported_rope_scaling(scaling, words):
    config = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, vocab_size=512, rope_scaling=scaling)
    with pytest.raises(ModelError, match=words):
        config_from_dict(config)


def test_unknown_model_name():
    with pytest.raises(ModelError, match="known model name") as e:
        FlexGenLite("facebook/opt-999b")
    for known in ("opt-125m", "opt-175b", "llama-3-8b"):
        assert known in str(e.value)


# ---- prompts and sampling settings ------------------------------------------------------------------------------

def test_prompt_longer_than_the_context(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions.*shorten"):
        model.generate_ids([PROMPTS[0], [3] * 60], SamplingConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="context"):
        model.generate(" ".join(["w5"] * 70), max_new_tokens=1)
    assert len(model.generate_ids([[3] * 56], SamplingConfig(max_new_tokens=8, stop_at_eos=False))[0]) == 8


def test_empty_prompts(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate_ids([[2, 5], []])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate("")
    with pytest.raises(ValueError, match="no prompts"):
        model.generate([])


@pytest.mark.parametrize("bad", [512, 10**6, -1])
def test_token_ids_outside_the_vocabulary(model, bad):
    with pytest.raises(ValueError, match=r"outside the vocabulary \(0..511\)"):
        model.generate_ids([[2, 5], [2, bad]])


@pytest.mark.parametrize(("kw", "field"), [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens must be a whole"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_settings(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kw)


# ---- policies ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "words"), [
    (dict(weight_gpu_percent=70, weight_cpu_percent=40), "weight_gpu_percent \\+ weight_cpu_percent = 110 exceeds 100"),
    (dict(cache_gpu_percent=-10), "cache_gpu_percent must be within 0..100"),
    (dict(act_cpu_percent=101), "act_cpu_percent must be within 0..100"),
    (dict(weight_cpu_percent=float("nan")), "weight_cpu_percent must be within 0..100"),
    (dict(gpu_batch_size=0), "gpu_batch_size must be a positive integer"),
    (dict(num_gpu_batches=1.5), "num_gpu_batches must be a positive integer"),
    (dict(dtype="float64"), "dtype must be one of float32, bfloat16, float16"),
    (dict(attn_sparsity=0), "attn_sparsity"),
])
def test_impossible_policy(kw, words):
    with pytest.raises(PolicyError, match=words):
        Policy(**kw)


def test_policy_too_big_for_memory_fails_before_allocating(tmp_path, monkeypatch):
    def no_placing(*args, **kwargs):
        raise AssertionError("placed weights before checking that they fit")

    monkeypatch.setattr("flexgen_lite.generation.place_weights", no_placing)
    with pytest.raises(PolicyError) as e:
        FlexGenLite("facebook/opt-175b", policy=Policy(offload_dir=str(tmp_path)))
    message = str(e.value)
    assert "weights of facebook/opt-175b needs 325" in message and "GiB" in message
    assert "tier" in message and "--percent" in message
    assert os.listdir(tmp_path) == []  # no offload directory was made, nothing was written


def test_sizes_in_messages_keep_their_digits():
    assert [gib(n) for n in (3 * GiB, 0.5 * GiB, 100 * 2**20, 1.5 * 2**20, 2048, 0)] == [
        "3.00 GiB", "0.50 GiB", "100.00 MiB", "1.50 MiB", "2.00 KiB", "0.00 KiB"]


def test_a_budget_too_small_for_the_weights_says_so_before_any_prompt(opt_dir):
    with pytest.raises(PolicyError, match=r"before any prompt \(weights and buffers\).*needs \d+\.\d\d [KM]iB"):
        FlexGenLite(str(opt_dir), policy=Policy(dtype="float32"), budgets=Budgets(gpu=1024, cpu=1024))


def test_policy_too_big_for_disk(tmp_path, monkeypatch):
    real = budgets_module.free_bytes
    monkeypatch.setattr(budgets_module, "free_bytes", lambda *a: {**real(*a), "disk": 10 * 2**20})
    # the decoder layers (85M parameters in fp32); the embedding stays in memory
    with pytest.raises(PolicyError, match="needs 0.32 GiB on the disk tier.*--offload-dir"):
        FlexGenLite("facebook/opt-125m", policy=Policy(weight_gpu_percent=0, weight_cpu_percent=0, dtype="float32",
                                                       offload_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cache", [(100, 0), (0, 0)], ids=["cache-in-memory", "cache-on-disk"])
def test_kv_cache_too_big(opt_dir, monkeypatch, cache):
    policy = Policy(gpu_batch_size=4, num_gpu_batches=2, cache_gpu_percent=cache[0], cache_cpu_percent=cache[1],
                    dtype="float32")
    with FlexGenLite(str(opt_dir), policy=policy) as m:
        before = m.memory_report()["current"]
        monkeypatch.setattr(budgets_module, "free_bytes", lambda *a: dict.fromkeys(("gpu", "cpu", "disk"), 4096))
        with pytest.raises(PolicyError, match=r"the KV cache needs \d+\.\d\d [KM]iB on .*tier") as e:
            m.generate_ids(PROMPTS, SamplingConfig(max_new_tokens=8))
        assert ("on the disk tier" in str(e.value)) == (cache == (0, 0))
        assert m.memory_report()["current"] == before  # nothing was allocated
        monkeypatch.undo()
        assert len(m.generate_ids(PROMPTS[:2], SamplingConfig(max_new_tokens=2, stop_at_eos=False))[0]) == 2


# ---- the offload directory --------------------------------------------------------------------------------------

def test_offload_directory_under_a_file(opt_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file" / "offload", tmp_path / "file"):
        with pytest.raises(OffloadError, match="is not writable.*--offload-dir") as e:
            FlexGenLite(str(opt_dir), policy=Policy(offload_dir=str(bad)))
        assert str(bad) in str(e.value)


def all_on_disk(tmp_path) -> Policy:
    return Policy(weight_gpu_percent=0, weight_cpu_percent=0, dtype="float32", offload_dir=str(tmp_path))


def test_file_size_limit_during_offload(tmp_path):
    """posix_fallocate past RLIMIT_FSIZE fails with EFBIG before a byte is written."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        with pytest.raises(OffloadError) as e:
            FlexGenLite("facebook/opt-125m", policy=all_on_disk(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert e.value.errno == errno.EFBIG
    message = str(e.value)
    assert "could not store" in message and "MiB" in message and "ulimit -f" in message
    assert "--offload-dir" in message and "lower the disk share" in message
    assert os.listdir(tmp_path) == []  # nothing left behind


@pytest.mark.parametrize("call", ["posix_fallocate", "pwrite"])
def test_full_disk_during_offload(tmp_path, monkeypatch, call):
    """The disk fills up when claiming a file's space, or (on file systems that over-commit) when writing it."""
    real, calls = getattr(os, call), []

    def full_after_a_few(*args):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, call, full_after_a_few)
    with pytest.raises(OffloadError, match="offload disk is full: could not store .* MiB") as e:
        FlexGenLite("facebook/opt-125m", policy=all_on_disk(tmp_path))
    assert "point --offload-dir at a larger disk" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_disk_store_files_are_deleted_with_their_owner(tmp_path):
    store = DiskStore(str(tmp_path))
    kept, dropped = store.create(1024, "kept"), store.create(1024, "dropped")
    kept.write(torch.arange(256, dtype=torch.int32))
    assert len(os.listdir(store.directory)) == 2
    del dropped
    assert os.listdir(store.directory) == [os.path.basename(kept.path)]
    assert kept.read_into(torch.empty(256, dtype=torch.int32)).tolist() == list(range(256))
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OffloadError):  # a closed store's files are gone
        kept.read_into(torch.empty(256, dtype=torch.int32))


def test_offload_folders_a_store_made_are_removed_with_it(tmp_path):
    """--offload-dir a/b/c where none exists: the store makes the three and removes them on close, leaving a
    folder someone else put a file in since."""
    DiskStore(str(tmp_path / "a" / "b" / "c")).close()
    assert os.listdir(tmp_path) == []
    store = DiskStore(str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "a" / "note.txt").write_text("kept")
    store.close()
    assert os.listdir(tmp_path / "a") == ["note.txt"]


# ---- features that need a tokenizer -----------------------------------------------------------------------------

def test_dummy_model_has_no_tokenizer():
    with FlexGenLite("facebook/opt-125m", policy=Policy(weight_gpu_percent=0, weight_cpu_percent=100,
                                                        gpu_batch_size=1, dtype="float32")) as m:
        with pytest.raises(ModelError, match="stop strings need a tokenizer"):
            m.generate_ids([[2, 5]], SamplingConfig(max_new_tokens=2, stop=("w5",)))
        with pytest.raises(ModelError, match=r"no tokenizer.*pass token ids \(FlexGenLite.generate_ids\)"):
            m.generate("hello")


# ---- corrupt values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(copy_of, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    state = load_file(str(copy_of / "model.safetensors"))
    state["model.decoder.layers.1.fc2.weight"][3, 5] = bad
    save_file(state, str(copy_of / "model.safetensors"), metadata={"format": "pt"})
    offload = tmp_path / "offload"
    for weights in ((100, 0), (0, 0)):  # placed in memory, or written to disk
        policy = Policy(weight_gpu_percent=weights[0], weight_cpu_percent=weights[1], offload_dir=str(offload))
        with pytest.raises(ModelError, match="'model.decoder.layers.1.fc2.weight' holds NaN or infinite values"):
            FlexGenLite(str(copy_of), policy=policy)
        assert not offload.exists()
