"""Where weight values come from: a Hugging Face checkpoint (safetensors or bin, experts stacked or apart, MXFP4
experts dequantized), a GGUF file (dequantized one tensor at a time, or a matrix's own 4-bit groups or Q8_0 codes
kept as stored), or dummy values for a model name (benchmarks). weights.py places what they give."""

from __future__ import annotations

import math
import zlib

import torch

from ..kernels.compression import CompressionConfig, QuantizedTensor
from ..kernels.int8_weight import Int8Weight
from ..models.checkpoint import check_finite
from ..models.config import ModelError
from ..models.mxfp4 import dequantize_mxfp4
from ..models.specs import WeightSpec

STORED_GROUPS = CompressionConfig(bits=4, group_size=32, group_dim=1)  # GGUF's Q4_0 / Q4_1, as they are


ROUNDED_ROWS = 4 << 20  # values of a matrix rounded to 8 bits at once (16 MiB in fp32; ~4x that while rounded)


class WeightSource:
    """Where weight values come from: `read(spec, start, stop)` returns rows of one tensor; `groups` a matrix's
    own 4-bit groups where the source stores them as `compression` would (else None: quantized here)."""

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def groups(self, spec: WeightSpec, compression: CompressionConfig) -> QuantizedTensor | None:
        return None

    def int8(self, spec: WeightSpec, dtype: torch.dtype) -> Int8Weight:
        """The matrix in 8 bits: as the source stores it where that is Q8_0, else rounded here, ROUNDED_ROWS of
        fp32 values at a time (a 128,256 x 4096 head is 2 GB in fp32; its rounding's temporaries stay small)."""
        (n, k), out = spec.shape, Int8Weight.empty(spec.shape, dtype)
        step = max(1, ROUNDED_ROWS // k)
        for start in range(0, n, step):
            stop = min(n, start + step)
            part = Int8Weight.quantize(self.read(spec, start, stop))
            out.codes[start:stop], out.scale[start:stop] = part.codes, part.scale
        return out


class RoundedRows(WeightSource):
    """A matrix's rows as its 8-bit form holds them (in fp32, exact): what a tier other than the 8-bit store
    keeps of a weight rounded to 8 bits (weights.rounded_to_8_bits)."""

    def __init__(self, weight: Int8Weight) -> None:
        self.weight = weight

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        return self.weight.dequantize(torch.float32, (start, stop))


class CheckpointSource(WeightSource):
    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint
        self.experts: dict[tuple[str, int], torch.Tensor] = {}  # the last few experts' stored matrices (`_picked`)

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        if spec.picked is not None:
            return self._picked(spec)[start:stop]
        name, first, rows = spec.stored
        shape = self.checkpoint.shape(name)
        stack = len(shape) == len(spec.shape) + 1  # a stack of experts' matrices, read as one of all their rows
        if ((math.prod(shape[:2]), *shape[2:]) if stack else shape) != (rows, *spec.shape[1:]):
            implied = (rows, *spec.shape[1:])
            what = "" if name == spec.hf_name else f" (rows {first}:{first + spec.shape[0]} of it for {spec.name})"
            raise ModelError(f"{name} has shape {shape}, the config implies {implied}{what}")
        rows = self.checkpoint.read(name, first + start, first + stop, matrix=stack)
        if not rows.is_floating_point():  # a float weight stored as integers: corrupt, or another format's codes
            raise ModelError(f"{self.checkpoint.path}: the tensor {name!r} is stored as {rows.dtype}, not as "
                             "floating-point values: a corrupt file, or quantized codes of a format not read here "
                             "(GPTQ, AWQ, bitsandbytes); use the model's unquantized checkpoint or a GGUF file")
        return rows


    def _picked(self, spec: WeightSpec) -> torch.Tensor:
        """A weight that is some columns of one matrix of a stack stored transposed (gpt-oss's experts), as ours:
        the expert's matrix read once for its gate, up and biases (the last four kept)."""
        name, expert, first, step = spec.picked
        key = (name, expert)
        if key not in self.experts:
            while len(self.experts) >= 4:
                self.experts.pop(next(iter(self.experts)))
            self.experts[key] = self._expert(name, expert, len(spec.shape))
        part = self.experts[key][..., first::step]
        part = part.T if part.dim() == 2 else part
        if tuple(part.shape) != spec.shape:
            raise ModelError(f"{name}: {spec.name} of expert {expert}, its columns {first}::{step} transposed, has "
                             f"shape {tuple(part.shape)}; the config implies {spec.shape}")
        return part.contiguous()

    def _expert(self, name: str, expert: int, dims: int) -> torch.Tensor:
        """Matrix (or vector) `expert` of the stack `name`, as stored (in, out); from MXFP4 blocks and scales
        (name_blocks, name_scales: (experts, out, in / 32, 16) and (experts, out, in / 32)) where the checkpoint
        holds those (gpt-oss as released), dequantized exactly."""
        if not self.checkpoint.has(name) and self.checkpoint.has(f"{name}_blocks"):
            blocks, scales = (self.checkpoint.read(f"{name}_{part}", expert, expert + 1)[0]
                              for part in ("blocks", "scales"))
            try:
                return dequantize_mxfp4(blocks, scales).T
            except ValueError as e:
                raise ModelError(f"{name}: {e}; the checkpoint is corrupt or of another layout") from None
        shape = self.checkpoint.shape(name)
        if len(shape) != dims + 1 or expert >= shape[0]:
            raise ModelError(f"{name} has shape {shape}: no expert {expert} of {dims} dimensions")
        return self.checkpoint.read(name, expert, expert + 1)[0]


class GGUFSource(WeightSource):
    """Tensors of a GGUF file, dequantized one at a time as placement asks for them."""

    def __init__(self, path: str, num_layers: int | None = None) -> None:
        from ..models.gguf_weights import gguf_tensors

        self.path, self.plan = path, gguf_tensors(path)
        self.last: tuple[str, torch.Tensor] | None = None
        layers = {int(n.split(".")[2]) for n in self.plan if n.startswith("model.layers.")}
        beyond = sorted(i for i in layers if num_layers is not None and i >= num_layers)
        if beyond:
            raise ModelError(f"{path} holds tensors of layer {beyond[0]} but its metadata (block_count) gives "
                             f"{num_layers} layers: the file is corrupt or its metadata wrong")

    def _check_shape(self, spec: WeightSpec, name: str, shape: tuple[int, ...]) -> None:
        """The file's tensor holds the rows the metadata's config implies (another shape ran silently wrong, or
        failed deep in a layer)."""
        implied = tuple(spec.shape) if name == spec.hf_name else (spec.stored[2], *spec.shape[1:])
        if tuple(shape) != implied:
            raise ModelError(f"{self.path}: the tensor {name!r} has shape {tuple(shape)}, the file's metadata "
                             f"implies {implied}: the file is corrupt or its metadata wrong")

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of spec, only their blocks dequantized; a rotary q or k (its rows permuted by llama.cpp)
        dequantized whole and held until read to its end."""
        from ..models.gguf_weights import read_gguf_rows, read_gguf_tensor

        name, first = self._rows(spec)
        if name not in self.plan:
            raise ModelError(f"{self.path} lacks the tensor {name!r}")
        entry = self.plan[name]
        if entry[1] is None:
            self._check_shape(spec, name, tuple(int(d) for d in reversed(entry[0].shape.tolist())))
            return read_gguf_rows(entry, first + start, first + stop)
        if self.last is None or self.last[0] != name:
            self.last = (name, read_gguf_tensor(entry))
            self._check_shape(spec, name, self.last[1].shape)
        tensor = self.last[1]
        if first + stop >= tensor.shape[0]:
            self.last = None  # read to its end: not held after its placement (a head in fp32 is 2 GB at 8B)
        return tensor[first + start:first + stop]

    def _rows(self, spec: WeightSpec) -> tuple[str, int]:
        """The plan's tensor holding spec's rows and the first of them there: its own (a GraniteMoE expert, its
        rows of HF's stack, is a view of the file's stack of its kind), else its stored tensor's."""
        if spec.hf_name in self.plan:
            return spec.hf_name, 0
        name, first, _ = spec.stored
        return name, first

    def groups(self, spec: WeightSpec, compression: CompressionConfig) -> QuantizedTensor | None:
        """A Q4_0/Q4_1/Q4_K matrix as it is stored, when `compression` is 4-bit groups of 32 along the input
        dimension: the file's codes, scales and minima, with no second rounding (Q4_K's scales and minima to
        fp16); None for other types, which are compressed from their values. A range of a fused matrix's rows
        (Phi-3's) is that range of its groups: each row's groups are its own."""
        from ..models.gguf_weights import read_gguf_groups

        name, first = self._rows(spec)
        if compression != STORED_GROUPS or name not in self.plan:
            return None
        found = read_gguf_groups(self.plan[name])
        if found is None:
            return None
        self._check_shape(spec, name, found[0].shape)
        codes, scale, minimum = (x[first:first + spec.shape[0]] for x in found)
        pairs = codes.reshape(-1, 2)
        return QuantizedTensor(pairs[:, 0] | (pairs[:, 1] << 4), scale, minimum, tuple(codes.shape), compression)

    def int8(self, spec: WeightSpec, dtype: torch.dtype) -> Int8Weight:
        """A Q8_0 matrix as stored, bit for bit (the head and embedding of many files); others rounded here."""
        from ..models.gguf_reader import q8_0_blocks

        entry = self.plan.get(spec.hf_name)
        blocks = q8_0_blocks(entry[0]) if entry is not None and entry[1] is None else None
        if blocks is None:
            return super().int8(spec, dtype)
        self._check_shape(spec, spec.hf_name, tuple(int(n) for n in reversed(entry[0].shape)))
        entry[0].release()
        weight = Int8Weight.from_q8_0(blocks, spec.shape, dtype)
        check_finite(weight.scale.float(), f"the GGUF tensor {entry[0].name!r}")
        return weight


class DummySource(WeightSource):
    """Reproducible random weights (norm scales are ones), made row range by row range."""

    def read(self, spec: WeightSpec, start: int, stop: int) -> torch.Tensor:
        shape = (stop - start, *spec.shape[1:])
        if spec.name == "norm.weight":
            return torch.ones(shape)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{spec.hf_name}:{start}".encode()))
        return torch.empty(shape).normal_(0, 0.02, generator=gen)
