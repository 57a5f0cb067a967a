"""Non-local blocks inserted into a torchvision 2D ResNet (or the body of a detection backbone).

``add_resnet_nonlocal(resnet, {"layer3": (4,)})`` puts a :class:`~nonlocalnet.layers.NonLocalBlock` (``dim=2``)
right after residual block 4 of ``layer3`` (res4), through :func:`nonlocalnet.add_nonlocal`. The stage stays an
``nn.Sequential`` whose residual blocks keep their names ("0", "1", ...), and each NL block is named ``nl<i>``
after the block it follows, so the state-dict keys of the plain ResNet are unchanged (``layer3.4.conv1.weight``)
and NL weights live beside them (``layer3.nl4.theta.weight``). As the NL blocks start as the identity, a plain
ResNet's weights loaded into the NL network (:func:`load_resnet_state_dict`) give the plain network's outputs. The
paper's placements are :mod:`nonlocalnet.models.placements`' (``before_last_block(stage_depths(resnet), "res4")``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nonlocalnet.layers import NonLocalBlock, find_nonlocal_blocks, init_inserted_blocks
from nonlocalnet.models.checkpoints.weights import load_state_dict_or_raise, read_state_dict
from nonlocalnet.models.insert import SIBLING_PREFIX, add_nonlocal

STAGES = ("layer1", "layer2", "layer3", "layer4")
# The paper's stage names (res2..res5) for torchvision's layer1..layer4.
STAGE_ALIASES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
NL_PREFIX = SIBLING_PREFIX  # nl<i>: the block after residual block i (add_nonlocal's name in an nn.Sequential)

Placement = Mapping[str, Sequence[int]]


def stage_depths(model: nn.Module) -> tuple[int, int, int, int]:
    """The residual blocks in layer1..layer4 (res2..res5) of a ResNet, non-local blocks left out: the ``layers``
    of :mod:`nonlocalnet.models.placements`."""
    return tuple(len(residual_blocks(_stage(model, name))) for name in STAGES)  # type: ignore[return-value]


def placement_paths(model: nn.Module, placement: Placement) -> list[str]:
    """The module paths of the residual blocks a placement names, for :func:`nonlocalnet.add_nonlocal`.

    Args:
        model: a torchvision ``ResNet`` (any depth, ResNeXt, wide) or any module whose ``layer1``..``layer4``
            are ``nn.Sequential`` stages of residual blocks, e.g. the ``body`` of a detection backbone.
        placement: {stage: indices}: one NL block after each listed residual block (0-based, counted among
            the stage's residual blocks, NL blocks left out). Stages are "layer1".."layer4" or the paper's
            "res2".."res5".

    Returns:
        e.g. ``["layer3.4"]`` for ``{"res4": (4,)}``: ``add_nonlocal`` puts each block right after that residual
        block, named ``nl<i>`` (``layer3.nl4``), so the residual blocks keep their names and state-dict keys.
    """
    paths = []
    for stage_name, indices in _resolve_placement(model, placement).items():
        blocks = residual_blocks(_stage(model, stage_name))
        names = {id(m): name for name, m in _stage(model, stage_name).named_children()}
        paths += [f"{stage_name}.{names[id(blocks[i])]}" for i in sorted(indices)]
    return paths


def add_resnet_nonlocal(model: nn.Module, placement: Placement, **block_options: Any) -> nn.Module:
    """:func:`nonlocalnet.add_nonlocal` after the residual blocks of a placement (see :func:`placement_paths`),
    quietly; 2D blocks with ``block_options`` (NonLocalBlock's keyword options). Returns ``model``."""
    paths = placement_paths(model, placement)
    if paths:
        add_nonlocal(model, paths, verbose=False, **block_options)
    return model


def residual_blocks(stage: nn.Module) -> list[nn.Module]:
    """The residual blocks of a stage, in order, leaving out inserted non-local blocks."""
    if not isinstance(stage, nn.Sequential):
        raise TypeError(f"a ResNet stage must be an nn.Sequential of residual blocks; got {type(stage).__name__}")
    return [m for m in stage.children() if not isinstance(m, NonLocalBlock)]


def block_out_channels(block: nn.Module) -> int:
    """Output channels of a torchvision residual block (Bottleneck: conv3; BasicBlock: conv2)."""
    for name in ("conv3", "conv2"):
        conv = getattr(block, name, None)
        if isinstance(conv, nn.Conv2d):
            return conv.out_channels
    raise TypeError(
        f"cannot tell the output channels of {type(block).__name__}: expected a torchvision "
        "Bottleneck (conv3) or BasicBlock (conv2)"
    )


def load_resnet_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | str | Path) -> None:
    """Load a plain (non-NL) ResNet's weights into an NL ResNet or detection backbone body.

    Every weight of the plain network must find its place; only the NL blocks' own weights may be missing
    (they keep their identity init; those built with ``init="auto"`` get the official one, as blocks inserted into
    a pretrained network). The classifier (``fc.*``) is ignored when ``model`` has none (a
    detection body).

    Args:
        model: the NL ResNet (or body).
        state_dict: the weights, or a path to a ``torch.save``-d state dict (``.pth``) or a safetensors file.
    """
    if isinstance(state_dict, (str, Path)):
        state_dict = read_state_dict(state_dict)[0]  # never runs code from the file
    own = model.state_dict()
    state = dict(state_dict)
    if not any(k.startswith("fc.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = load_state_dict_or_raise(model, state, "the state dict does not fit this ResNet", strict=False)
    nl_names = tuple(f"{name}." for name in find_nonlocal_blocks(model))
    missing = [k for k in result.missing_keys if not k.startswith(nl_names)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the state dict does not fit this ResNet: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''}"
        )
    fresh = [name for name in find_nonlocal_blocks(model) if any(k.startswith(f"{name}.") for k in result.missing_keys)]
    init_inserted_blocks(model, fresh)  # blocks new to the pretrained backbone: the official init


def _stage(model: nn.Module, name: str) -> nn.Module:
    stage = getattr(model, name, None)
    if stage is None:
        raise ValueError(
            f"{type(model).__name__} has no stage {name!r}; expected a torchvision ResNet "
            "(or a backbone body) with layer1..layer4"
        )
    return stage


def _resolve_placement(model: nn.Module, placement: Placement) -> dict[str, frozenset[int]]:
    resolved: dict[str, frozenset[int]] = {}
    for key, indices in placement.items():
        stage_name = STAGE_ALIASES.get(key, key)
        if stage_name not in STAGES:
            raise ValueError(
                f"unknown stage {key!r} in the NL placement; expected one of "
                f"{', '.join(STAGES)} or {', '.join(STAGE_ALIASES)}"
            )
        if stage_name in resolved:
            raise ValueError(f"stage {stage_name} is named twice in the NL placement")
        if isinstance(indices, int):
            indices = (indices,)
        depth = len(residual_blocks(_stage(model, stage_name)))
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"NL placement {key}: indices {bad} are outside the stage's {depth} residual blocks (0..{depth - 1})"
            )
        if len(set(indices)) != len(indices):
            raise ValueError(f"NL placement {key}: repeated indices {list(indices)}")
        resolved[stage_name] = frozenset(indices)
    return resolved
