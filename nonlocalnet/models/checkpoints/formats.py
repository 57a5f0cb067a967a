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

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ...io import load_torch_file
from ..registry import get_model_entry
from .caffe2 import Caffe2ConversionError, convert_caffe2, infer_caffe2, load_caffe2_pickle
from .mapping import Conversion, ConversionError, build_model, map_state
from .mmaction2 import infer_mmaction2, mmaction2_source, unscaled_note
from .pytorchvideo import infer_pytorchvideo, pytorchvideo_source

FORMATS = ("caffe2", "pytorchvideo", "mmaction2")
# what a torch file written with _use_new_zipfile_serialization=False (torch < 1.6) starts with: the pickled
# magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
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
# the per-source steps: which registered model a file is (with the options that differ), and the zoo's entry each
# model entry comes from (Caffe2 maps by its own blob table, in convert_caffe2)
_INFER: dict[str, Callable[..., tuple[str, dict]]] = {
    "caffe2": infer_caffe2,
    "pytorchvideo": infer_pytorchvideo,
    "mmaction2": infer_mmaction2,
}
_SOURCE = {"pytorchvideo": pytorchvideo_source, "mmaction2": mmaction2_source}


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
        return convert_caffe2(path, payload, name, options, paper_layout)
    net = build_model(path, name, options)
    state, notes = map_state(path, found, payload, net, name, source)
    net.load_state_dict(state)
    if found == "mmaction2" and (note := unscaled_note(path, name)):
        notes.append(note)
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
