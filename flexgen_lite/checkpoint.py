"""Reading weights from a local Hugging Face checkpoint, tensor by tensor, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelError


class Checkpoint:
    """Maps tensor names to their file in a directory of `*.safetensors` or `pytorch_model*.bin` files.

    Reads return one row range of one tensor, so loading never holds the model twice in RAM.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files: dict[str, object] = {}  # tensor name -> open safetensors handle or mmapped state dict
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
        from safetensors import safe_open

        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
                names = list(handle.keys())
            except Exception as e:
                raise ModelError(f"{file} is not a readable safetensors file ({e}); re-download it") from None
            self.files.update(dict.fromkeys(names, handle))

    def _check_index(self) -> None:
        for index in self.path.glob("*.index.json"):
            try:
                expected = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ModelError(f"{index} is not a valid checkpoint index; re-download it") from None
            missing = sorted({f for n, f in expected.items() if n not in self.files})
            if missing:
                raise ModelError(f"{self.path} lacks the shard(s) {', '.join(missing)} named in {index.name}")

    def resolve(self, name: str) -> str:
        """The stored name of `name` (older OPT checkpoints omit the 'model.' prefix)."""
        for candidate in (name, name.removeprefix("model."), "model." + name):
            if candidate in self.files:
                return candidate
        raise ModelError(f"{self.path} lacks the tensor {name!r}; is the checkpoint complete and of this architecture?")

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor, in its stored dtype."""
        stored = self.resolve(name)
        source = self.files[stored]
        try:
            if isinstance(source, dict):
                return source[stored][start:stop]
            return source.get_slice(stored)[start:stop]
        except Exception as e:
            raise ModelError(f"cannot read {stored!r} from {self.path} ({e}); the file may be corrupt") from None

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self.resolve(name)
        source = self.files[stored]
        if isinstance(source, dict):
            return tuple(source[stored].shape)
        return tuple(source.get_slice(stored).get_shape())
