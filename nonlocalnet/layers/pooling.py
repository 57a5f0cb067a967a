"""The block's subsampling: a max-pool whose kernel is its stride, with exactly max-pool's values and gradients.

On the CPU, torch's max_pool2d/3d take about six times longer forward than the elementwise maximum of the
kernel's k strided views of the map, and keep an int64 argmax of the output's size (twice the output's bytes)
for the backward pass. :class:`WindowMaxPool` computes the maximum of the views, and its backward pass finds
each window's first maximum again from the input and the output (which the block keeps anyway): the gradient
goes to the first maximal element in scan order, as max-pool's does, ties included (zeros after a ReLU).
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
            raise ValueError(f"expected a (B, C, *spatial) map with {len(self.kernel)} spatial axes, got shape "
                             f"{tuple(x.shape)}")
        if x.device.type != "cpu" or torch.jit.is_scripting() or torch.jit.is_tracing() or x.dtype.is_complex:
            return _MAX_POOL[len(self.kernel)](x, self.kernel, self.kernel)  # the library kernels there
        if x.requires_grad and torch.is_grad_enabled():
            return _WindowMax.apply(x, self.kernel)
        return window_max(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


def _windows(kernel: tuple[int, ...], sizes: tuple[int, ...]) -> list[tuple]:
    """Index tuples of the kernel's strided views of a map, in max-pool's scan order (last axis fastest)."""
    return [(..., *(slice(o, o + s * k, k) for o, s, k in zip(offset, sizes, kernel)))
            for offset in itertools.product(*(range(k) for k in kernel))]


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
        torch.maximum(out, view, out=out)
    return out


class _WindowMax(torch.autograd.Function):
    """window_max with max-pool's gradient: each window's gradient to its first maximal element (scan order)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: tuple[int, ...]) -> Tensor:
        out = window_max(x, kernel)
        ctx.save_for_backward(x, out)
        ctx.kernel = kernel
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out = ctx.saved_tensors
        kernel = ctx.kernel
        windows = _windows(kernel, tuple(out.shape[2:]))
        dropped = any(s % k for s, k in zip(x.shape[2:], kernel))  # the remainder max-pool ignores: zero gradient
        grad_x = torch.zeros_like(x) if dropped else torch.empty_like(x)
        unclaimed = torch.ones_like(out, dtype=torch.bool)  # windows whose maximum no earlier element was
        hit = torch.empty_like(unclaimed)
        for n, index in enumerate(windows):
            if n == len(windows) - 1:
                hit = unclaimed  # the last element is the maximum of every window still unclaimed
            else:
                torch.eq(x[index], out, out=hit).logical_and_(unclaimed)
                unclaimed.logical_xor_(hit)
            torch.mul(grad, hit, out=grad_x[index])
        return grad_x, None
