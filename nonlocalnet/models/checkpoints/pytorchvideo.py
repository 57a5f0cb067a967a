"""PyTorchVideo's hub ResNets (``c2d_r50``, ``i3d_r50``, ``slow_r50``; ``create_resnet``'s layout) into nonlocalnet
models: which registered model a state dict is, and the PyTorchVideo entry each model entry comes from."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..placements import R50_LAYERS, R101_LAYERS
from ..resnet3d import i3d_inflated_blocks, slow_inflated_blocks
from .mapping import BLOCK_KEY, ConversionError, depths, differs, renamed, temporal_kernel, temporal_kernels

# the windowed average of PyTorchVideo's hub heads (head_pool_kernel_size of pytorchvideo/models/hub/resnet.py)
PYTORCHVIDEO_HEAD_POOL = {"c2d_r50_8x8": (4, 7, 7), "i3d_r50_8x8": (4, 7, 7), "slow_r50_8x8": (8, 7, 7)}


def _pytorchvideo_layout(state: Mapping[str, Any], path: Path) -> tuple[list[int], int | None]:
    """Which ``blocks.{i}`` of a PyTorchVideo ResNet are res2..res5 and which is the head: the stage-1 pool of the
    C2D / I3D hub models is a block of its own (no tensors), so the numbering differs between models."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.res_blocks\.", k))})
    heads = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.proj\.weight$", k))})
    if len(stages) != 4:
        raise ConversionError(f"{path}: a PyTorchVideo network with {len(stages)} residual stages, not a ResNet's 4")
    return stages, (heads[0] if heads else None)


def infer_pytorchvideo(
    state: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    """Which registered model a PyTorchVideo state dict is for, and the options in which the file's network differs
    from it.

    Args:
        state: the file's tensors by name.
        meta: what else the file says (``{"cfg": text}`` where it records a config).
        path: the file, named in errors (and read for hints its tensors cannot give).
        model: the user's choice of model; default: worked out from the tensors.

    Raises:
        ConversionError: a network that is none of the registered ones, naming what differs.
    """
    stages, _ = _pytorchvideo_layout(state, path)
    conv_a = "blocks.{stage}.res_blocks.{index}.branch2.conv_a.weight"
    layers = depths(state, conv_a, tuple(stages))
    stem_kt = temporal_kernel(state, "blocks.0.conv.weight", path)
    inflated = temporal_kernels(state, layers, conv_a, tuple(stages), path)
    depth = {R50_LAYERS: "r50", R101_LAYERS: "r101"}.get(layers)
    detected = None
    if depth and stem_kt == 1 and not any(inflated.values()) and stages[1] == stages[0] + 2:  # pool after res2
        detected = f"c2d_{depth}_8x8"
    elif depth and stem_kt == 5 and inflated == i3d_inflated_blocks(layers) and stages[1] == stages[0] + 2:
        detected = f"i3d_{depth}_8x8"
    elif depth == "r50" and stem_kt == 1 and inflated == slow_inflated_blocks(layers) and stages == [1, 2, 3, 4]:
        detected = "slow_r50_8x8"
    if model is None and detected is None:
        raise ConversionError(
            f"{path}: a PyTorchVideo ResNet that is none of its hub's c2d_r50, i3d_r50, slow_r50 "
            f"({layers} blocks per stage, stem temporal kernel {stem_kt}, 3x1x1 conv_a in "
            f"{inflated}, stages in blocks {stages}); pass --model NAME"
        )
    name = model or detected
    options = differs(name, layers=layers, width=int(state["blocks.0.conv.weight"].shape[0]))
    options["head_pool_kernel"] = PYTORCHVIDEO_HEAD_POOL.get(detected or "", (4, 7, 7))
    return name, options


def pytorchvideo_source(state: Mapping[str, Any], path: Path) -> Callable[[str], str | None]:
    """model entry -> the PyTorchVideo ``create_resnet`` entry it comes from (None: no counterpart)."""
    stages, head = _pytorchvideo_layout(state, path)

    prefixes = {
        "conv1.": "blocks.0.conv.",
        "bn1.": "blocks.0.norm.",
        "head.fc.": f"blocks.{head if head is not None else stages[-1] + 1}.proj.",
    }

    def source(key: str) -> str | None:
        if (theirs := renamed(key, prefixes)) is not None:
            return theirs
        if m := BLOCK_KEY.match(key):
            stage, index, part, attr = m.groups()
            part = {"shortcut.conv": "branch1_conv", "shortcut.bn": "branch1_norm"}.get(
                part, f"branch2.{part.replace('bn_', 'norm_')}"
            )
            return f"blocks.{stages[int(stage) - 2]}.res_blocks.{index}.{part}.{attr}"
        return None

    return source
