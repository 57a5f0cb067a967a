"""Precise BatchNorm statistics: the population mean/variance of the trained network, before testing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .distributed import all_reduce_mean


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int) -> int:
    """Replaces every BN layer's running statistics by their average over ``num_batches`` training batches.

    The weights are not touched; only BN layers run in training mode (dropout stays off). Across processes the
    statistics are averaged. Returns the number of batches used (0: nothing to do).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_batches <= 0:
        return 0
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.train()
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: after n batches, the mean of the n batch statistics
    used = 0
    for clip in batches:
        model(clip)
        used += 1
        if used >= num_batches:
            break
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
        bn.running_var.copy_(all_reduce_mean(bn.running_var))
        bn.eval()
    model.train(was_training)
    return used
