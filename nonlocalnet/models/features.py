"""A video model's features of a batch of clips: ``forward_features`` or any named layer's output, pooled.

This is the one place features are taken from a model: ``nonlocalnet extract`` and the feature bank's builder
(:mod:`nonlocalnet.bank.build`) both call :func:`clip_features`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .registry import closest_names

__all__ = ["batched_clip_features", "clip_features", "find_layer"]


class _Captured(Exception):
    """Raised by the capturing hook to end the forward pass once the wanted layer has run."""


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a dotted path, as ``model.named_modules()`` gives it, e.g. ``res4.5``).

    Raises:
        ValueError: no such submodule, naming the closest names.
    """
    modules = dict(model.named_modules())
    if name not in modules or not name:
        names = [n for n in modules if n]
        close = closest_names(name, names)
        raise ValueError(
            f"the model has no layer {name!r}"
            + (f"; closest: {', '.join(close)}" if close else "")
            + f" ({len(names)} layers; e.g. {', '.join(names[:3])})"
        )
    return modules[name]


def clip_features(model: nn.Module, clips: Tensor, layer: str | None = None, pool: bool = True) -> Tensor:
    """The features of each clip of a batch.

    Args:
        model: a video model (in the mode the caller wants: eval for features).
        clips: a network input (B, C, T, H, W).
        layer: a submodule's name: its output is taken (by a forward hook, the pass stops there); None takes
            ``model.forward_features`` (the models' timm-like interface; ``model`` itself where it has none).
        pool: average over every axis after the channels ((B, C, T', H', W') -> (B, C)).

    Returns:
        (B, C) pooled features, or the layer's (B, C, ...) output when not ``pool``.
    """
    if layer is None:
        features = model.forward_features(clips) if hasattr(model, "forward_features") else model(clips)
    else:
        module, captured = find_layer(model, layer), []

        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            captured.append(output)
            raise _Captured

        handle = module.register_forward_hook(hook)
        try:
            model(clips)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ValueError(f"layer {layer!r} did not run in the model's forward pass")
        features = captured[0]
        if not isinstance(features, Tensor):
            raise ValueError(f"layer {layer!r} gives a {type(features).__name__}, not a tensor")
    if pool and features.dim() > 2:
        features = features.flatten(2).mean(dim=2)  # (B, C, *S) -> (B, C, prod S) -> (B, C)
    return features


def batched_clip_features(
    model: nn.Module,
    clips: Sequence[Tensor],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    layer: str | None = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The pooled features of many clips, ``batch_size`` at a time: (L, C) float32 on the CPU.

    Args:
        model: the model, in the mode the caller chose (eval for features).
        clips: L clips (C, T, H, W), each a network input once stacked (a tensor (L, C, T, H, W) is a sequence too).
        batch_size: clips per forward pass.
        device: where to run (default: the model's device).
        layer: see :func:`clip_features`.
        prepare: applied to each stacked batch on the device before the model (e.g. normalising uint8 clips).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(clips), batch_size):
            batch = torch.stack(list(clips[i : i + batch_size])).to(device)  # (b, C, T, H, W)
            if prepare is not None:
                batch = prepare(batch)
            out.append(clip_features(model, batch, layer).float().cpu())  # (b, C)
    return torch.cat(out)  # (L, C)
