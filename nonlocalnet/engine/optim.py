"""The paper's optimiser and learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..layers.nonlocal_block import ChannelLayerNorm

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelLayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Two SGD groups: weights with ``weight_decay``, BN (and other norm) parameters with ``norm_weight_decay``.

    The official code applies no weight decay to BN's scale and shift.
    """
    norm_params: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm_params if isinstance(module, _NORMS) else other).append(param)
    groups = [{"params": other, "weight_decay": weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": norm_weight_decay})
    return groups


def fused_sgd(params: Iterable[nn.Parameter]) -> bool:
    """Whether torch's fused SGD kernel can update ``params``: floating tensors on the CPU or a CUDA device. It reads
    and writes each weight, gradient and momentum once per step where the per-tensor loop makes several passes:
    on a CPU that takes several times less time for the same update (benchmarks/compare's models section times
    whole training steps with it)."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: nn.Module, train: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD with momentum (Nesterov by default, as the official code) from the ``train`` config section, on torch's
    fused kernel where the parameters allow it (:func:`fused_sgd`): the same update rule as the per-tensor loop."""
    groups = parameter_groups(model, train["weight_decay"], train["bn_weight_decay"])
    fused = fused_sgd(p for g in groups for p in g["params"]) or None
    return torch.optim.SGD(groups, lr=train["lr"], momentum=train["momentum"], nesterov=train["nesterov"], fused=fused)


def step_lr(
    iteration: int,
    base_lr: float,
    steps: Sequence[int],
    gamma: float = 0.1,
    warmup_iterations: int = 0,
    warmup_factor: float = 0.1,
) -> float:
    """The learning rate at ``iteration`` (0-based) of a step schedule with optional linear warm-up.

    ``base_lr * gamma ** (number of steps <= iteration)``; during the first ``warmup_iterations`` it rises
    linearly from ``warmup_factor * `` that value to it.
    """
    lr = base_lr * gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
