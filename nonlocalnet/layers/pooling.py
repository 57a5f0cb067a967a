"""The block's subsampling: a max-pool whose kernel is its stride, with exactly max-pool's values and gradients.

On the CPU, torch's max_pool2d/3d forward is slower than the elementwise maximum of the kernel's strided views of
the map, which is a few vectorised passes over memory. Without gradients (inference, feature extraction)
:class:`WindowMaxPool` computes that maximum; when a gradient is needed it runs torch's max-pool, whose backward
scatters through the int64 argmax it kept, which is cheaper than finding each window's first maximum again from
the input.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class WindowMaxPool(nn.Module):
    """``nn.MaxPool{1,2,3}d(kernel, stride=kernel)`` (no padding; a remainder is dropped, as max-pool drops it).

    Args:
        kernel: the window (= stride) per spatial axis.
    """

    def __init__(self, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel = tuple(int(k) for k in kernel)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != len(self.kernel) + 2:
            raise ValueError(
                f"expected a (B, C, *spatial) map with {len(self.kernel)} spatial axes, got shape {tuple(x.shape)}"
            )
        training = x.requires_grad and torch.is_grad_enabled()
        if (
            training
            or x.device.type != "cpu"
            or x.dtype.is_complex
            or torch.jit.is_scripting()
            or torch.jit.is_tracing()
        ):
            return _MAX_POOL[len(self.kernel)](x, self.kernel, self.kernel)  # torch's kernels (and its backward)
        return window_max(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


def _windows(kernel: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple]:
    """Index tuples of the kernel's strided views of a map, in max-pool's scan order (last axis fastest)."""
    return [
        (..., *(slice(o, o + s * k, k) for o, s, k in zip(offset, sizes, kernel)))
        for offset in itertools.product(*(range(k) for k in kernel))
    ]


def _pooled_sizes(x: Tensor, kernel: tuple[int, ...]) -> tuple[int, ...]:
    sizes = tuple(s // k for s, k in zip(x.shape[2:], kernel))
    if not all(sizes):
        raise ValueError(f"subsample kernel {kernel} is larger than the map's spatial size {tuple(x.shape[2:])}")
    return sizes


def window_max(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
    """max over each kernel window (kernel = stride): the maximum of the kernel's strided views, contiguous."""
    views = [x[index] for index in _windows(kernel, _pooled_sizes(x, kernel))]
    if len(views) == 1:
        return views[0].contiguous()
    out = torch.maximum(views[0], views[1])
    for view in views[2:]:
        out = torch.maximum(out, view)  # not out=: torch.func's batching has no rule for maximum.out
    return out
