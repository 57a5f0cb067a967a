"""Max-pools with exactly torch's values and gradients, on faster CPU kernels.

:class:`WindowMaxPool` is the block's subsampling, a max-pool whose kernel is its stride. On the CPU, torch's
max_pool2d/3d forward is slower than the elementwise maximum of the kernel's strided views of the map, which is a
few vectorised passes over memory. Without gradients (inference, feature extraction) it computes that maximum; when
a gradient is needed it runs torch's max-pool (on the channels-last kernel for video maps, as below), whose
backward scatters through the int64 argmax it kept, which is cheaper than finding each window's first maximum
again from the input.

:class:`MaxPool3d` is the networks' stem and temporal pools: ``nn.MaxPool3d`` on torch's channels-last kernel.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.utils import _triple
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .capture import capturing

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
        if training and _channels_last_pays(x):
            return _ChannelsLastMaxPool.apply(x, self.kernel, self.kernel, (0, 0, 0), (1, 1, 1), False)
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


# Maps with fewer elements than this stay on torch's own kernel: the two layout copies then cost about what the
# channels-last kernel saves (benchmarks/conv.py's pooling rows)
CHANNELS_LAST_POOL_MIN_ELEMENTS = 1 << 15


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` (same options, repr and results) whose CPU forward on a float32 map in the default layout
    runs torch's channels-last kernel.

    torch's max-pool kernel for the default, channel-major layout walks each window one element at a time; its
    channels-last kernel compares whole channel vectors, which on a ResNet's stem and temporal pools more than pays
    for copying the map to channels-last and the result back (benchmarks/conv.py measures both). Both kernels scan a
    window in the same order and keep the first maximum (or NaN), so the output and the argmax are the same; the
    backward scatters the gradient through that argmax with torch's kernel for the default layout. Everything else
    (other layouts, devices and dtypes, returned indices, tiny maps, tracing, compiling, dispatch modes) is
    ``nn.MaxPool3d`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.return_indices and _channels_last_pays(x):
            options = tuple(_triple(o) for o in (self.kernel_size, self.stride or self.kernel_size, self.padding))
            return _ChannelsLastMaxPool.apply(x, *options, _triple(self.dilation), self.ceil_mode)
        return super().forward(x)


def _channels_last_pays(x: Tensor) -> bool:
    """Whether max-pooling ``x`` through :class:`_ChannelsLastMaxPool` is the faster exact way: a float32 5D CPU
    map large enough, not already channels-last (torch's own kernel is then the channels-last one), and no tracer,
    compiler or dispatch mode that must see torch's max-pool. Fake tensors take it too, so that the cost model
    (models/cost.py) counts the channels-last copy the real step makes."""
    if capturing():
        return False  # first: a compiler must not trace the checks below
    return (
        ((type(x) is torch.Tensor and _get_current_dispatch_mode() is None) or isinstance(x, FakeTensor))
        and x.numel() >= CHANNELS_LAST_POOL_MIN_ELEMENTS
        and x.dim() == 5
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and (x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d))
    )


class _ChannelsLastMaxPool(torch.autograd.Function):
    """max_pool3d of a default-layout map through the channels-last kernel (see :class:`MaxPool3d`)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        out, argmax = torch.ops.aten.max_pool3d_with_indices(
            x.contiguous(memory_format=torch.channels_last_3d), kernel, stride, padding, dilation, ceil_mode
        )
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, argmax.contiguous())
            ctx.options = (kernel, stride, padding, dilation, ceil_mode)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, argmax = ctx.saved_tensors
        # differentiable in grad, so a double backward works
        grad_x = torch.ops.aten.max_pool3d_with_indices_backward(grad.contiguous(), x, *ctx.options, argmax)
        return grad_x, None, None, None, None, None
