"""Reading weights from a local Hugging Face checkpoint, tensor by tensor.

safetensors files are read with pread into fresh tensors rather than memory-mapped: mapped pages
count in the process's resident memory until unmapped, which doubled peak RSS while loading."""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from pathlib import Path

import torch

from .config import ModelError


class Checkpoint:
    """Maps tensor names to their file in a directory of `*.safetensors` or `pytorch_model*.bin` files.

    Reads return one row range of one tensor, so loading never holds the model twice in RAM.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files: dict[str, object] = {}  # tensor name -> SafetensorsFile or mmapped state dict
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            self._open_safetensors(files)
        else:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise ModelError(f"{self.path} holds no *.safetensors or pytorch_model*.bin weights")
            for file in bins:
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise ModelError(f"{file} is not a readable PyTorch checkpoint ({e}); re-download it") from None
                self.files.update(dict.fromkeys(state, state))
        self._check_index()

    def _open_safetensors(self, files: list[Path]) -> None:
        for file in files:
            handle = SafetensorsFile(file)
            self.files.update(dict.fromkeys(handle.entries, handle))

    def _check_index(self) -> None:
        for index in self.path.glob("*.index.json"):
            expected = weight_map(index)
            missing = sorted({f for n, f in expected.items() if n not in self.files})
            if missing:
                raise ModelError(f"{self.path} lacks the shard(s) {', '.join(missing)} named in {index.name}")

    def resolve(self, name: str) -> str:
        """The stored name of `name` (older OPT checkpoints omit the 'model.' prefix; a multimodal checkpoint
        keeps its text model under language_model)."""
        bare = name.removeprefix("model.")
        for candidate in (name, bare, "model." + name, "model.language_model." + bare, "language_model.model." + bare):
            if candidate in self.files:
                return candidate
        raise ModelError(f"{self.path} lacks the tensor {name!r}; is the checkpoint complete and of this architecture?")

    def has(self, name: str) -> bool:
        try:
            self.resolve(name)
        except ModelError:
            return False
        return True

    def read(self, name: str, start: int, stop: int, matrix: bool = False) -> torch.Tensor:
        """Rows start:stop of a tensor, in its stored dtype (refused if not all finite); matrix: of a stack of
        matrices (experts, rows, cols) as one matrix of all their rows (GraniteMoE's experts)."""
        stored = self.resolve(name)
        source = self.files[stored]
        if isinstance(source, SafetensorsFile):
            rows = source.read(stored, start, stop, matrix)
        else:
            whole = source[stored]
            rows = (whole.reshape(-1, whole.shape[-1]) if matrix else whole)[start:stop]
        check_finite(rows, f"{self.path}: the tensor {stored!r}")
        return rows

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.resolve(name)
        source = self.files[stored]
        if isinstance(source, SafetensorsFile):
            return source.entries[stored][1]
        return tuple(source[stored].shape)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite weights (a corrupt file): they would yield token 0 forever, without an error.
    Checked 16M values at a time by their minimum and maximum (NaN propagates into both, an infinity is one
    of them): no temporaries, ~10x faster than isfinite(...).all()."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for begin in range(0, flat.numel(), 1 << 24):
        low, high = torch.aminmax(flat[begin:begin + (1 << 24)])
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ModelError(f"{what} holds NaN or infinite values; the file is corrupt: re-download or "
                             "re-convert it")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index: tensor name -> shard file."""
    try:
        names = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        names = None
    if not isinstance(names, dict) or not all(isinstance(f, str) for f in names.values()):
        raise ModelError(f"{index} is not a valid checkpoint index (a weight_map of tensor names to files); "
                         "re-download it")
    return names


def stores_tensor(path: Path, name: str) -> bool:
    """Whether a checkpoint directory holds a tensor of this name, from its index or its safetensors headers
    (without opening the weights; False for pytorch_model*.bin checkpoints)."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return name in weight_map(indexes[0])
    return any(name in SafetensorsFile(f).entries for f in sorted(path.glob("*.safetensors")))


class SafetensorsFile:
    """A .safetensors file: an 8-byte header length, a JSON header, then each tensor's bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(os.pread(self.fd, n, 8))
            self.entries = {}  # name -> (dtype, shape, absolute offset)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"])
                begin, end = e["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                    raise ValueError(f"tensor {name!r} lies outside the file or has the wrong size")
                self.entries[name] = (dtype, shape, 8 + n + begin)
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{path} is not a readable safetensors file ({e}); re-download it") from None

    def read(self, name: str, start: int, stop: int, matrix: bool = False) -> torch.Tensor:
        """Rows start:stop (of the matrix of all rows of a stack of matrices, with `matrix`)."""
        dtype, shape, offset = self.entries[name]
        if matrix and len(shape) > 2:
            shape = (math.prod(shape[:-1]), shape[-1])
        stop = min(stop, shape[0]) if shape else stop
        out = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        done, begin = 0, offset + start * row_bytes
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], begin + done)
            if n == 0:
                raise ModelError(f"{self.path} ended while reading {name!r}; the file is truncated, re-download it")
            done += n
        return out
