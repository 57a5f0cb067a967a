"""The execution policy of every training and inference run: what ``train.amp`` computes in and which memory
layout ``train.memory_format`` gives the network, on which device, and ``train.compile``.

The "auto" defaults follow measurements (docs/performance.md has them with their commands): bfloat16 autocast
on CUDA GPUs with bfloat16 tensor cores (compute capability 8.0 on), where it runs the networks faster; never on
a CPU, where the networks' bfloat16 steps measured several times slower than float32. Channels-last on CUDA,
where cuDNN's convolutions are faster in it; on a CPU channels-last for inference, where oneDNN's convolutions
are faster in it, and the default layout for training, where the channels-last networks measured slower (their
batch norms' backward passes copy the tensors back).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

log = logging.getLogger("nonlocalnet")


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: no autocast).

    "auto" (the default): bfloat16 where it is fast (:func:`fast_bf16`), else none.
    "bf16": bfloat16, float32's range with 8 significant bits: no loss scaling needed. "fp16": float16, with a
    GradScaler (its range ends at 65504, small gradients underflow without scaling). true: bfloat16 where the
    device computes it (CPUs, CUDA GPUs from Ampere on), float16 otherwise. The non-local blocks' pairwise step
    follows its own policy inside autocast (:mod:`nonlocalnet.layers.pairwise`).
    """
    if amp is False:
        return None
    if amp == "auto":
        return torch.bfloat16 if fast_bf16(device) else None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16_ok:
        raise ValueError(
            f"train.amp=bf16: this GPU ({torch.cuda.get_device_name(device)}) does not compute "
            f"bfloat16; use fp16 (or true, which picks it)"
        )
    if amp == "fp16" or (amp is True and not bf16_ok):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, amp: bool | str) -> AbstractContextManager:
    """The autocast context of ``train.amp`` on ``device`` (a disabled one without mixed precision)."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(device: torch.device, amp: bool | str, announce: bool = True) -> torch.amp.GradScaler:
    """The loss scaler of ``train.amp``, enabled for float16 only (see :func:`amp_dtype`); with ``announce``, says
    which precision the run computes in."""
    precision = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    if announce and precision is not None:
        log.info("mixed precision: %s autocast%s", precision, " with a GradScaler" if scaler.is_enabled() else "")
    return scaler


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 on tensor cores (CUDA compute capability 8.0 on): where ``train.amp``
    "auto" autocasts. Not the CPU, nor older GPUs, which emulate bfloat16 at float32's speed or below."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def memory_format(device: torch.device, setting: str = "auto", training: bool = True) -> torch.memory_format:
    """The layout of a network's 5D weights and activations for ``train.memory_format`` on ``device``: "auto" is
    channels-last on CUDA, and on a CPU channels-last for inference and the default (contiguous) layout for
    training, each the faster there (see the module's docstring)."""
    if setting not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}; got {setting!r}")
    if setting == "auto":
        setting = "channels_last" if device.type == "cuda" or not training else "contiguous"
    return torch.channels_last_3d if setting == "channels_last" else torch.contiguous_format


def _relayout(model: nn.Module, layout: torch.memory_format) -> list[tuple[torch.Tensor, torch.memory_format]]:
    """Lays out ``model``'s 5D parameters and buffers in ``layout``, in place; the tensors it changed, each with the
    layout it had."""
    changed = []
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 5 and not t.is_contiguous(memory_format=layout):
                was_channels_last = t.is_contiguous(memory_format=torch.channels_last_3d)
                changed.append((t, torch.channels_last_3d if was_channels_last else torch.contiguous_format))
                t.data = t.data.contiguous(memory_format=layout)
    return changed


def apply_memory_format(
    model: nn.Module, device: torch.device, setting: str = "auto", training: bool = True
) -> nn.Module:
    """Lays out ``model``'s 5D parameters and buffers (video convolutions) in :func:`memory_format`, in place, and
    returns it. The convolutions then give their outputs in that layout, whatever the input's. Values are
    untouched: a checkpoint saved from either layout loads into either."""
    _relayout(model, memory_format(device, setting, training))
    return model


@contextlib.contextmanager
def inference_layout(model: nn.Module, device: torch.device, setting: str = "auto") -> Iterator[nn.Module]:
    """``model`` in the inference layout of :func:`memory_format` within the context, its own layout restored
    afterwards (a model that goes on training keeps its training layout)."""
    changed = _relayout(model, memory_format(device, setting, training=False))
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, previous in changed:
                t.data = t.data.contiguous(memory_format=previous)
