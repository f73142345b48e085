"""GGUF files split into parts, as large models are published (llama.cpp's `gguf-split`, gguf's writer).

A Llama-3-70B in Q4_K_M is ~42 GB; hubs cap a file at 50 GB and tools at less, so it comes as
`<name>-00001-of-00003.gguf` ... `<name>-00003-of-00003.gguf`. Every part is a GGUF file of its own holding some of
the tensors; the first holds the model's metadata; each holds `split.no` (0-based), `split.count` and
`split.tensors.count` (the tensors of all parts). Any part's path opens the whole model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .gguf_reader import GGUFContents, GGUFTensor

PART_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def part_paths(path: str) -> list[str]:
    """Every part of the split GGUF that `path` names (first to last), or [path] for a name that is not a part's."""
    m = PART_NAME.match(os.path.basename(path))
    if m is None or int(m["count"]) < 2:
        return [path]
    count, folder = int(m["count"]), os.path.dirname(path)
    return [os.path.join(folder, f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


@dataclass
class SplitContents:
    """The parts of a split GGUF read as one file: the first part's metadata, every part's tensors in order (each
    a view of its own part's mapping, which `parts` keeps open)."""

    parts: list[GGUFContents]

    @property
    def metadata(self) -> dict:
        return self.parts[0].metadata

    @property
    def tensors(self) -> list[GGUFTensor]:
        return [t for part in self.parts for t in part.tensors]


def open_parts(path: str, read: Callable[[str], GGUFContents], error: type[Exception]
               ) -> tuple[str, GGUFContents | SplitContents]:
    """(the first part's path, the contents) of the GGUF at `path`, whole or split; `read` opens one file; what is
    missing or inconsistent raises `error` saying which part."""
    paths = part_paths(path)
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise error(f"{path} is part of a GGUF split into {len(paths)} files, and {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} missing: put every part in {os.path.dirname(path)}")
    parts = [read(p) for p in paths]
    count = int(parts[0].metadata.get("split.count", 1))
    if len(parts) == 1:
        if count > 1:
            raise error(f"{path} is one of {count} parts of a split GGUF, but its name does not say where the others "
                        "are: keep the parts' names as published (<name>-00001-of-0000N.gguf)")
        return path, parts[0]
    for i, (p, part) in enumerate(zip(paths, parts, strict=True)):
        if int(part.metadata.get("split.no", -1)) != i or int(part.metadata.get("split.count", 0)) != len(parts):
            raise error(f"{p} is not part {i + 1} of {len(parts)} of this split GGUF (its split.no "
                        f"{part.metadata.get('split.no')}, split.count {part.metadata.get('split.count')}): "
                        "re-download the parts of one model into one folder")
    whole = SplitContents(parts)
    expected = int(parts[0].metadata.get("split.tensors.count", len(whole.tensors)))
    if len(whole.tensors) != expected:
        raise error(f"the {len(parts)} parts of {paths[0]} hold {len(whole.tensors)} tensors, their metadata says "
                    f"{expected}: re-download the parts")
    return paths[0], whole
