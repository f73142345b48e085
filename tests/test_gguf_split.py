"""A GGUF split into parts (models/gguf_split.py), as large models are published: any part's path opens the
whole model, with the tensors gguf's own reader finds in the parts and the outputs of the same model in one file;
a missing, renamed or foreign part is refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from flexgen_lite import FlexGenLite, Policy, SamplingConfig
from flexgen_lite.models.gguf_file import GGUFError, read_gguf_config
from flexgen_lite.models.gguf_weights import gguf_tensors, iter_gguf_tensors

from .test_gguf_quants import MIXES, PROMPTS, write_mixed_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("split")
    write_mixed_llama(folder / "whole.gguf", MIXES["Q4_K_M"])
    write_mixed_llama(folder / "tiny.gguf", MIXES["Q4_K_M"], split_max_tensors=8)
    parts = sorted(folder.glob("tiny-*-of-*.gguf"))
    return folder / "whole.gguf", parts


def test_any_part_opens_the_whole_model(files):
    whole, parts = files
    assert len(parts) >= 3 and parts[0].name == f"tiny-00001-of-{len(parts):05d}.gguf"
    theirs = {t.name: np.array(t.data) for part in parts for t in gguf.GGUFReader(str(part)).tensors}
    want = dict(iter_gguf_tensors(whole))
    for path in (parts[0], parts[-1]):
        assert read_gguf_config(path) == read_gguf_config(whole)
        found = {t.name: np.array(t.data) for t, *_ in gguf_tensors(path).values()}
        assert found.keys() == theirs.keys() and all(np.array_equal(found[n], theirs[n]) for n in theirs)
        got = dict(iter_gguf_tensors(path))
        assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    sampling = SamplingConfig(max_new_tokens=6, stop_at_eos=False)
    policy = Policy(gpu_batch_size=3, num_gpu_batches=1, dtype="float32")
    runs = []
    for path in (whole, parts[1]):
        with FlexGenLite(str(path), policy=policy) as m:
            runs.append(m.generate_ids(PROMPTS, sampling, return_logits=True))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_a_missing_part_is_named(files, tmp_path):
    _, parts = files
    for part in parts[:-1]:
        shutil.copy(part, tmp_path / part.name)
    with pytest.raises(GGUFError, match=f"split into {len(parts)} files, and {parts[-1].name} is missing"):
        read_gguf_config(tmp_path / parts[0].name)


def test_a_renamed_part_is_refused(files, tmp_path):
    _, parts = files
    shutil.copy(parts[0], tmp_path / "renamed.gguf")
    with pytest.raises(GGUFError, match=f"one of {len(parts)} parts of a split GGUF.*<name>-00001-of-0000N"):
        read_gguf_config(tmp_path / "renamed.gguf")


def test_a_part_of_another_split_is_refused(files, tmp_path):
    _, parts = files
    count = len(parts)
    for i, part in enumerate(parts):
        shutil.copy(parts[0] if i == 1 else part, tmp_path / part.name)  # the first part twice
    with pytest.raises(GGUFError, match=f"tiny-00002-of-{count:05d}.gguf is not part 2 of {count}"):
        read_gguf_config(tmp_path / parts[0].name)
