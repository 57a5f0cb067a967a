"""Non-local blocks inserted into a torchvision 2D ResNet (or the body of a detection backbone).

``add_nonlocal(resnet, {"layer3": (4,)})`` puts a :class:`~nonlocalnet.layers.NonLocalBlock` (``dim=2``) right
after residual block 4 of ``layer3`` (res4). The stage stays an ``nn.Sequential`` whose residual blocks keep
their names ("0", "1", ...), and each NL block is named ``nl<i>`` after the block it follows, so the state-dict
keys of the plain ResNet are unchanged (``layer3.4.conv1.weight``) and NL weights live beside them
(``layer3.nl4.theta.weight``). As the NL blocks start as the identity, a plain ResNet's weights loaded into the
NL network (:func:`load_resnet_state_dict`) give the plain network's outputs. The paper's placements are
:mod:`nonlocalnet.models.placements`' (``before_last_block(stage_depths(resnet), "res4")``).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from nonlocalnet.layers import NonLocalBlock, find_nonlocal_blocks, init_inserted_blocks
from nonlocalnet.models.weights import load_state_dict_or_raise, read_state_dict

STAGES = ("layer1", "layer2", "layer3", "layer4")
# The paper's stage names (res2..res5) for torchvision's layer1..layer4.
STAGE_ALIASES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
NL_PREFIX = "nl"

Placement = Mapping[str, Sequence[int]]


def stage_depths(model: nn.Module) -> tuple[int, int, int, int]:
    """The residual blocks in layer1..layer4 (res2..res5) of a ResNet, non-local blocks left out: the ``layers``
    of :mod:`nonlocalnet.models.placements`."""
    return tuple(len(residual_blocks(_stage(model, name))) for name in STAGES)  # type: ignore[return-value]


def add_nonlocal(model: nn.Module, placement: Placement, *, mode: str = "embedded_gaussian",
                 inter_channels: int | None = None, subsample: int | Sequence[int] | None = None,
                 scale: None | float | str = None, norm: str | None = "batch", impl: str = "auto") -> nn.Module:
    """Insert 2D non-local blocks after the given residual blocks of a ResNet, in place.

    Args:
        model: a torchvision ``ResNet`` (any depth, ResNeXt, wide) or any module whose ``layer1``..``layer4``
            are ``nn.Sequential`` stages of residual blocks, e.g. the ``body`` of a detection backbone.
        placement: {stage: indices}: one NL block after each listed residual block (0-based, counted among
            the stage's residual blocks). Stages are "layer1".."layer4" or the paper's "res2".."res5".
        mode: the pairwise function ("gaussian", "embedded_gaussian", "dot_product", "concatenation").
        inter_channels: C' of θ, φ, g (default: half the stage's channels).
        subsample: max-pool kernel on the key/value path, or None.
        scale: None (the paper), "auto" (C'^-0.5) or a number.
        norm: the norm after W_z: "batch" (γ = 0 at init), "layer" or None (W_z = 0 at init; the choice for
            frozen-BN detection backbones).
        impl: which exact path computes the pairwise step (see :class:`~nonlocalnet.layers.NonLocalBlock`).

    Returns:
        ``model``, with its stages rebuilt to hold the NL blocks.
    """
    resolved = _resolve_placement(model, placement)
    for stage_name, indices in resolved.items():
        stage = _stage(model, stage_name)
        blocks = residual_blocks(stage)
        children: OrderedDict[str, nn.Module] = OrderedDict()
        position = -1
        for name, child in stage.named_children():
            children[name] = child
            if isinstance(child, NonLocalBlock):
                continue
            position += 1
            if position in indices:
                nl_name = f"{NL_PREFIX}{position}"
                if nl_name in stage._modules:
                    raise ValueError(f"{stage_name} already has a non-local block after residual block {position}")
                children[nl_name] = NonLocalBlock(
                    block_out_channels(blocks[position]), dim=2, mode=mode, inter_channels=inter_channels,
                    subsample=subsample, scale=scale, norm=norm, impl=impl)
        new_stage = nn.Sequential(children)
        device = next(stage.parameters()).device
        setattr(model, stage_name, new_stage.to(device))
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
    raise TypeError(f"cannot tell the output channels of {type(block).__name__}: expected a torchvision "
                    "Bottleneck (conv3) or BasicBlock (conv2)")


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
        raise ValueError(f"the state dict does not fit this ResNet: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
                         f"{' ...' if len(result.unexpected_keys) > 8 else ''}")
    fresh = [name for name in find_nonlocal_blocks(model)
             if any(k.startswith(f"{name}.") for k in result.missing_keys)]
    init_inserted_blocks(model, fresh)  # blocks new to the pretrained backbone: the official init


def _stage(model: nn.Module, name: str) -> nn.Module:
    stage = getattr(model, name, None)
    if stage is None:
        raise ValueError(f"{type(model).__name__} has no stage {name!r}; expected a torchvision ResNet "
                         "(or a backbone body) with layer1..layer4")
    return stage


def _resolve_placement(model: nn.Module, placement: Placement) -> dict[str, frozenset[int]]:
    resolved: dict[str, frozenset[int]] = {}
    for key, indices in placement.items():
        stage_name = STAGE_ALIASES.get(key, key)
        if stage_name not in STAGES:
            raise ValueError(f"unknown stage {key!r} in the NL placement; expected one of "
                             f"{', '.join(STAGES)} or {', '.join(STAGE_ALIASES)}")
        if stage_name in resolved:
            raise ValueError(f"stage {stage_name} is named twice in the NL placement")
        if isinstance(indices, int):
            indices = (indices,)
        depth = len(residual_blocks(_stage(model, stage_name)))
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(f"NL placement {key}: indices {bad} are outside the stage's {depth} residual "
                             f"blocks (0..{depth - 1})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"NL placement {key}: repeated indices {list(indices)}")
        resolved[stage_name] = frozenset(indices)
    return resolved
