"""Model weights in safetensors files: a flat state dict plus string metadata (e.g. the model name)."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def save_weights(weights: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Writes a model's state dict (or any name -> tensor mapping) to a safetensors file.

    Args:
        weights: a model, or a state dict.
        path: the file to write.
        metadata: string key/values stored in the file's header, e.g. ``{"model": "nl_i3d_r50"}``.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    # safetensors wants contiguous tensors that share no memory
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    bad = {k: v for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; got {bad!r}")
    save_file(tensors, os.fspath(path), metadata=dict(metadata or {}))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Loads a safetensors file into ``model`` (onto the device and dtype of its tensors).

    Args:
        model: the model to fill.
        path: a file written by :func:`save_weights` or ``nonlocalnet convert-caffe2``.
        strict: every model tensor must be in the file and every file tensor in the model.

    Returns:
        torch's ``(missing_keys, unexpected_keys)``.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: (strict) names that do not match, or shapes that differ.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {os.fspath(path)!r}")
    state = load_file(os.fspath(path), device="cpu")
    with torch.no_grad():
        return model.load_state_dict(state, strict=strict)
