"""Convolutions that run on oneDNN on the CPU where torch's own dispatch would pick its reference kernels.

torch sends an unstrided float32 convolution whose kernel is 1 x 1 in its last two axes (the 1x1x1 projections
of a bottleneck and of a non-local block, the k x 1 x 1 temporal convolutions of I3D) to its reference
("slow_conv3d") kernels when it runs on one thread with a batch below 16, and oneDNN's kernels otherwise. On one
thread those reference kernels make a whole NL I3D R50 slower to train and to run than oneDNN's
(docs/performance.md has the measurements and their commands). These modules compute the same
convolution through oneDNN in that case and leave every other case to torch: other dtypes and devices, autocast
(which casts a convolution's inputs only when the call goes through ``conv3d``), tracing, compiling and
dispatch modes such as FLOP counters and fake tensors (which know ``convolution``, not ``mkldnn_convolution``),
and inputs too small for oneDNN's set-up cost to pay
(below :data:`ONEDNN_MIN_ELEMENTS`).

They are ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` subclasses with the same parameters and state dict, so
loaders, converters and ``isinstance`` checks see a plain convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

# Inputs with fewer elements than this stay on torch's dispatch: oneDNN's per-call set-up (a primitive and
# reorders) costs more than the reference kernel saves on a tiny map (benchmarks/conv.py measures both sides).
ONEDNN_MIN_ELEMENTS = 1 << 17

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
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and padding_mode == "zeros"
        and not isinstance(padding, str)  # "same" / "valid": torch resolves those itself
        and x.dim() == weight.dim()  # batched input: oneDNN has no unbatched form
        and x.numel() >= ONEDNN_MIN_ELEMENTS
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None  # FLOP counters and fake modes know torch's convolution
    )


class _OneDNNConv:
    """The ``_conv_forward`` of :class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d`."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if uses_onednn(x, weight, self.padding_mode, self.padding):
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class Conv1d(_OneDNNConv, nn.Conv1d):
    """``nn.Conv1d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""


class Conv2d(_OneDNNConv, nn.Conv2d):
    """``nn.Conv2d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""


class Conv3d(_OneDNNConv, nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN where torch's dispatch would not (see the module's docstring)."""
