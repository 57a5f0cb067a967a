"""Starting weights: one loader for every file a recipe starts from.

``load_pretrained(model, path)`` (what ``model.pretrained`` in a config calls) accepts

- a checkpoint of the same model, in any of our formats (safetensors, training checkpoint, bare state dict); the
  classifier is left at its init when its shape differs (fine-tuning to another number of classes);
- a 2D torchvision ResNet state dict, inflated over time (:func:`~nonlocalnet.models.inflate_2d_weights`);
- a checkpoint of the same network without non-local blocks (the paper's NL models start from their baseline):
  the blocks keep their identity init;

in both of which the new blocks built with ``init="auto"`` (the default) are given the official init, as the
paper's recipes insert them into a pretrained network;
- a checkpoint whose blocks have BN into a model whose blocks have none (the 128-frame models, every BN frozen):
  each trained BN, an affine map in eval, is folded into W_z, so the block computes exactly what it did.

Anything else (another depth, another width or kernel, a file that is no ResNet) is refused with an error that
names the mismatch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...layers import find_nonlocal_blocks, init_inserted_blocks
from .inflate import inflate_2d_weights
from .weights import read_state_dict

log = logging.getLogger("nonlocalnet")


class PretrainedMismatch(ValueError):
    """A starting-weights file that does not fit the model; the message names the mismatch."""

    all_processes = True  # every process of a torchrun job loads the same file: the CLI says it once


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did.

    Attributes:
        kind: "same model", "2D inflated", "without non-local blocks" or "non-local BN folded".
        loaded: the model's tensors filled from the file.
        fresh: the model's tensors left at their init (non-local blocks the file lacks, a classifier of
            another size).
        folded: the non-local blocks whose BN from the file was folded into W_z.
    """

    kind: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> PretrainedReport:
    """Loads starting weights into ``model`` (changed in place); see the module docstring for what is accepted.

    Raises:
        FileNotFoundError: no file at ``path``.
        PretrainedMismatch: the file does not fit the model (the message says how).
    """
    path = Path(path)
    if not path.is_file():
        missing = FileNotFoundError(f"model.pretrained: no file at {path}")
        missing.all_processes = True  # every process of a torchrun job looks for it: the CLI says it once
        raise missing
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state, meta = read_state_dict(path)
    state = dict(state)
    if meta.get("converted_from") in ("pytorchvideo", "mmaction2") and meta.get("model_name"):
        _warn_if_another_network(model, meta, path)
    if not any(k.startswith(("conv1.", "res2.", "layer1.")) for k in state):
        raise PretrainedMismatch(
            f"{path} is not a ResNet state dict (no conv1 / res2 / layer1 tensors; its first "
            f"keys: {', '.join(list(state)[:4]) or 'none'})"
        )
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.dim() == 4:  # a 2D network: inflate over time
        try:
            inflation = inflate_2d_weights(model, state)
        except ValueError as e:
            raise PretrainedMismatch(f"{path}: {e}") from None
        # loaded: every tensor taken from the file, inflated over time or copied as it is (BN, 1-frame convs);
        # fresh: the model's own tensors the file has no counterpart for (non-local blocks, a skipped classifier)
        loaded = set(inflation.inflated) | set(inflation.copied)
        init_inserted_blocks(model)  # every block is new to the pretrained network: the official init
        report = PretrainedReport(
            "2D inflated",
            loaded=[k for k in model.state_dict() if k in loaded],
            fresh=[k for k in inflation.kept if not k.endswith("num_batches_tracked")],
        )
        _log(path, report)
        return report

    own = model.state_dict()
    blocks = find_nonlocal_blocks(model)
    folded = [
        name
        for name, block in blocks.items()
        if isinstance(block.norm, nn.Identity) and f"{name}.norm.running_var" in state
    ]
    for name in folded:
        _fold_batchnorm(state, name)
    _check_depth(state, own, path)
    for key in [k for k in state if k.endswith("num_batches_tracked") and k not in own]:
        del state[key]  # a BN step counter where the model has a frozen BN (or none)
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise PretrainedMismatch(f"{path} has {len(unexpected)} tensor(s) the model lacks: {_summary(unexpected)}")
    wrong = [k for k in state if state[k].shape != own[k].shape and not k.startswith("head.")]
    if wrong:
        k = wrong[0]
        raise PretrainedMismatch(
            f"{path} is another width or kernel: {len(wrong)} tensor(s) of another shape, "
            f"e.g. {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the "
            f"model"
        )
    head = [k for k in state if state[k].shape != own[k].shape]  # another number of classes
    for key in head:
        del state[key]
    # a file without classifier (convert-caffe2 --skip-classifier, a backbone) leaves the model's own
    head += [k for k in own if k.startswith("head.") and k not in state and k not in head]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # (a frozen-BN file)
    block_keys = {k for k in missing if any(k.startswith(name + ".") for name in blocks)}
    fresh_blocks = sorted({name for name in blocks if any(k.startswith(name + ".") for k in block_keys)})
    partial = [name for name in fresh_blocks if any(k.startswith(name + ".") for k in state)]
    if partial:
        lacking = [k for k in block_keys if k.startswith(partial[0] + ".")]
        raise PretrainedMismatch(
            f"{path}: the non-local block {partial[0]} is only partly in the file (it lacks "
            f"{_summary(lacking)}): another mode or norm?"
        )
    other = [k for k in missing if k not in block_keys and k not in head]
    if other:
        raise PretrainedMismatch(f"{path} lacks {len(other)} tensor(s) of the model: {_summary(other)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    init_inserted_blocks(model, fresh_blocks)  # blocks new to the pretrained network: the official init
    kind = "non-local BN folded" if folded else "without non-local blocks" if fresh_blocks else "same model"
    report = PretrainedReport(kind, loaded=sorted(state), fresh=sorted(block_keys) + head, folded=folded)
    _log(path, report)
    return report


def _warn_if_another_network(model: nn.Module, meta: Mapping, path: Path) -> None:
    """A zoo checkpoint's tensors fit the paper's network of the same name too (mmaction2's NL I3D fits
    nl_i3d_r50), which computes something else: say so, and which model computes what the zoo computed."""
    from ..registry import create_model

    name = meta["model_name"]
    try:
        zoo = create_model(name, **{**(meta.get("model_options") or {}), "num_classes": 0})
    except (TypeError, ValueError, KeyError):
        return

    def body(net: nn.Module) -> str:  # the network without its classifier
        return "\n".join(f"{n}: {m!r}" for n, m in net.named_children() if n != "head")

    if body(zoo) != body(model):
        log.warning(
            "pretrained %s holds %s's network as %s (options: %s), which computes differently from "
            "this model; to fine-tune the network the zoo trained, build %s with those options",
            path,
            meta["converted_from"],
            name,
            ", ".join(f"{k}={v}" for k, v in (meta.get("model_options") or {}).items()) or "the registered ones",
            name,
        )


def _fold_batchnorm(state: dict[str, Tensor], block: str, eps: float = 1e-5) -> None:
    """Replaces ``block``'s W_z and BN in ``state`` by one W_z computing BN(W_z y) as BN computes it in eval."""
    parts = ("weight", "bias", "running_mean", "running_var")
    lacking = [f"{block}.{k}" for k in ("out.weight", *(f"norm.{p}" for p in parts)) if f"{block}.{k}" not in state]
    if lacking:
        raise PretrainedMismatch(f"cannot fold the BN of non-local block {block}: the file lacks {', '.join(lacking)}")
    bn = {k: state.pop(f"{block}.norm.{k}") for k in parts}
    state.pop(f"{block}.norm.num_batches_tracked", None)
    weight, bias = state[f"{block}.out.weight"], state.get(f"{block}.out.bias")
    scale = bn["weight"].double() * (bn["running_var"].double() + eps).rsqrt()  # (C,)
    shift = bn["bias"].double() - bn["running_mean"].double() * scale
    view = (-1,) + (1,) * (weight.dim() - 1)
    state[f"{block}.out.weight"] = (weight.double() * scale.view(view)).to(weight.dtype)
    state[f"{block}.out.bias"] = ((bias.double() * scale if bias is not None else 0) + shift).to(weight.dtype)


def _check_depth(state: Mapping[str, Tensor], own: Mapping[str, Tensor], path: Path) -> None:
    """Raises naming the stage whose number of residual blocks differs between the file and the model."""

    def blocks(keys) -> dict[str, int]:
        found: dict[str, set[int]] = {}
        for key in keys:
            m = re.match(r"(res\d)\.(\d+)\.", key)
            if m:
                found.setdefault(m.group(1), set()).add(int(m.group(2)))
        return {stage: len(indices) for stage, indices in found.items()}

    theirs, ours = blocks(state), blocks(own)
    for stage in sorted(set(theirs) | set(ours)):
        if theirs.get(stage, 0) != ours.get(stage, 0):
            raise PretrainedMismatch(
                f"{path} is another depth: {stage} has {theirs.get(stage, 0)} residual "
                f"blocks in the file, {ours.get(stage, 0)} in the model"
            )


def _summary(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _modules(keys: list[str]) -> list[str]:
    """The modules owning ``keys``, in order (``res3.nl1.theta.weight`` -> ``res3.nl1``, ``head.fc.bias`` ->
    ``head.fc``): a non-local block's tensors are named once, as the block."""
    names: dict[str, None] = {}
    for key in keys:
        m = re.match(r"^(.*?\.nl\d+)\.", key)
        names[m.group(1) if m else key.rsplit(".", 1)[0]] = None
    return list(names)


def _log(path: Path, report: PretrainedReport) -> None:
    log.info(
        "pretrained %s (%s): %d tensors loaded, %d initialised fresh",
        path,
        report.kind,
        len(report.loaded),
        len(report.fresh),
    )
    if report.fresh:
        log.info("pretrained: initialised fresh (not in the file): %s", _summary(_modules(report.fresh), 8))
    if report.folded:
        log.info("pretrained: BN folded into W_z of %s", ", ".join(report.folded))
