"""The peak memory of a forward (and backward) pass, found without computing it: a simulated allocator on fake
tensors.

The pass runs under :class:`torch._subclasses.fake_tensor.FakeTensorMode` (shapes, dtypes and devices only; no
memory, no arithmetic) with :class:`LiveBytes` on top, a dispatch mode that sees every tensor each aten operation
returns. It counts each new storage's bytes when it appears and takes them off when its last reference dies
(``weakref.finalize`` on the storage), so ``peak`` is the largest total of live storages at any operation's end:
what an allocator that hands memory back at once (torch on CPU) holds at its highest, and what
``torch.cuda.max_memory_allocated`` reports on a GPU up to its 512-byte rounding.

Because the autograd graph of a fake pass holds its saved tensors exactly as a real one does, the activations kept
for the backward pass, the gradients and every temporary of the backward pass (the chunked path's recomputed
weights, SDPA's log-sum-exp, a conv's input gradient) are counted as they live, for every path and under
autocast, with no model of them written by hand. What it cannot see are buffers a kernel allocates and frees
inside one operation below the dispatcher (oneDNN scratchpads, cuDNN workspaces, BLAS packing): tests measure
them within a few percent on CPU (docs/cost.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the live tensor storages created under it (and of those :meth:`track` is given).

    Attributes:
        current: bytes of the storages alive now.
        peak: the largest ``current`` seen since the start or the last :meth:`reset_peak`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for the storages alive now
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[Tensor]) -> int:
        """Counts these tensors' storages (if not counted yet), e.g. parameters made before the pass; returns
        the bytes newly counted."""
        before = self.current
        for t in tensors:
            self._track(t)
        return self.current - before

    def reset_peak(self) -> None:
        """From now on ``peak`` is the highest total from the current one."""
        self.peak = self.current

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()  # the same Python object as long as the storage lives
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
