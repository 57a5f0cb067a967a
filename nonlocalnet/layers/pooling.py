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
        out = torch.maximum(out, view)  # not out=: torch.func's batching has no rule for maximum.out
    return out


class _WindowMax(torch.autograd.Function):
    """window_max with max-pool's gradient: each window's gradient to its first maximal element (scan order), or
    where the maximum is NaN, to its last NaN, as max-pool's scan leaves it. Only x is kept (as max-pool keeps its
    input): the output is recomputed in the backward pass, so in-place ops on it stay allowed. The backward pass
    is itself differentiable (double backward, torch.func)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel: tuple[int, ...]) -> Tensor:
        return window_max(x, kernel)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, kernel = inputs
        ctx.save_for_backward(x)
        ctx.kernel = kernel

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return _window_max_backward(x, grad, ctx.kernel), None


def _window_max_backward(x: Tensor, grad: Tensor, kernel: tuple[int, ...]) -> Tensor:
    out = window_max(x.detach(), kernel)
    windows = _windows(kernel, tuple(out.shape[2:]))
    nan = out.isnan()
    nan_hits: list[Tensor] = [out] * len(windows)  # placeholders, each set below
    # max-pool's scan takes every NaN it meets: a NaN window's last NaN holds its maximum (found for every window,
    # with no data-dependent test, so that torch.func can batch it)
    for n in reversed(range(len(windows))):
        nan_hits[n] = x.detach()[windows[n]].isnan().logical_and_(nan)
        nan = nan.logical_xor(nan_hits[n])
    unclaimed = out.isnan().logical_not_()  # windows whose maximum no earlier element was
    grad_x = torch.zeros_like(x, dtype=grad.dtype)
    for n, index in enumerate(windows):
        if n == len(windows) - 1:
            hit = unclaimed  # the last element is the maximum of every window still unclaimed
        else:
            hit = torch.eq(x.detach()[index], out).logical_and_(unclaimed)
            unclaimed = unclaimed.logical_xor(hit)
        hit = hit.logical_or(nan_hits[n])
        grad_x[index] = grad * hit
    return grad_x
