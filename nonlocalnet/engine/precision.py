"""The precision policy of every training and evaluation run: what ``train.amp`` computes in, on which device."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

import torch

log = logging.getLogger("nonlocalnet")


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: no autocast).

    "bf16": bfloat16, float32's range with 8 significant bits: no loss scaling needed. "fp16": float16, with a
    GradScaler (its range ends at 65504, small gradients underflow without scaling). true: bfloat16 where the
    device computes it (CPUs, CUDA GPUs from Ampere on), float16 otherwise. The non-local blocks' pairwise step
    follows its own policy inside autocast (:mod:`nonlocalnet.layers.pairwise`).
    """
    if amp is False:
        return None
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
