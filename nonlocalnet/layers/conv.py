"""Convolutions that run on oneDNN on the CPU where torch's own dispatch would pick its reference kernels.

torch sends an unstrided float32 convolution whose kernel is 1 x 1 in its last two axes (the 1x1x1 projections
of a bottleneck and of a non-local block, the k x 1 x 1 temporal convolutions of I3D) to its reference
("slow_conv3d") kernels when it runs on one thread with a batch below 16, and oneDNN's kernels otherwise. On one
thread those reference kernels make a whole NL I3D R50 slower to train and to run than oneDNN's
(docs/performance.md has the measurements and their commands). These modules compute the same
convolution through oneDNN in that case and leave every other case to torch: other dtypes and devices, autocast
(which casts a convolution's inputs only when the call goes through ``conv3d``), tracing, compiling and
dispatch modes such as FLOP counters and fake tensors (which know ``convolution``, not ``mkldnn_convolution``),
and calls too small for oneDNN's set-up cost to pay
(below :data:`ONEDNN_MIN_ELEMENTS` input elements or :data:`ONEDNN_MIN_MACS` multiply-adds).

Autograd's formula for oneDNN's convolution chooses its backward kernels afresh, and would pick the same
reference kernels; of the convolutions torch would have sent there, those whose kernel spans the first spatial
axis (k x 1 x 1, k > 1) get their own backward on oneDNN and BLAS (:class:`_LeadingKernelConvolution`); for
pointwise kernels torch's backward measured as fast.

They are ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` subclasses with the same parameters and state dict, so
loaders, converters and ``isinstance`` checks see a plain convolution.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .capture import capturing

# Calls below either size stay on torch's dispatch: oneDNN's per-call set-up (a primitive and reorders) costs more
# than the reference kernel saves on a tiny map or a convolution of few multiply-adds (benchmarks/conv.py measures
# both sides at the networks' shapes; docs/performance.md has the table).
ONEDNN_MIN_ELEMENTS = 1 << 15
ONEDNN_MIN_MACS = 1 << 22  # (input elements) x (output channels) x (kernel volume): the work before striding
# A pointwise (1x1x1) convolution is one matrix product per sample; below this many positions per sample (T x H x
# W) torch's product beats oneDNN's, whose set-up then dominates (the res4 and res5 maps of an 8-frame 112x112 clip)
ONEDNN_MIN_POINTWISE_POSITIONS = 1 << 7
# The backward of a k x 1 x 1 (k > 1) convolution runs on oneDNN and BLAS (_LeadingKernelConvolution) from this many
# input positions per sample; below it, and for pointwise kernels at any size, torch's own backward is as fast
LEADING_KERNEL_MIN_POSITIONS = 1 << 7

_enabled = True


@contextlib.contextmanager
def torch_conv_dispatch() -> Iterator[None]:
    """Within this context every convolution of these modules goes through torch's own dispatch (what a plain
    ``nn.Conv3d`` runs): for comparing the two, and as an escape hatch."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def uses_onednn(x: Tensor, weight: Tensor, padding_mode: str = "zeros", padding: object = (0,)) -> bool:
    """Whether :class:`Conv3d` (1d, 2d) computes this call through oneDNN (see the module's docstring)."""
    return (
        _enabled
        and type(x) is torch.Tensor  # not a fake or other subclass tensor
        and x.numel() >= ONEDNN_MIN_ELEMENTS  # first of the rest: the cheapest check, and most tiny calls fail it
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and padding_mode == "zeros"
        and not isinstance(padding, str)  # "same" / "valid": torch resolves those itself
        and x.dim() == weight.dim()  # batched input: oneDNN has no unbatched form
        and x.numel() * weight.shape[0] * math.prod(weight.shape[2:]) >= ONEDNN_MIN_MACS
        and (math.prod(weight.shape[2:]) > 1 or math.prod(x.shape[2:]) >= ONEDNN_MIN_POINTWISE_POSITIONS)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not capturing()
        and _get_current_dispatch_mode() is None  # FLOP counters and fake modes know torch's convolution
    )


