"""What every zoo's conversion shares: its result and its error, reading a network's shape off the tensors, and
mapping tensors by name onto a model with every tensor placed and every model entry filled.

The per-source modules (:mod:`.caffe2`, :mod:`.pytorchvideo`, :mod:`.mmaction2`) say which model a file is and
where each of its tensors goes; :mod:`.formats` recognises the file and dispatches to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..placements import R50_LAYERS, R101_LAYERS, STAGES
from ..registry import create_model, model_defaults
from ..resnet3d import i3d_inflated_blocks, slow_inflated_blocks


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, the format and what is wrong."""


@dataclass
class Conversion:
    """What :func:`convert_checkpoint` made of a file.

    Attributes:
        source_format: "caffe2", "pytorchvideo" or "mmaction2".
        model_name: the registered model the weights are for.
        options: model options on top of the registered ones (num_classes included); JSON-able.
        model: that model, filled with the weights (eval mode).
        state_dict: the model's entries, as written to the safetensors file.
        notes: what the conversion did beyond copying (zero-filled biases the zoo's layer lacks, skipped training
            state, folded BN).
    """

    source_format: str
    model_name: str
    options: dict[str, Any]
    model: nn.Module
    state_dict: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


def depths(state: Mapping[str, Any], pattern: str, stages: tuple[int, ...] = (1, 2, 3, 4)) -> tuple[int, ...]:
    """Blocks per stage: how many of ``pattern.format(stage=s, index=0, 1, ...)`` are present, for each s."""
    counts = []
    for stage in stages:
        n = 0
        while pattern.format(stage=stage, index=n) in state:
            n += 1
        counts.append(n)
    return tuple(counts)


def depth_name(layers: tuple[int, ...], path: Path) -> str:
    if layers == R50_LAYERS:
        return "r50"
    if layers == R101_LAYERS:
        return "r101"
    raise ConversionError(
        f"{path}: a ResNet with {layers} blocks per stage, neither R50 nor R101; pass --model NAME and --set layers=..."
    )


def temporal_kernel(state: Mapping[str, Any], key: str, path: Path | None) -> int:
    """The temporal kernel of the 3D convolution weight ``key`` (out, in, t, h, w); a ConversionError naming the
    file, the key and its shape for anything else (a 2-D stem or branch: a damaged or foreign file)."""
    shape = tuple(getattr(state[key], "shape", ()))
    if len(shape) != 5:
        raise ConversionError(
            f"{path}: {key} must be a 5-D convolution weight (out, in, t, h, w); got shape {list(shape)}"
        )
    return int(shape[2])


def temporal_kernels(
    state: Mapping[str, Any],
    layers: tuple[int, ...],
    pattern: str,
    stages: tuple[int, ...] = (1, 2, 3, 4),
    path: Path | None = None,
) -> dict[str, tuple[int, ...]]:
    """stage -> blocks whose ``pattern`` conv has a temporal kernel > 1."""
    return {
        name: tuple(i for i in range(n) if temporal_kernel(state, pattern.format(stage=s, index=i), path) > 1)
        for name, s, n in zip(STAGES, stages, layers)
    }


def differs(name: str, **inferred: Any) -> dict[str, Any]:
    """The inferred options that differ from what ``name`` builds by default (so the record stays short)."""
    defaults = {"width": 64, **model_defaults(name)}
    layers = tuple(inferred.get("layers") or defaults.get("layers") or R50_LAYERS)
    if defaults.get("inflated_blocks") is None:  # the arch's own pattern
        defaults["inflated_blocks"] = (slow_inflated_blocks if defaults.get("arch") == "slow" else i3d_inflated_blocks)(
            layers
        )

    def norm(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: norm(x) for k, x in v.items() if not (isinstance(x, (tuple, list)) and not x)}
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return {
        k: v
        for k, v in inferred.items()
        if norm(v) != norm(defaults.get(k) or {} if isinstance(v, Mapping) else defaults.get(k))
    }


