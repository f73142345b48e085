"""A CUDA graph's semantics on a CPU, for tests of code that captures graphs (decode_graph.py, layer_graph.py).

`RecordedGraph(forward)` runs `forward` once, recording every aten op it dispatches with the tensors it touched;
`replay()` runs those ops again on the same tensors, each result written into the tensor recorded for it, and never
runs Python: a value read on the host at capture (a position, a shape from data, a branch) stays baked in, as in a
CUDA graph, and a tensor replaced between steps is not seen. Only aten ops are recorded: C kernels called through
ctypes are not, so tests run with FLEXGEN_LITE_NATIVE=0 (conftest's `without_native`)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Record(TorchDispatchMode):
    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """One call of `forward` recorded as its aten ops; replay() reruns them on the recorded tensors."""

    def __init__(self, forward) -> None:
        self.ops: list = []
        with _Record(self.ops):
            forward()

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            for recorded, now in zip(tree_flatten(out)[0], tree_flatten(result)[0], strict=True):
                if isinstance(recorded, torch.Tensor) and not _same_memory(recorded, now):
                    recorded.copy_(now)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a (a view of a) or a view of the same memory: nothing to copy."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
