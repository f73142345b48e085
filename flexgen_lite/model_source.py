"""What a model's files hold, and what that means for a policy: opening a checkpoint directory, GGUF file or
preset name (config, weight source, tokenizer); the quantization a GGUF stores; a Q4_0/Q4_1/Q4_K file's groups
kept as stored when weights are compressed (`for_model`), and the line that says what a run compresses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .engine.policy import Policy
from .engine.weight_sources import STORED_GROUPS, CheckpointSource, DummySource, GGUFSource, WeightSource
from .models.checkpoint import Checkpoint
from .models.config import ModelConfig, ModelError
from .models.hf_config import config_from_dict, load_config
from .models.presets import find_preset, preset_config, preset_names
from .planning.policy_search import AutoPolicy, for_source


def open_model(model: str) -> tuple[ModelConfig, WeightSource, object]:
    """(config, weight source, tokenizer or None) for a checkpoint directory, a GGUF file, a preset name or a
    config.json file (the last two with dummy weights: a model's shape, for benchmarks)."""
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        return config_from_json(path), DummySource(), None
    if path.suffix == ".gguf":
        from .models.gguf_tokenizer import gguf_tokenizer

        config = gguf_model_config(path)
        return config, GGUFSource(str(path), config.num_layers), _opened_tokenizer(path, gguf_tokenizer)
    if path.is_dir():
        config = load_config(path)
        return config, CheckpointSource(Checkpoint(path)), _opened_tokenizer(path, load_tokenizer)
    if find_preset(model) is None:
        what = "is a file, not a checkpoint directory or" if path.exists() else \
            "is neither an existing checkpoint directory nor"
        raise ModelError(f"{model} {what} a known model name: pass a local Hugging Face checkpoint directory, "
                         f"a .gguf file, a config .json (dummy weights) or one of {', '.join(preset_names())} "
                         "(dummy weights)")
    return preset_config(model), DummySource(), None


def source_quantization(model: str) -> list[str]:
    """The quantized types a GGUF file stores its weights in ([] for float sources)."""
    if Path(model).suffix != ".gguf":
        return []
    from .models.gguf_weights import quantized_types

    return quantized_types(model)


def ends_notice(model: str) -> str:
    """What --compress-weight on a CPU does to the embedding and head (weights.in_8_bits): kept where a GGUF
    stores them as Q8_0, else rounded to 8 bits."""
    types = set()
    if Path(model).suffix == ".gguf":
        from .models.gguf_weights import gguf_tensors

        types = {t.tensor_type.name for name, (t, *_) in gguf_tensors(model).items()
                 if name in ("model.embed_tokens.weight", "lm_head.weight")}
    if types == {"Q8_0"}:
        return "the embedding and head kept in 8 bits as the file stores them (Q8_0)"
    return "the embedding and head rounded to 8 bits (groups of 32, about 0.2% of each group's largest)"


def stored_groups(model: str) -> bool:
    """Whether the model is a GGUF whose decoder matrices are all Q4_0/Q4_1: 4-bit groups of 32 that compressed
    weights keep as they are (weight_sources.STORED_GROUPS)."""
    if Path(model).suffix != ".gguf":
        return False
    from .models.gguf_weights import decoder_groups_of_32

    return decoder_groups_of_32(model)


def for_model(policy: Policy | AutoPolicy, model: str) -> Policy | AutoPolicy:
    """The policy with the model's source in mind: a GGUF's compressed weights keep its own Q4_0/Q4_1/Q4_K groups
    of 32 (weight_group_size 32 where it was left 0 and groups run along the input dimension); a search weighs
    them as lossless where all decoder matrices are Q4_0/Q4_1 (policy_search.for_source)."""
    groups, keeps = stored_groups(model), bool(group_types(model)[0])
    if isinstance(policy, AutoPolicy):
        return for_source(policy, source_quantization(model), groups, keeps)
    if keeps and policy.compress_weight and policy.weight_group_dim == 1 and policy.weight_group_size == 0:
        return dataclasses.replace(policy, weight_group_size=32)
    return policy


def group_types(model: str) -> tuple[list[str], list[str]]:
    """A GGUF's decoder matrix types whose own 4-bit groups of 32 compressed weights keep, and the others (rounded
    to 4 bits when compressed); ([], []) for other sources."""
    if Path(model).suffix != ".gguf":
        return [], []
    from .models.gguf_weights import kept_and_rounded

    return kept_and_rounded(model)


def kept_groups_hint(config: ModelConfig, workload, hardware, budgets, auto: AutoPolicy, found, model: str,
                     asked: bool | None) -> str | None:
    """For a GGUF whose search for_model kept from compressing its weights again (a second rounding; `asked`:
    the user's compress_weight, None when left to the search) though some of its matrices are 4-bit groups that
    compressed weights keep as stored (Q4_K in a Q4_K_M file): one line saying what --compress-weight would
    predict, when that is COMPRESSION_GAIN faster (the weights would otherwise spill to disk, or be read at 16
    bits each step)."""
    from .planning.policy_search import COMPRESSION_GAIN, PolicyError, search_policy

    kept, rounded = group_types(model)
    if asked is not None or auto.compress_weight is not False or not kept:
        return None
    base = auto.base
    if base.weight_group_dim == 1 and base.weight_group_size == 0:  # the file's groups of 32, as for_model does
        base = dataclasses.replace(base, weight_group_size=32)
    try:
        trial = search_policy(config, workload, hardware, budgets,
                              dataclasses.replace(auto, base=base, compress_weight=True))
    except PolicyError:
        return None
    faster, now = trial.prediction.throughput, found.prediction.throughput
    if faster < COMPRESSION_GAIN * now:
        return None
    others = f", its {'/'.join(rounded)} ones rounded to 4 bits (lossy)" if rounded else ""
    return (f"note: --compress-weight would keep the file's {'/'.join(kept)} weights in 4 bits as it stores them"
            f"{others}: predicted {faster:.1f} tok/s against {now:.1f}")


def kept_as_stored(policy: Policy, model: str) -> bool:
    """Whether the policy's compressed weights are the model file's own 4-bit groups (no second rounding)."""
    return policy.compress_weight and policy.weight_compression() == STORED_GROUPS and stored_groups(model)


def kept_groups(policy: Policy, model: str) -> tuple[list[str], list[str]]:
    """group_types(model) when the policy compresses weights into groups of 32 along the input dimension (the
    file's own are kept); ([], []) otherwise."""
    if not (policy.compress_weight and policy.weight_compression() == STORED_GROUPS):
        return [], []
    return group_types(model)


def compression_notice(policy: Policy, searched: bool | tuple[str, ...], source_quantized: list[str],
                       kept: bool = False, partly: tuple[list[str], list[str]] = ([], [])) -> str | None:
    """One plain line when a run compresses weights or the KV cache to 4 bits: who chose it, and whether it is
    lossy (`kept`: the weights are a Q4_0/Q4_1 file's own groups, kept_as_stored; `partly`: the types of a file's
    matrices kept as its groups, and of those rounded, kept_groups). searched: the search chose every
    compression (True), none (False), or those named ("weights", "KV cache")."""
    why = _who_chose(policy, searched)
    kept = kept and policy.compress_weight
    if policy.compress_weight and not kept and partly[0]:
        return _partly_kept_notice(policy, *partly, why)
    lossy = [name for name, on in (("weights", policy.compress_weight and not kept),
                                   ("KV cache", policy.compress_cache)) if on]
    if not lossy and not kept:
        return None
    said = (f"weights kept in 4 bits as the file stores them ({source_quantized[0]}, groups of 32), with no "
            "second rounding" if kept else "")
    if lossy:
        again = (f"; the weights are already {source_quantized[0]} in the file and are rounded a second time"
                 if "weights" in lossy and source_quantized else "")
        said += ("; " if said else "") + (f"{' and '.join(lossy)} compressed to 4 bits, which is lossy (outputs "
                                          f"differ from the uncompressed model's){again}")
    return f"note: {said}, {why}"


def _who_chose(policy: Policy, searched: bool | tuple[str, ...]) -> str:
    on = [name for name, c in (("weights", policy.compress_weight), ("KV cache", policy.compress_cache)) if c]
    chosen = on if searched is True else [] if searched is False else [n for n in on if n in searched]
    if not chosen:
        return "as asked"
    if len(chosen) == len(on):
        return "chosen by --policy auto: --no-compress-weight / --no-compress-cache forbid it"
    flag = "--no-compress-weight" if chosen == ["weights"] else "--no-compress-cache"
    asked = next(n for n in on if n not in chosen)
    return f"the {asked} as asked, the {chosen[0]} chosen by --policy auto ({flag} forbids it)"


def _partly_kept_notice(policy: Policy, kept: list[str], rounded: list[str], why: str) -> str:
    said = (f"the file's {'/'.join(kept)} weights kept in 4 bits as it stores them (groups of 32"
            + (", scales and minima rounded to fp16" if "Q4_K" in kept else "") + ")")
    lossy = ([f"its {'/'.join(rounded)} weights"] if rounded else []) + (["KV cache"] if policy.compress_cache else [])
    if lossy:
        said += f"; {' and '.join(lossy)} compressed to 4 bits, which is lossy (outputs differ from the file's model)"
    return f"note: {said}, {why}"


def model_config(model: str) -> ModelConfig:
    """The config of a checkpoint directory, GGUF file or preset name, without opening its weights."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return gguf_model_config(path)
    return load_config(path) if path.is_dir() else open_model(model)[0]


def gguf_model_config(path: Path) -> ModelConfig:
    """A GGUF file's config, with whether its rotary q and k rows are permuted (GGUFSource reads those whole)."""
    from .models.gguf_file import read_gguf_config
    from .models.gguf_weights import PERMUTED

    raw = read_gguf_config(path)
    permuted = raw["model_type"] in PERMUTED
    return dataclasses.replace(config_from_dict(raw, name=str(path)), rotary_rows_permuted=permuted)


def config_from_json(path: Path) -> ModelConfig:
    """A Hugging Face config.json read as a model's shape (dummy weights)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read it as a config.json ({e}); pass a Hugging Face config file") from e
    return config_from_dict(raw, name=str(path))


_tokenizers: dict[tuple, object] = {}  # by path and its files' sizes and times: a job opens its model twice


def _opened_tokenizer(path: Path, load):
    """load(path), once per process while the files it reads are unchanged (a tokenizer is only read: the CLI
    checks the prompts with it, then FlexGenLite opens the model again; a load takes ~0.25 s)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if "token" in p.name or p.suffix == ".json")
    stamp = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    key = (str(path.resolve()), stamp)
    if key not in _tokenizers:
        _tokenizers[key] = load(path)
    return _tokenizers[key]


def load_tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a damaged file: the libraries' own error types, or Python's from their parsers
        libraries = ("transformers", "tokenizers", "huggingface_hub", "json", "builtins")
        if type(e).__module__.split(".")[0] not in libraries or isinstance(e, MemoryError):
            raise
        why = " ".join(str(e).split())  # one line (transformers' messages run over several)
        why = why if len(why) <= 300 else why[:300].rsplit(" ", 1)[0] + " ..."  # cut between words
        raise ModelError(f"{path}: its tokenizer cannot be loaded ({type(e).__name__}: {why}); re-download its "
                         "tokenizer files (tokenizer.json, tokenizer_config.json)") from None
