"""What made an --output file: the model's identity, the settings that change results, and the numeric
choices of the first run (dtype, compression, batch shape). Kept as a line of the file itself, so a resume
with another model or other settings is refused by name, and a resumed job keeps its first run's numerics.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .batch_io import InputError

META_KEY = "flexgen_lite_run"  # the field of a line that describes the run (result lines have "index")
HEAD_BYTES = 1 << 20  # a GGUF file's fingerprint: its size and a hash of its first MiB
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

# numeric policy choices: (record key, args attribute, flag); None in args means "not given"
NUMERIC = (("dtype", "dtype", "--dtype"), ("compress_weight", "compress_weight", "--compress-weight"),
           ("compress_cache", "compress_cache", "--compress-cache"),
           ("cpu_cache_compute", "cpu_cache_compute", "--cpu-cache-compute"),
           ("cpu_attention_percent", "cpu_attention_percent", "--cpu-attention-percent"),
           ("weight_group_dim", "weight_group_dim", "--weight-group-dim"),
           ("weight_group_size", "weight_group_size", "--weight-group-size"),
           ("attn_sparsity", "attn_sparsity", "--attn-sparsity"))
GROUPING = ("weight_group_dim", "weight_group_size")  # of compressed weights only: compared where they were
DEFAULT_GROUP_SIZE = 64  # Policy.weight_group_size 0
# what a policy is without its flags: not worth a word in the note of what a resume kept
UNSAID = {"compress_weight": False, "compress_cache": False, "cpu_cache_compute": False,
          "cpu_attention_percent": 100.0, "weight_group_dim": 1, "weight_group_size": DEFAULT_GROUP_SIZE,
          "attn_sparsity": 1.0}
BATCH = (("gpu_batch_size", "gpu_batch_size"), ("num_gpu_batches", "num_gpu_batches"))


def model_identity(model: str) -> dict:
    """The model's path and a cheap fingerprint: a directory's config.json and its weight and tokenizer files'
    names and sizes; a file's size and first MiB; a preset name (dummy weights) itself."""
    path = Path(model)
    h = hashlib.sha256()
    if path.is_dir():
        config = path / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for f in sorted(path.iterdir()):
            if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.startswith("tokenizer")):
                h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    elif path.is_file():
        h.update(str(path.stat().st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(HEAD_BYTES))
    else:
        h.update(model.encode())
        return {"name": model, "fingerprint": h.hexdigest()[:16]}
    return {"path": os.path.abspath(model), "fingerprint": h.hexdigest()[:16]}


def policy_record(policy, dtype: str) -> dict:
    """The numeric choices of the engine's policy (dtype resolved), and its flags for the record."""
    record = {key: getattr(policy, key) for key, _, _ in NUMERIC[1:]}
    record["weight_group_size"] = policy.weight_group_size or DEFAULT_GROUP_SIZE
    record.update({key: getattr(policy, key) for key, _ in BATCH})
    return {"dtype": dtype, **record, "flags": policy.flags()}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_and_adopt(recorded: dict | None, model: dict, settings: dict, flags: dict[str, str], args, where: str,
                    force: bool) -> list[str]:
    """Refuse (InputError naming the first difference) a resume whose model, settings or numeric policy flags
    differ from the file's record; then fill the policy flags not given from the record, so the resumed job
    computes as its first run did. `flags`: each setting's command-line name. Returns notes for stderr."""
    if not recorded:
        return []
    diffs = []
    old_model = recorded.get("model", {})
    if old_model.get("fingerprint") != model["fingerprint"]:
        was = old_model.get("path") or old_model.get("name")
        diffs.append(f"another model (it was made with {was}, this run uses "
                     f"{model.get('path') or model.get('name')})")
    old_settings = recorded.get("settings", {})
    for key in sorted(set(settings) | set(old_settings)):
        if settings.get(key) != old_settings.get(key):
            diffs.append(f"{flags.get(key, key)} {_show(old_settings.get(key))}, not {_show(settings.get(key))}")
    policy = dict(recorded.get("policy") or {})
    if not policy.get("compress_weight"):  # its grouping meant nothing
        for key in GROUPING:
            policy.pop(key, None)
    if policy.get("weight_group_size") is not None and not getattr(args, "weight_group_size", None):
        args.weight_group_size = None  # 0: the default, which the record resolves
    for key, attr, flag in NUMERIC:
        given = getattr(args, attr, None)
        if key in policy and given is not None and given != policy[key]:
            diffs.append(f"{flag} {_show(policy[key])}, not {_show(given)}")
    if diffs and not force:
        more = f" (and {len(diffs) - 1} more difference{'s' * (len(diffs) > 2)})" if len(diffs) > 1 else ""
        raise InputError(f"{where} was made with {diffs[0]}{more}: rerun with the same model and settings, choose "
                         "another output file, or pass --force-resume to append anyway")
    if diffs:
        return [f"--force-resume: appending to {where} although it was made with " + "; ".join(diffs)]
    kept = []
    for key, attr, flag in [*NUMERIC, *((key, attr, "--" + key.replace("_", "-")) for key, attr in BATCH)]:
        if key in policy and getattr(args, attr, None) is None:
            setattr(args, attr, policy[key])
            if key == "dtype":
                args.dtype_kept = True  # the "dtype:" line says where it came from
            if UNSAID.get(key, object()) != policy[key]:
                kept.append(_flag(flag, policy[key]))
    return [f"keeping the first run's numerics: {' '.join(kept)}"] if kept else []


def _flag(flag: str, value) -> str:
    """A kept setting as its flag: "--compress-weight", "--no-compress-weight", "--dtype bfloat16"."""
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {_show(value)}"


def _show(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, str) and len(value) > 60:  # an instruction: its start says which
        return json.dumps(value[:57] + "...")
    return f"{value:g}" if isinstance(value, float) else str(value)