def _leading_kernel(weight: Tensor, padding: tuple[int, ...], stride: tuple[int, ...], dilation, groups) -> bool:
    """Whether the convolution is one :class:`_LeadingKernelConvolution` differentiates: unstrided, undilated,
    ungrouped, a kernel longer than 1 along the first spatial axis and 1 (unpadded) along every other, and a padding
    below the kernel in the first. torch's dispatch sends these to its reference kernels, whose backward for them is
    slow (benchmarks/conv.py)."""
    kernel = weight.shape[2:]
    return (
        kernel[0] > 1
        and groups == 1
        and all(s == 1 for s in stride)
        and all(d == 1 for d in dilation)
        and all(k == 1 for k in kernel[1:])
        and all(p == 0 for p in padding[1:])
        and padding[0] < kernel[0]
    )


class _LeadingKernelConvolution(torch.autograd.Function):
    """oneDNN's forward of a convolution whose kernel spans the first spatial axis only (k x 1 x 1), with a
    backward that stays on oneDNN and BLAS.

    Autograd's own formula for ``mkldnn_convolution`` calls ``convolution_backward``, which chooses its kernels
    afresh and, on one thread with a batch below 16, picks the reference kernels the forward avoided. Here the
    input's gradient is the convolution of the output's gradient with the flipped, transposed kernel (oneDNN), and
    the kernel's gradient is one batched matrix product per kernel offset (BLAS), over views of the input and the
    gradient: no unfolded copy of the input. Both are built from differentiable operations, so double backward
    works.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ones = (1,) * len(padding)
        return torch.mkldnn_convolution(x, weight, bias, padding, ones, ones, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pad, kernel = ctx.padding[0], weight.shape[2]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            flipped = weight.transpose(0, 1).flip(2).contiguous()
            back = (kernel - 1 - pad,) + (0,) * (weight.dim() - 3)
            ones = (1,) * len(back)
            grad_x = torch.mkldnn_convolution(grad, flipped, None, back, ones, ones, 1)
        if ctx.needs_input_grad[1]:
            grad_weight = _leading_kernel_weight_grad(grad, x, kernel, pad).view_as(weight)
        if ctx.needs_input_grad[2]:  # False for a missing bias
            grad_bias = grad.sum([d for d in range(grad.dim()) if d != 1])
        return grad_x, grad_weight, grad_bias, None


def _leading_kernel_weight_grad(grad: Tensor, x: Tensor, kernel: int, pad: int) -> Tensor:
    """The kernel's gradient, (out, in, kernel): for each offset k, the sum over the batch of the output gradient
    times the input shifted by k - pad along the first spatial axis, each a matrix product over the positions the
    shift keeps inside the input (padding contributes zeros)."""
    grad, x = grad.contiguous(), x.contiguous()
    out_len, in_len = grad.shape[2], x.shape[2]
    g = grad.reshape(*grad.shape[:3], -1)  # (N, out, T', rest)
    v = x.reshape(*x.shape[:3], -1)  # (N, in, T, rest)
    taps = []
    for k in range(kernel):
        lo, hi = max(0, pad - k), min(out_len, in_len + pad - k)
        if lo >= hi:
            taps.append(grad.new_zeros(grad.shape[1], x.shape[1]))  # an offset that sees only padding
            continue
        gk = g[:, :, lo:hi].flatten(2)
        vk = v[:, :, lo + k - pad : hi + k - pad].flatten(2)
        taps.append(torch.matmul(gk, vk.transpose(1, 2)).sum(0))
    return torch.stack(taps, dim=2)


class _OneDNNConv:
    """The ``_conv_forward`` of :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if uses_onednn(x, weight, self.padding_mode, self.padding):
            if (
                torch.is_grad_enabled()
                and math.prod(x.shape[2:]) >= LEADING_KERNEL_MIN_POSITIONS
                and _leading_kernel(weight, self.padding, self.stride, self.dilation, self.groups)
            ):
                return _LeadingKernelConvolution.apply(x, weight, bias, tuple(self.padding))
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class Conv1d(_OneDNNConv, nn.Conv1d):
    """``nn.Conv1d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""


class Conv2d(_OneDNNConv, nn.Conv2d):
    """``nn.Conv2d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""


class Conv3d(_OneDNNConv, nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""
