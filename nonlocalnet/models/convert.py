"""Other zoos' checkpoints into nonlocalnet models: the official Caffe2 pickles, PyTorchVideo and mmaction2.

``convert_checkpoint(path)`` recognises the format from the file, works out which nonlocalnet model computes
what the zoo's network computes (a registered name plus the options that differ), maps every tensor and
refuses any tensor it cannot place and any model entry left unfilled. ``nonlocalnet convert`` writes the result
as safetensors whose metadata records the model and its options; :func:`~nonlocalnet.models.load_model` builds
it back.

| format | how it is recognised | becomes |
|---|---|---|
| caffe2 | a pickle of ``{'blobs': {name: ndarray}}`` (or flat), read by an unpickler that admits only NumPy arrays | the paper's ``[nl_]{c2d,i3d}_r{50,101}[_8x8]`` (official pool1 layout) or ``*_128x1`` (affine files) |
| pytorchvideo | a torch file with ``model_state`` (a ``.pyth``) or a bare state dict of ``blocks.0.conv.weight`` ... | ``c2d_r50_8x8``, ``i3d_r50_8x8``, ``slow_r50_8x8``, with PyTorchVideo's windowed head pool |
| mmaction2 | a torch file with ``state_dict`` of ``backbone.*`` and ``cls_head.fc_cls.*`` | ``mmaction2_i3d_r50``, ``mmaction2_nl_i3d_r50_{dot_product,embedded_gaussian,gaussian}`` |

Where the zoo's network differs from the paper's, the conversion carries the difference (mmaction2's pool1 of
temporal kernel 1, its blocks without scale that pool after the φ/g convs, PyTorchVideo's head), so the
converted model reproduces the zoo's outputs. Two things cannot be read from tensors alone and are taken from the
file's name or its recorded config, else asked for with ``--model``: the clip layout of a Caffe2 checkpoint
(the 32x2 and 8x8 models have the same tensors) and whether an mmaction2 block is a dot product or an embedded
gaussian (the same tensors again). Torch files are read with ``weights_only=True``; no file can run code.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..io import load_torch_file
from .caffe2 import fit_problems
from .placements import NL1_R50, NL5_R50, NL5_R101, NL10_R50, R50_LAYERS, R101_LAYERS, STAGES
from .registry import create_model, get_model_entry, model_defaults
from .resnet3d import i3d_inflated_blocks, slow_inflated_blocks

FORMATS = ("caffe2", "pytorchvideo", "mmaction2")
# what a torch file written with _use_new_zipfile_serialization=False (torch < 1.6) starts with: the pickled
# magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# the windowed average of PyTorchVideo's hub heads (head_pool_kernel_size of pytorchvideo/models/hub/resnet.py)
PYTORCHVIDEO_HEAD_POOL = {"c2d_r50_8x8": (4, 7, 7), "i3d_r50_8x8": (4, 7, 7), "slow_r50_8x8": (8, 7, 7)}
# the Kinetics-400 top-1 each zoo reports for its checkpoints (PAPER.md); the docs' zoo page is generated from it
ZOO_TOP1 = {
    "caffe2": {
        "c2d_r50": 72.0,
        "nl_c2d_r50": 73.9,
        "i3d_r50": 73.6,
        "nl_i3d_r50": 74.9,
        "i3d_r50_128x1": 75.2,
        "nl_i3d_r50_128x1": 76.5,
        "c2d_r50_8x8": 71.9,
        "nl_c2d_r50_8x8": 74.4,
        "i3d_r50_8x8": 73.4,
        "nl_i3d_r50_8x8": 74.7,
    },
    "pytorchvideo": {"c2d_r50_8x8": 71.46, "i3d_r50_8x8": 73.27, "slow_r50_8x8": 74.58},
    "mmaction2": {
        "mmaction2_i3d_r50": 73.47,
        "mmaction2_nl_i3d_r50_dot_product": 74.80,
        "mmaction2_nl_i3d_r50_embedded_gaussian": 74.73,
        "mmaction2_nl_i3d_r50_gaussian": 73.97,
    },
}


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


def detect_format(path: str | os.PathLike) -> str:
    """The zoo a checkpoint file comes from: "caffe2", "pytorchvideo" or "mmaction2".

    Raises:
        FileNotFoundError: no such file.
        ConversionError: a file of none of these zoos (the message says what it holds).
    """
    return _read(Path(path))[0]


def convert_checkpoint(
    path: str | os.PathLike,
    *,
    source_format: str = "auto",
    model: str | None = None,
    num_classes: int | None = None,
    skip_classifier: bool = False,
    paper_layout: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> Conversion:
    """Converts a checkpoint of another zoo into the nonlocalnet model that computes the same function.

    Args:
        path: the checkpoint (.pkl, .pyth, .pth).
        source_format: "auto" (recognised from the file) or one of :data:`FORMATS`.
        model: the registered model to convert into; default: worked out from the tensors (and, where tensors
            cannot tell, the file name or the config recorded in the file).
        num_classes: classifier outputs; default: the checkpoint's classifier rows.
        skip_classifier: leave the classifier out (a checkpoint without one, or one to fine-tune on other
            classes): the model is built with ``num_classes=0`` and the file's classifier, if any, is dropped.
        paper_layout: (caffe2) build the paper's pool1 padding instead of the official network's.
        overrides: more model options (e.g. ``{"layers": (3, 4, 6, 3)}``).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: an unknown format, a tensor with no place in the model, a model entry no tensor
            fills, or shapes that differ.
    """
    path = Path(path)
    if model is not None:
        get_model_entry(model)  # an unknown name fails here, with the closest names, before the file is read
    found, payload, meta = _read(path)
    if source_format != "auto":
        if source_format not in FORMATS:
            raise ConversionError(f"unknown source format {source_format!r}; expected auto or {', '.join(FORMATS)}")
        if source_format != found:
            raise ConversionError(
                f"{path} is a {found} checkpoint, not {source_format} (nonlocalnet convert "
                f"recognises the format itself)"
            )
    if paper_layout and found != "caffe2":
        raise ConversionError(f"--paper-layout applies to the official Caffe2 checkpoints; {path} is {found}'s")
    options = dict(overrides or {})
    # what the file says about its network (width, head, block options) holds whatever name it is built as
    name, inferred = _INFER[found](payload, meta, path, model)
    options = {**inferred, **options}
    if num_classes is None and "num_classes" in options:
        num_classes = options["num_classes"]  # --set num_classes=N, as --num-classes N
    source = _SOURCE[found](payload, path) if found in _SOURCE else None  # caffe2 maps by its own table
    classifier = "pred_w" if source is None else source("head.fc.weight")
    if skip_classifier:
        num_classes = 0  # a model without classifier: load_pretrained fills one of any size, fresh
        payload = {k: v for k, v in payload.items() if not _is_classifier(found, k, classifier)}
    elif num_classes is None and classifier in payload:
        num_classes = int(payload[classifier].shape[0])
    if num_classes is not None:
        options["num_classes"] = num_classes
    if found == "caffe2":
        return _convert_caffe2(path, payload, name, options, paper_layout)
    net = _build(path, name, options)
    state, notes = _map(path, found, payload, net, name, source)
    net.load_state_dict(state)
    if found == "mmaction2" and name in UNSCALED_SOFTMAX:
        notes.append(UNSCALED_NOTE)
        if not _warned:
            _warned.append(name)
            log.warning("%s: %s", path, UNSCALED_NOTE)
    return Conversion(found, name, options, net.eval(), state, notes)


def _is_classifier(fmt: str, key: str, classifier: str) -> bool:
    if fmt == "caffe2":
        return key in ("pred_w", "pred_b")
    return key.rsplit(".", 1)[0] == classifier.rsplit(".", 1)[0]


# --- reading ---------------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(format, tensors by name, {"cfg": text, ...} what else the file says)."""
    if path.is_dir():
        raise ConversionError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        raise ConversionError(
            f"{path} is a safetensors file, already nonlocalnet's format: load it with "
            f"nonlocalnet.models.load_model (or model.pretrained)"
        )
    with open(path, "rb") as f:
        start = f.read(16)
    # torch.save writes zip archives (older torch: a pickle that opens with its magic number); the Caffe2
    # checkpoints are bare pickles of arrays
    if not (start.startswith(b"PK\x03\x04") or start.startswith(_LEGACY_TORCH) or zipfile.is_zipfile(path)):
        from .caffe2 import Caffe2ConversionError, load_caffe2_pickle

        try:
            return "caffe2", load_caffe2_pickle(path), {}
        except Caffe2ConversionError as err:
            raise ConversionError(f"{path} is neither a torch file nor a Caffe2 pickle of arrays: {err}") from None
    loaded = load_torch_file(path)
    meta: dict[str, Any] = {}
    state = loaded
    if isinstance(loaded, dict):
        for key in ("model_state", "state_dict"):  # PyTorchVideo / PySlowFast, mmaction2 / mmengine
            if isinstance(loaded.get(key), dict):
                state = loaded[key]
                break
        if isinstance(loaded.get("meta"), dict) and isinstance(loaded["meta"].get("cfg"), str):
            meta["cfg"] = loaded["meta"]["cfg"]
        if isinstance(loaded.get("cfg"), str):
            meta["cfg"] = loaded["cfg"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        top = ", ".join(map(str, list(loaded)[:6])) if isinstance(loaded, dict) else type(loaded).__name__
        raise ConversionError(f"{path} holds no state dict of tensors (its entries: {top})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "blocks.0.conv.weight" in state:
        return "pytorchvideo", state, meta
    if "backbone.conv1.conv.weight" in state:
        return "mmaction2", state, meta
    if any(k.startswith("blocks.") for k in state):
        raise ConversionError(
            f"{path}: a PyTorchVideo network that is not one of its ResNets (c2d_r50, i3d_r50, "
            f"slow_r50; no blocks.0.conv.weight stem): X3D, SlowFast, MViT and the others are "
            f"not networks nonlocalnet builds"
        )
    if "conv1.weight" in state and any(k.startswith("res2.") for k in state):
        raise ConversionError(
            f"{path} is already a nonlocalnet state dict: load it with "
            f"nonlocalnet.models.load_model (or model.pretrained)"
        )
    raise ConversionError(
        f"{path}: not a checkpoint of a zoo nonlocalnet converts (caffe2, pytorchvideo: "
        f"blocks.0.conv.weight, mmaction2: backbone.conv1.conv.weight); its first tensors: "
        f"{', '.join(list(state)[:4]) or 'none'}"
    )


# --- which model ---------------------------------------------------------------------------------------------


def _depths(state: Mapping[str, Any], pattern: str, stages: tuple[int, ...] = (1, 2, 3, 4)) -> tuple[int, ...]:
    """Blocks per stage: how many of ``pattern.format(stage=s, index=0, 1, ...)`` are present, for each s."""
    depths = []
    for stage in stages:
        n = 0
        while pattern.format(stage=stage, index=n) in state:
            n += 1
        depths.append(n)
    return tuple(depths)


def _depth_name(layers: tuple[int, ...], path: Path) -> str:
    if layers == R50_LAYERS:
        return "r50"
    if layers == R101_LAYERS:
        return "r101"
    raise ConversionError(
        f"{path}: a ResNet with {layers} blocks per stage, neither R50 nor R101; pass --model NAME and --set layers=..."
    )


def _temporal_kernel(state: Mapping[str, Any], key: str, path: Path | None) -> int:
    """The temporal kernel of the 3D convolution weight ``key`` (out, in, t, h, w); a ConversionError naming the
    file, the key and its shape for anything else (a 2-D stem or branch: a damaged or foreign file)."""
    shape = tuple(getattr(state[key], "shape", ()))
    if len(shape) != 5:
        raise ConversionError(
            f"{path}: {key} must be a 5-D convolution weight (out, in, t, h, w); got shape {list(shape)}"
        )
    return int(shape[2])


def _kernels(
    state: Mapping[str, Any],
    layers: tuple[int, ...],
    pattern: str,
    stages: tuple[int, ...] = (1, 2, 3, 4),
    path: Path | None = None,
) -> dict[str, tuple[int, ...]]:
    """stage -> blocks whose ``pattern`` conv has a temporal kernel > 1."""
    return {
        name: tuple(i for i in range(n) if _temporal_kernel(state, pattern.format(stage=s, index=i), path) > 1)
        for name, s, n in zip(STAGES, stages, layers)
    }


def _differs(name: str, **inferred: Any) -> dict[str, Any]:
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


def _pytorchvideo_layout(state: Mapping[str, Any], path: Path) -> tuple[list[int], int | None]:
    """Which ``blocks.{i}`` of a PyTorchVideo ResNet are res2..res5 and which is the head: the stage-1 pool of the
    C2D / I3D hub models is a block of its own (no tensors), so the numbering differs between models."""
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.res_blocks\.", k))})
    heads = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.proj\.weight$", k))})
    if len(stages) != 4:
        raise ConversionError(f"{path}: a PyTorchVideo network with {len(stages)} residual stages, not a ResNet's 4")
    return stages, (heads[0] if heads else None)


def _infer_pytorchvideo(
    state: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    stages, _ = _pytorchvideo_layout(state, path)
    conv_a = "blocks.{stage}.res_blocks.{index}.branch2.conv_a.weight"
    layers = _depths(state, conv_a, tuple(stages))
    stem_kt = _temporal_kernel(state, "blocks.0.conv.weight", path)
    inflated = _kernels(state, layers, conv_a, tuple(stages), path)
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
    options = _differs(name, layers=layers, width=int(state["blocks.0.conv.weight"].shape[0]))
    options["head_pool_kernel"] = PYTORCHVIDEO_HEAD_POOL.get(detected or "", (4, 7, 7))
    return name, options


def _nl_locations(state: Mapping[str, Any], layers: tuple[int, ...], pattern: str) -> dict[str, tuple[int, ...]]:
    return {
        stage: tuple(i for i in range(n) if pattern.format(stage=s, index=i) in state)
        for s, (stage, n) in enumerate(zip(STAGES, layers), start=1)
    }


def _infer_mmaction2(
    state: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    layers = _depths(state, "backbone.layer{stage}.{index}.conv1.conv.weight")
    if model is None and layers != R50_LAYERS:
        raise ConversionError(
            f"{path}: an mmaction2 ResNet3d with {layers} blocks per stage; nonlocalnet "
            f"registers its R50 networks: pass --model NAME (with --set layers=...)"
        )
    nl = _nl_locations(state, layers, "backbone.layer{stage}.{index}.non_local_block.g.0.conv.weight")
    inflated = _kernels(state, layers, "backbone.layer{stage}.{index}.conv1.conv.weight", path=path)
    conv1_kt = _temporal_kernel(state, "backbone.conv1.conv.weight", path)
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
    options = _differs(
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


def _infer_caffe2(
    blobs: Mapping[str, Any], meta: Mapping[str, Any], path: Path, model: str | None = None
) -> tuple[str, dict]:
    if getattr(blobs.get("conv1_w"), "ndim", 0) != 5:
        raise ConversionError(
            f"{path}: no 5-D conv1_w blob, so not a checkpoint of the official video ResNets "
            f"(its first blobs: {', '.join(list(blobs)[:4]) or 'none'})"
        )
    layers = tuple(_count(blobs, f"res{s}_{{}}_branch2a_w") for s in range(2, 6))
    if model is not None:  # the name is the user's; the width and depth are the file's
        return model, _differs(model, layers=layers, width=int(blobs["conv1_w"].shape[0]))
    depth = _depth_name(layers, path)
    conv1_kt = blobs["conv1_w"].shape[2]
    inflated_b = any(
        _temporal_kernel(blobs, f"res{s}_{i}_branch2b_w", path) > 1
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
    return name, _differs(name, layers=layers, width=int(blobs["conv1_w"].shape[0]))


def _count(blobs: Mapping[str, Any], pattern: str) -> int:
    n = 0
    while pattern.format(n) in blobs:
        n += 1
    return n


_INFER: dict[str, Callable[..., tuple[str, dict]]] = {
    "caffe2": _infer_caffe2,
    "pytorchvideo": _infer_pytorchvideo,
    "mmaction2": _infer_mmaction2,
}
_STEM = {"caffe2": "conv1_w", "pytorchvideo": "blocks.0.conv.weight", "mmaction2": "backbone.conv1.conv.weight"}


# --- mapping -----------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv_[abc]|bn_[abc]|shortcut\.conv|shortcut\.bn)\.(\w+)$")
_NL = re.compile(r"^res([2-5])\.nl(\d+)\.(theta|phi|g|out|norm)\.(\w+)$")
# zoo entries that may be absent because the zoo's layer has no bias there (mmcv's W_z conv before its BN): the
# zoo computes what a zero bias computes
_ZERO_IF_ABSENT = re.compile(r"\.non_local_block\.conv_out\.conv\.bias$")


def _pytorchvideo_source(state: Mapping[str, Any], path: Path) -> Callable[[str], str | None]:
    """model entry -> the PyTorchVideo ``create_resnet`` entry it comes from (None: no counterpart)."""
    stages, head = _pytorchvideo_layout(state, path)

    renamed = {
        "conv1.": "blocks.0.conv.",
        "bn1.": "blocks.0.norm.",
        "head.fc.": f"blocks.{head if head is not None else stages[-1] + 1}.proj.",
    }

    def source(key: str) -> str | None:
        if (theirs := _renamed(key, renamed)) is not None:
            return theirs
        if m := _BLOCK.match(key):
            stage, index, part, attr = m.groups()
            part = {"shortcut.conv": "branch1_conv", "shortcut.bn": "branch1_norm"}.get(
                part, f"branch2.{part.replace('bn_', 'norm_')}"
            )
            return f"blocks.{stages[int(stage) - 2]}.res_blocks.{index}.{part}.{attr}"
        return None

    return source


def _mmaction2_source(state: Mapping[str, Any], path: Path) -> Callable[[str], str | None]:
    """model entry -> the mmaction2 ``Recognizer3D`` (ResNet3d + I3DHead) entry it comes from."""
    return _mmaction2_entry


_MMACTION2_RENAMED = {"conv1.": "backbone.conv1.conv.", "bn1.": "backbone.conv1.bn.", "head.fc.": "cls_head.fc_cls."}


def _renamed(key: str, prefixes: Mapping[str, str]) -> str | None:
    """``key`` with its prefix replaced by the zoo's, for the first of ``prefixes`` it starts with."""
    for ours, theirs in prefixes.items():
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return None


def _mmaction2_entry(key: str) -> str | None:
    if (theirs := _renamed(key, _MMACTION2_RENAMED)) is not None:
        return theirs
    if m := _BLOCK.match(key):
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
    if m := _NL.match(key):  # mmaction2's NL blocks are mmcv's NonLocal3d with sub_sample=True
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


_SOURCE = {"pytorchvideo": _pytorchvideo_source, "mmaction2": _mmaction2_source}


def _map(
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


def _build(path: Path, name: str, options: Mapping[str, Any]) -> nn.Module:
    try:
        return create_model(name, **options)
    except (TypeError, ValueError) as exc:  # an option the model does not take, or a bad value
        raise ConversionError(f"{path} as {name}: {exc}") from None


def _convert_caffe2(
    path: Path, blobs: Mapping[str, Any], name: str, options: dict[str, Any], paper_layout: bool
) -> Conversion:
    from .caffe2 import Caffe2ConversionError, convert_caffe2_blobs
    from .resnet3d import CLIP_LAYOUTS

    net = _build(path, name, options)
    if (
        "clip" not in options
        and not paper_layout
        and net.clip_name in CLIP_LAYOUTS
        and f"{net.clip_name}_official" in CLIP_LAYOUTS
    ):
        options["clip"] = f"{net.clip_name}_official"  # the network the official code ran: pool1 unpadded
        net = _build(path, name, options)
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
