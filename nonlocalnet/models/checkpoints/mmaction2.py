"""mmaction2's ResNet3d recognisers (``Recognizer3D`` of ResNet3d + I3DHead, with mmcv's ``NonLocal3d`` blocks)
into nonlocalnet models: which registered model a state dict is, the mmaction2 entry each model entry comes from,
and :func:`mmcv_nonlocal_key`, the mapping of mmcv's non-local block that :mod:`nonlocalnet.models.swap` uses too.

mmaction2's embedded-gaussian and gaussian blocks leave θᵀφ unscaled (``use_scale=False``); the conversion carries
that, and notes (warning once a process) that in float32 the two implementations then differ by amplified rounding.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..placements import R50_LAYERS, STAGES
from .mapping import BLOCK_KEY, NL_KEY, ConversionError, depths, differs, renamed, temporal_kernel, temporal_kernels

# mmaction2's softmax blocks leave θᵀφ unscaled (mmcv's NonLocal3d, use_scale=False): large logits, whose
# exponentials turn float32 rounding of the two implementations into visible differences
UNSCALED_SOFTMAX = ("mmaction2_nl_i3d_r50_embedded_gaussian", "mmaction2_nl_i3d_r50_gaussian")
UNSCALED_NOTE = (
    "its non-local blocks do not scale θᵀφ (mmaction2's use_scale=False), so in float32 this model and "
    "mmaction2 differ by rounding that the large softmax logits amplify; compare them in float64 "
    "(model.double()), where they agree to rounding"
)
_warned: list[str] = []  # the warning is given once a process
log = logging.getLogger("nonlocalnet")


def _nl_locations(state: Mapping[str, Any], layers: tuple[int, ...], pattern: str) -> dict[str, tuple[int, ...]]:
    return {
        stage: tuple(i for i in range(n) if pattern.format(stage=s, index=i) in state)
        for s, (stage, n) in enumerate(zip(STAGES, layers), start=1)
    }


def infer_mmaction2(
    state: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    """Which registered model an mmaction2 state dict is for, and the options in which the file's network differs
    from it.

    Args:
        state: the file's tensors by name.
        meta: what else the file says (``{"cfg": text}`` where it records a config).
        path: the file, named in errors (and read for hints its tensors cannot give).
        model: the user's choice of model; default: worked out from the tensors.

    Raises:
        ConversionError: a network that is none of the registered ones, naming what differs.
    """
    layers = depths(state, "backbone.layer{stage}.{index}.conv1.conv.weight")
    if model is None and layers != R50_LAYERS:
        raise ConversionError(
            f"{path}: an mmaction2 ResNet3d with {layers} blocks per stage; nonlocalnet "
            f"registers its R50 networks: pass --model NAME (with --set layers=...)"
        )
    nl = _nl_locations(state, layers, "backbone.layer{stage}.{index}.non_local_block.g.0.conv.weight")
    inflated = temporal_kernels(state, layers, "backbone.layer{stage}.{index}.conv1.conv.weight", path=path)
    conv1_kt = temporal_kernel(state, "backbone.conv1.conv.weight", path)
    cfg = str(meta.get("cfg", ""))
    nl_options: dict[str, Any] = {}
    if model is not None:
        name = model
    elif not any(nl.values()):
        name = "mmaction2_i3d_r50"
    else:
        has_theta = any(".non_local_block.theta." in k for k in state)
        if not has_theta:
            mode = "gaussian"
        elif m := re.search(r"mode\s*=\s*['\"](dot_product|embedded_gaussian)['\"]", cfg):
            mode = m.group(1)
        elif m := re.search(r"(dot|embedded)[-_](product|gaussian)", path.name):
            mode = f"{m.group(1)}_{m.group(2)}"
        else:
            raise ConversionError(
                f"{path}: its non-local blocks are dot products or embedded gaussians, which have the same "
                f"tensors, and neither the file name nor a config recorded in the file says which; pass --model "
                f"mmaction2_nl_i3d_r50_dot_product or --model mmaction2_nl_i3d_r50_embedded_gaussian"
            )
        name = f"mmaction2_nl_i3d_r50_{mode}"
    if any(nl.values()):
        if (m := re.search(r"use_scale\s*=\s*(True|False)", cfg)) and m.group(1) == "True":
            nl_options["scale"] = "auto"  # mmcv divides by sqrt(C'): our "auto"
        if (m := re.search(r"sub_sample\s*=\s*(True|False)", cfg)) and m.group(1) == "False":
            nl_options["subsample"] = None
    options = differs(
        name,
        layers=layers,
        inflated_blocks=inflated,
        width=int(state["backbone.conv1.conv.weight"].shape[0]),
        nonlocal_locations={k: v for k, v in nl.items() if v},
    )
    if conv1_kt != 5:
        options["conv1_temporal_kernel"] = conv1_kt
    if nl_options:
        options["nonlocal_options"] = nl_options
    return name, options


def mmaction2_source(state: Mapping[str, Any], path: Path) -> Callable[[str], str | None]:
    """model entry -> the mmaction2 ``Recognizer3D`` (ResNet3d + I3DHead) entry it comes from."""
    return _mmaction2_entry


_MMACTION2_RENAMED = {"conv1.": "backbone.conv1.conv.", "bn1.": "backbone.conv1.bn.", "head.fc.": "cls_head.fc_cls."}


def _mmaction2_entry(key: str) -> str | None:
    if (theirs := renamed(key, _MMACTION2_RENAMED)) is not None:
        return theirs
    if m := BLOCK_KEY.match(key):
        stage, index, part, attr = m.groups()
        part = {
            "conv_a": "conv1.conv",
            "bn_a": "conv1.bn",
            "conv_b": "conv2.conv",
            "bn_b": "conv2.bn",
            "conv_c": "conv3.conv",
            "bn_c": "conv3.bn",
            "shortcut.conv": "downsample.conv",
            "shortcut.bn": "downsample.bn",
        }[part]
        return f"backbone.layer{int(stage) - 1}.{index}.{part}.{attr}"
    if m := NL_KEY.match(key):  # mmaction2's NL blocks are mmcv's NonLocal3d with sub_sample=True
        stage, index, part, attr = m.groups()
        return f"backbone.layer{int(stage) - 1}.{index}.non_local_block." + mmcv_nonlocal_key(f"{part}.{attr}")
    return None


def mmcv_nonlocal_key(key: str, *, sub_sample: bool = True, norm_name: str = "bn") -> str:
    """The entry of an mmcv ``NonLocal1d/2d/3d`` (``mmcv.cnn.bricks.non_local``) that a
    :class:`~nonlocalnet.layers.NonLocalBlock` state-dict entry comes from, both relative to the block.

    mmcv wraps each 1x1 conv in a ``ConvModule`` (``theta.conv.weight``); with ``sub_sample`` its g and φ are
    ``Sequential(ConvModule, MaxPool)`` (``g.0.conv.weight``), pooling after the convs; W_z is ``conv_out.conv``
    followed by the norm ``conv_out.<norm_name>`` (a ConvModule names its norm "bn", "gn", ...), and w_f of the
    concatenation is ``concat_project.conv`` (ours: ``concat_project.0``).

    Args:
        key: ours, e.g. ``"theta.weight"``, ``"norm.running_mean"``, ``"concat_project.0.weight"``.
        sub_sample: the mmcv block's ``sub_sample``.
        norm_name: the name of the mmcv ConvModule's norm (its ``norm_name``).
    """
    part, _, attr = key.partition(".")
    if part == "out":  # ConvModule(conv, bn): with a norm its conv has no bias (bias="auto")
        return "conv_out.conv." + attr
    if part == "norm":
        return f"conv_out.{norm_name}.{attr}"
    if part == "concat_project":
        return "concat_project.conv." + attr.partition(".")[2]
    return f"{part}{'.0' if sub_sample and part in ('g', 'phi') else ''}.conv.{attr}"


def unscaled_note(path: Path, name: str) -> str | None:
    """The note a conversion into ``name`` carries when its blocks leave θᵀφ unscaled (None for the others); the
    first such conversion of a process also logs it as a warning."""
    if name not in UNSCALED_SOFTMAX:
        return None
    if not _warned:
        _warned.append(name)
        log.warning("%s: %s", path, UNSCALED_NOTE)
    return UNSCALED_NOTE