BLOCK_KEY = re.compile(r"^res([2-5])\.(\d+)\.(conv_[abc]|bn_[abc]|shortcut\.conv|shortcut\.bn)\.(\w+)$")
NL_KEY = re.compile(r"^res([2-5])\.nl(\d+)\.(theta|phi|g|out|norm)\.(\w+)$")
# zoo entries that may be absent because the zoo's layer has no bias there (mmcv's W_z conv before its BN): the
# zoo computes what a zero bias computes
_ZERO_IF_ABSENT = re.compile(r"\.non_local_block\.conv_out\.conv\.bias$")


def renamed(key: str, prefixes: Mapping[str, str]) -> str | None:
    """``key`` with its prefix replaced by the zoo's, for the first of ``prefixes`` it starts with."""
    for ours, theirs in prefixes.items():
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return None


def map_state(
    path: Path,
    fmt: str,
    state: Mapping[str, Tensor],
    model: nn.Module,
    name: str,
    source_of: Callable[[str], str | None],
) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state dict filled from ``state``; every tensor placed and every entry filled, or an error."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    unfilled, mismatched, no_counterpart, zeroed, counters = [], [], [], [], []
    for key, ref in model.state_dict().items():
        src = source_of(key)
        if src is None:
            no_counterpart.append(key)
        elif src in state:
            value = state[src].detach().to(ref.dtype)
            if value.shape != ref.shape:
                mismatched.append(f"{src} {tuple(value.shape)} -> {key} {tuple(ref.shape)}")
                used.add(src)  # placed, at the wrong shape: reported once, as such
                continue
            out[key] = value.clone()
            used.add(src)
        elif _ZERO_IF_ABSENT.search(src):
            out[key] = torch.zeros_like(ref)
            zeroed.append(key)
        elif key.endswith("num_batches_tracked"):  # older files lack BN's counter; it changes no output
            out[key] = torch.zeros_like(ref)
            counters.append(key)
        else:
            unfilled.append(f"{key} ({src})")
    unplaced = sorted(set(state) - used)
    problems = fit_problems("tensor", f"{fmt}'s networks", mismatched, unplaced, unfilled, no_counterpart)
    if problems:
        raise ConversionError(f"{path} ({fmt}) does not fit {name}:\n  " + "\n  ".join(problems))
    notes = []
    if zeroed:
        notes.append(f"{len(zeroed)} W_z bias(es) set to zero: the zoo's layer has none")
    if counters:
        notes.append(f"{len(counters)} BN counters (num_batches_tracked) absent from the file, set to 0")
    return out, notes


def build_model(path: Path, name: str, options: Mapping[str, Any]) -> nn.Module:
    """The registered model ``name`` built with ``options``; an option it refuses is a ConversionError naming the
    file."""
    try:
        return create_model(name, **options)
    except (TypeError, ValueError) as exc:  # an option the model does not take, or a bad value
        raise ConversionError(f"{path} as {name}: {exc}") from None


def fit_problems(
    noun: str,
    networks: str,
    mismatched: list[str],
    unplaced: list[str],
    unfilled: list[str],
    no_counterpart: list[str],
    limit: int = 8,
    shape_hint: str = "",
) -> list[str]:
    """One line per kind of mismatch between a checkpoint's ``noun`` s (blobs, tensors) and a model's entries,
    each listing its first names: what every converter's error says."""

    def listing(items: list[str], n: int, sep: str = ", ") -> str:
        return sep.join(items[:n]) + (" ..." if len(items) > n else "")

    def entries(items: list[str]) -> str:
        return f"{len(items)} model entr{'y' if len(items) == 1 else 'ies'}"

    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} {noun}(s) of the wrong shape{shape_hint}: {listing(mismatched, 6, '; ')}")
    if unplaced:
        problems.append(f"{len(unplaced)} {noun}(s) the model has no place for: {listing(unplaced, limit)}")
    if unfilled:
        problems.append(f"{entries(unfilled)} no {noun} fills: {listing(unfilled, limit)}")
    if no_counterpart:
        problems.append(
            f"{entries(no_counterpart)} with no counterpart in {networks}: " + ", ".join(no_counterpart[:6])
        )
    return problems
