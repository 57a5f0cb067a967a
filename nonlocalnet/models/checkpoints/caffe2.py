"""The official Caffe2 checkpoints (facebookresearch/video-nonlocal-net) into :class:`ResNet3d` state dicts.

A checkpoint is a Python 2 pickle of ``{'blobs': {name: ndarray}}`` (some files are the flat ``{name: ndarray}``),
read with ``encoding='latin1'``. Blob names, and the model entries they fill:

| Caffe2 blob                                      | ResNet3d entry                               |
|--------------------------------------------------|----------------------------------------------|
| conv1_w                                          | conv1.weight                                 |
| res_conv1_bn_{s,b,rm,riv}                        | bn1.{weight,bias,running_mean,running_var}   |
| res{s}_{i}_branch2{a,b,c}_w                      | res{s}.{i}.conv_{a,b,c}.weight               |
| res{s}_{i}_branch2{a,b,c}_bn_{s,b,rm,riv}        | res{s}.{i}.bn_{a,b,c}.*                      |
| res{s}_{i}_branch1_w, _bn_*                      | res{s}.{i}.shortcut.conv.weight, .bn.*       |
| nonlocal_conv{s}_{i}_{theta,phi,g,out}_{w,b}     | res{s}.nl{i}.{theta,phi,g,out}.{weight,bias} |
| nonlocal_conv{s}_{i}_bn_{s,b,rm,riv}             | res{s}.nl{i}.norm.*                          |
| pred_w, pred_b                                   | head.fc.weight, head.fc.bias                 |

``riv`` holds a variance despite its name. Frozen-BN ("affine") checkpoints keep only ``_bn_s`` / ``_bn_b``, the
statistics folded in (s = γ/√(σ²+ε), b = β - μ s): they fill weight = s, bias = b, running_mean = 0 and
running_var = 1 - eps, so that the layer computes exactly x s + b.

Training state (``*_momentum``, ``lr``, ``model_iter``, ``epoch``) is skipped; any other blob the model has no
place for, and any model entry no blob fills, is an error naming it.

Which registered model a file is (:func:`infer_caffe2`) is read off its blobs: the depth from the blocks per stage,
C2D / I3D from the temporal kernels, the paper's placement from the non-local blobs, the 128-frame models from the
affine BN; the 32x2 and 8x8 models have the same blobs, so the file's name says which.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..placements import NL1_R50, NL5_R50, NL5_R101, NL10_R50
from ..registry import get_model_entry
from ..resnet3d import CLIP_LAYOUTS
from .mapping import Conversion, ConversionError, build_model, depth_name, differs, fit_problems, temporal_kernel

TRAINING_STATE = ("lr", "model_iter", "epoch")
_BN_SUFFIX = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_BRANCH = {
    "conv_a": "branch2a",
    "conv_b": "branch2b",
    "conv_c": "branch2c",
    "shortcut.conv": "branch1",
    "bn_a": "branch2a_bn",
    "bn_b": "branch2b_bn",
    "bn_c": "branch2c_bn",
    "shortcut.bn": "branch1_bn",
}
_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(.+)\.([a-z_]+)$")
_NONLOCAL = re.compile(r"^res([2-5])\.nl(\d+)\.([a-z_]+)\.([a-z_]+)$")
_NL_CONVS = ("theta", "phi", "g", "out")


class Caffe2ConversionError(ValueError):
    """A checkpoint that does not fit the model: unplaced blobs, unfilled entries or wrong shapes."""


# What a pickle of NumPy arrays (from Python 2's cPickle or Python 3, NumPy 1 or 2) needs to name: the array
# and dtype constructors, and the latin-1 codec Python 3 writes bytes through in protocol 2. Nothing else.
_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays, and refuses every other global, so a pickle
    built to run code on loading (``__reduce__`` returning ``os.system``) fails instead."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused: the pickle names {module}.{name}; an official checkpoint holds only NumPy arrays, "
                f"and loading other objects could run code"
            )
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # NumPy 2 renamed numpy.core
            module = "numpy._core" + module[len("numpy.core") :]
        return getattr(importlib.import_module(module), name)


def load_caffe2_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The blobs of an official checkpoint, ``{'blobs': {...}}`` or flat, as name -> ndarray.

    Only NumPy arrays, numbers, strings and containers are unpickled: no file can run code here.

    Raises:
        FileNotFoundError: no such file.
        Caffe2ConversionError: not a pickled dict of arrays, or a pickle that names anything else.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Caffe2 checkpoint at {os.fspath(path)!r}")
    with open(path, "rb") as f:
        try:
            data = _ArrayUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            if "refused" in str(exc):
                raise Caffe2ConversionError(f"{os.fspath(path)!r}: {exc}") from None
            raise Caffe2ConversionError(f"{os.fspath(path)!r} is not a readable pickle: {exc}") from None
        except Exception as exc:  # a truncated or non-pickle file
            raise Caffe2ConversionError(
                f"{os.fspath(path)!r} is not a readable pickle: {type(exc).__name__}: {exc}"
            ) from None
    if isinstance(data, Mapping) and "blobs" in data and isinstance(data["blobs"], Mapping):
        data = data["blobs"]
    if not isinstance(data, Mapping):
        raise Caffe2ConversionError(f"{os.fspath(path)!r} holds a {type(data).__name__}, not a dict of blobs")
    blobs = {}
    for name, value in data.items():
        name = _as_str(name)
        if isinstance(value, (int, float, np.number)):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            kind = type(value).__name__ if not isinstance(value, np.ndarray) else f"array of {value.dtype}"
            raise Caffe2ConversionError(f"{os.fspath(path)!r}: blob {name!r} is a {kind}, not a numeric array")
        blobs[name] = value
    return blobs


def caffe2_name(name: str) -> str | None:
    """The official blob name of a :class:`ResNet3d` state-dict entry (None for BN step counters).

    Raises:
        KeyError: an entry the official networks do not have (e.g. the concatenation mode's ``concat_project``).
    """
    module, _, tensor = name.rpartition(".")
    if tensor == "num_batches_tracked":
        return None
    if module == "conv1" and tensor == "weight":
        return "conv1_w"
    if module == "bn1" and tensor in _BN_SUFFIX:
        return f"res_conv1_bn_{_BN_SUFFIX[tensor]}"
    if module == "head.fc" and tensor in ("weight", "bias"):
        return f"pred_{tensor[0]}"
    match = _BLOCK.match(name)
    if match and match.group(3) in _BRANCH:
        stage, block, part, tensor = match.groups()
        prefix = f"res{stage}_{block}_{_BRANCH[part]}"
        if part.startswith(("conv", "shortcut.conv")) and tensor == "weight":
            return f"{prefix}_w"
        if tensor in _BN_SUFFIX and not part.endswith("conv"):
            return f"{prefix}_{_BN_SUFFIX[tensor]}"
    match = _NONLOCAL.match(name)
    if match:
        stage, block, part, tensor = match.groups()
        prefix = f"nonlocal_conv{stage}_{block}"
        if part in _NL_CONVS and tensor in ("weight", "bias"):
            return f"{prefix}_{part}_{tensor[0]}"
        if part == "norm" and tensor in _BN_SUFFIX:
            return f"{prefix}_bn_{_BN_SUFFIX[tensor]}"
    raise KeyError(f"the official Caffe2 networks have no counterpart of {name!r}")


@dataclass
class Caffe2Conversion:
    """The result of :func:`convert_caffe2_blobs`.

    Attributes:
        state_dict: model entry -> tensor, ready for ``model.load_state_dict``.
        affine: names of the norm layers filled from affine (frozen-BN) blobs.
        skipped: blobs skipped as training state (momentum, lr, iteration).
        left_out: model entries deliberately not filled (``skip`` prefixes), absent from ``state_dict``.
    """

    state_dict: dict[str, Tensor]
    affine: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def convert_caffe2_blobs(blobs: Mapping[str, Any], model: nn.Module, *, skip: tuple[str, ...] = ()) -> Caffe2Conversion:
    """Maps official blobs onto a model's state dict, checking names and shapes both ways.

    Args:
        blobs: name -> array, as :func:`load_caffe2_pickle` returns.
        model: the :class:`ResNet3d` the checkpoint was trained as (same arch, depth, non-local layout).
        skip: prefixes of model entries to leave out (e.g. ``("head.",)`` for a checkpoint without ``pred_*``).

    Returns:
        A :class:`Caffe2Conversion`.

    Raises:
        Caffe2ConversionError: blobs the model has no place for, model entries no blob fills, or shape mismatches.
    """
    target = model.state_dict()
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    result = Caffe2Conversion(state)
    unfilled: list[str] = []
    mismatched: list[str] = []
    affine_modules: set[str] = set()
    no_counterpart: list[str] = []
    for name, tensor in target.items():
        if name.startswith(skip):
            result.left_out.append(name)
            continue
        try:
            blob_name = caffe2_name(name)
        except KeyError:
            no_counterpart.append(name)
            continue
        if blob_name is None:  # num_batches_tracked: a counter, not a weight
            state[name] = torch.zeros_like(tensor)
            continue
        module, _, attr = name.rpartition(".")
        if blob_name not in blobs and attr in ("running_mean", "running_var"):
            # frozen-BN ("affine") file: only the folded scale and shift are there
            prefix = blob_name.rsplit("_", 1)[0]
            if (
                f"{prefix}_s" in blobs
                and f"{prefix}_b" in blobs
                and f"{prefix}_rm" not in blobs
                and f"{prefix}_riv" not in blobs
            ):
                eps = float(getattr(model.get_submodule(module), "eps", 1e-5))
                state[name] = torch.zeros_like(tensor) if attr == "running_mean" else torch.full_like(tensor, 1.0 - eps)
                affine_modules.add(module)
                continue
        if blob_name not in blobs:
            unfilled.append(f"{name} (blob {blob_name})")
            continue
        value = torch.from_numpy(np.ascontiguousarray(np.asarray(blobs[blob_name]))).to(tensor.dtype)
        if blob_name == "pred_w" and value.numel() == tensor.numel() and value.dim() != tensor.dim():
            value = value.reshape(tensor.shape)  # test nets store the classifier as a 1x1x1 conv
        if tuple(value.shape) != tuple(tensor.shape):
            mismatched.append(f"{blob_name} {tuple(value.shape)} -> {name} {tuple(tensor.shape)}")
            continue
        state[name] = value
        used.add(blob_name)
    result.affine = sorted(affine_modules)
    result.skipped = sorted(b for b in blobs if b.endswith("_momentum") or b in TRAINING_STATE)
    unplaced = sorted(set(blobs) - used - set(result.skipped) - _blobs_of_left_out(result.left_out))
    problems = fit_problems(
        "blob",
        "the official networks",
        mismatched,
        unplaced,
        unfilled,
        no_counterpart,
        limit=10,
        shape_hint=" (another arch, depth or class count?)",
    )
    if problems:
        raise Caffe2ConversionError("the checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return result


def _blobs_of_left_out(left_out: list[str]) -> set[str]:
    names = set()
    for name in left_out:
        try:
            blob = caffe2_name(name)
        except KeyError:
            continue
        if blob is not None:
            names.add(blob)
    return names


def _as_str(name: Any) -> str:
    return name.decode("latin1") if isinstance(name, bytes) else str(name)


# --- which registered model a checkpoint is, and its conversion -------------------------------------------------


def infer_caffe2(
    blobs: Mapping[str, Any], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    """Which registered model an official Caffe2 checkpoint's blobs are for, and the options in which the file's
    network differs from it.

    Args:
        blobs: the file's tensors by name.
        meta: what else the file says (``{"cfg": text}`` where it records a config).
        path: the file, named in errors (and read for hints its tensors cannot give).
        model: the user's choice of model; default: worked out from the tensors.

    Raises:
        ConversionError: a network that is none of the registered ones, naming what differs.
    """
    if getattr(blobs.get("conv1_w"), "ndim", 0) != 5:
        raise ConversionError(
            f"{path}: no 5-D conv1_w blob, so not a checkpoint of the official video ResNets "
            f"(its first blobs: {', '.join(list(blobs)[:4]) or 'none'})"
        )
    layers = tuple(_count(blobs, f"res{s}_{{}}_branch2a_w") for s in range(2, 6))
    if model is not None:  # the name is the user's; the width and depth are the file's
        return model, differs(model, layers=layers, width=int(blobs["conv1_w"].shape[0]))
    depth = depth_name(layers, path)
    conv1_kt = blobs["conv1_w"].shape[2]
    inflated_b = any(
        temporal_kernel(blobs, f"res{s}_{i}_branch2b_w", path) > 1
        for s, n in zip(range(2, 6), layers)
        for i in range(n)
        if f"res{s}_{i}_branch2b_w" in blobs
    )
    arch = "c2d" if conv1_kt == 1 else ("i3d3x3x3" if inflated_b else "i3d")
    nl = {
        f"res{s}": tuple(i for i in range(n) if f"nonlocal_conv{s}_{i}_theta_w" in blobs)
        for s, n in zip(range(2, 6), layers)
    }
    nl = {k: v for k, v in nl.items() if v}
    affine = not any(k.endswith("_rm") for k in blobs)
    if not nl:
        prefix = ""
    elif nl == (NL5_R50 if depth == "r50" else NL5_R101):
        prefix = "nl_"
    elif depth == "r50" and nl == NL1_R50:
        prefix = "nl1_"
    elif depth == "r50" and nl == NL10_R50:
        prefix = "nl10_"
    else:
        raise ConversionError(
            f"{path}: non-local blocks at {nl}, not one of the paper's placements; pass --model "
            f"NAME (and --set nonlocal_locations=...)"
        )
    if affine:
        clip = "_128x1"
    elif re.search(r"8x8", path.name):
        clip = "_8x8"
    elif re.search(r"32x2", path.name):
        clip = ""
    else:
        raise ConversionError(
            f"{path}: the 32x2 and 8x8 models have the same tensors and the file name says "
            f"neither; pass --model {prefix}{arch}_{depth} (32x2) or --model "
            f"{prefix}{arch}_{depth}_8x8"
        )
    name = f"{prefix}{arch}_{depth}{clip}"
    try:
        get_model_entry(name)
    except KeyError:
        raise ConversionError(
            f"{path}: looks like {name}, which is not a registered model; pass --model NAME"
        ) from None
    return name, differs(name, layers=layers, width=int(blobs["conv1_w"].shape[0]))


def _count(blobs: Mapping[str, Any], pattern: str) -> int:
    n = 0
    while pattern.format(n) in blobs:
        n += 1
    return n


def convert_caffe2(
    path: Path, blobs: Mapping[str, Any], name: str, options: dict[str, Any], paper_layout: bool
) -> Conversion:
    """``blobs`` into the model ``name`` built with ``options``: the official network's pool1 (unpadded) unless
    ``paper_layout`` or a ``clip`` option says otherwise, filled by :func:`convert_caffe2_blobs`."""
    net = build_model(path, name, options)
    if (
        "clip" not in options
        and not paper_layout
        and net.clip_name in CLIP_LAYOUTS
        and f"{net.clip_name}_official" in CLIP_LAYOUTS
    ):
        options["clip"] = f"{net.clip_name}_official"  # the network the official code ran: pool1 unpadded
        net = build_model(path, name, options)
    try:
        result = convert_caffe2_blobs(blobs, net)
    except Caffe2ConversionError as exc:
        raise ConversionError(f"{path} as {name}: {exc}") from None
    net.load_state_dict(result.state_dict)
    notes = []
    if result.affine:
        notes.append(f"{len(result.affine)} norm layers from affine (frozen-BN) blobs")
    if result.skipped:
        notes.append(f"skipped {len(result.skipped)} training-state blobs")
    return Conversion("caffe2", name, options, net.eval(), result.state_dict, notes)
