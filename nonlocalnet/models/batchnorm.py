"""Frozen batch norm: BN whose statistics and affine parameters are fixed buffers.

The paper's 128-frame models train with every BN of the backbone frozen (2 clips per GPU are too few for batch
statistics); the official code turns each BN into an "affine" channel-wise scale and shift. Here a frozen BN keeps
BN's four tensors under BN's names (``weight``, ``bias``, ``running_mean``, ``running_var``), all buffers, so a
checkpoint of the BN model loads into the frozen one unchanged; it computes

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

in train and eval mode alike, with no gradient to any of the four.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics and affine parameters, for (B, C, *) inputs of any rank >= 2.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance, as in :class:`torch.nn.BatchNorm3d`.
    """

    _input_ranks: tuple[int, ...] = ()  # accepted input ranks; empty = any rank >= 2

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.empty(num_features))
        self.register_buffer("bias", torch.empty(num_features))
        self.register_buffer("running_mean", torch.empty(num_features))
        self.register_buffer("running_var", torch.empty(num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity: weight 1, bias 0, mean 0, variance 1."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.running_mean)
        nn.init.ones_(self.running_var)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._NormBase) -> FrozenBatchNorm:
        """A frozen copy of ``bn``'s current statistics and affine parameters (weight 1, bias 0 if it has none)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {bn}: it tracks no running statistics (track_running_stats=False)")
        frozen = cls(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        view = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over (B, C, *)
        return x * scale.view(view).to(x.dtype) + shift.view(view).to(x.dtype)

    def _check_input(self, x: Tensor) -> None:
        ranks = self._input_ranks or tuple(range(2, 16))
        if x.dim() not in ranks:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank {' or '.join(map(str, ranks))} "
                f"(B, C, ...); got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels (input shape {tuple(x.shape)})"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # a BN checkpoint carries a step counter that a frozen BN has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (B, C) or (B, C, L) inputs."""

    _input_ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (B, C, H, W) inputs."""

    _input_ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for (B, C, T, H, W) inputs."""

    _input_ranks = (5,)


_FROZEN_BY_BN = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
}


def freeze_batchnorm(module: nn.Module, exclude: tuple[type, ...] = ()) -> nn.Module:
    """Replaces every BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` by a frozen copy.

    The statistics and affine parameters are kept as they are; the replaced layers no longer have parameters,
    so build the optimizer after freezing.

    Args:
        module: a model, changed in place; if it is itself a BN layer, its frozen copy is returned instead.
        exclude: module types whose BN layers stay as they are (the trainer passes the non-local block, whose
            BN starts at γ = 0: frozen there, the block would stay the identity).

    Returns:
        ``module`` (or the frozen copy of a BN ``module``).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen_cls = _FROZEN_BY_BN.get(type(module), FrozenBatchNorm)
        return frozen_cls.from_batchnorm(module)
    if exclude and isinstance(module, exclude):
        return module
    for name, child in module.named_children():
        frozen = freeze_batchnorm(child, exclude)
        if frozen is not child:
            setattr(module, name, frozen)
    return module
