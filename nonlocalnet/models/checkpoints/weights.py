"""Model weights in safetensors files: a flat state dict plus string metadata (e.g. the model name) and the
tensors' checksum, verified on read; weights read from any file are checked to be floating and finite."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...checksum import CHECKSUM_KEY, state_checksum
from ...io import UnreadableFile, load_torch_file


def save_weights(
    weights: nn.Module | Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a model's state dict (or any name -> tensor mapping) to a safetensors file.

    Args:
        weights: a model, or a state dict.
        path: the file to write.
        metadata: string key/values stored in the file's header, e.g. ``{"model": "nl_i3d_r50"}``; the tensors'
            checksum is added under ``checksum`` (:func:`~nonlocalnet.checksum.state_checksum`).
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    # safetensors wants contiguous tensors that share no memory
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    bad = {k: v for k, v in (metadata or {}).items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; got {bad!r}")
    save_file(tensors, os.fspath(path), metadata={**dict(metadata or {}), CHECKSUM_KEY: state_checksum(tensors)})


class BadWeights(ValueError):
    """Weights of a dtype that is not floating point, or not finite (:func:`check_weights`)."""

    all_processes = True  # every process of a torchrun job reads the same file: the CLI says it once


# buffers that hold counts, not weights: the one integer tensor a state dict of ours may hold
INTEGER_BUFFERS = ("num_batches_tracked",)


def check_weights(state: Mapping[str, Tensor], what: str, model: nn.Module | None = None) -> None:
    """Raises :class:`BadWeights` naming ``what`` (the file) and the first offending tensor: a dtype that is not
    floating (int8, bool: weights of another kind of file, which torch would silently cast), except where ``model``
    keeps that dtype itself or for a BN step counter, or a value that is NaN or infinite."""
    own = model.state_dict() if model is not None else {}
    for name, tensor in state.items():
        recorded = own.get(name)
        allowed = (
            tensor.is_floating_point()
            or (recorded is not None and tensor.dtype == recorded.dtype)
            or (recorded is None and name.rsplit(".", 1)[-1] in INTEGER_BUFFERS and not tensor.dtype == torch.bool)
        )
        if not allowed:
            raise BadWeights(
                f"{what}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, not "
                f"floating-point weights"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite values"
            raise BadWeights(
                f"{what}: tensor {name!r} holds {kind}; the weights are broken (a diverged run, a bad "
                f"conversion or copy)"
            )


def verify_safetensors_checksum(
    path: str | os.PathLike, state: Mapping[str, Tensor], header: Mapping[str, str]
) -> None:
    """Raises :class:`~nonlocalnet.io.UnreadableFile` when the file records a checksum its tensors do not match."""
    recorded = header.get(CHECKSUM_KEY)
    if recorded is not None and recorded != state_checksum(dict(state)):
        raise UnreadableFile(path, "corrupt: its tensors do not match the checksum written with them")


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
    verify_safetensors_checksum(path, state, read_metadata(path))
    check_weights(state, os.fspath(path), model)
    with torch.no_grad():
        return model.load_state_dict(state, strict=strict)


def load_state_dict_or_raise(
    model: nn.Module,
    state: Mapping[str, Tensor],
    what: str,
    error: type[Exception] = ValueError,
    strict: bool = True,
    source: str | None = None,
):
    """``model.load_state_dict(state)``, a mismatch (other names or shapes) raised as one line: ``error`` with
    ``what``, a colon and the first lines of torch's message; weights of a dtype the model does not keep, or not
    finite, raised likewise naming ``source`` (the file; default ``what``) and the tensor (:func:`check_weights`).
    Returns torch's ``(missing, unexpected)``."""
    try:
        check_weights(state, source or what, model)
    except ValueError as e:
        raise error(str(e)) from None
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        raise error(f"{what}: {' '.join(lines[:3])}{' ...' if len(lines) > 3 else ''}") from None


# where a torch file may hold its state dict: training checkpoints ("model"), and other tools' layouts
STATE_KEYS = ("model", "state_dict", "model_state", "model_state_dict")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights in a file, and what the file says about the model they belong to.

    Reads a safetensors file (its metadata may name the model, "model", and give its options as JSON,
    "model_options"), or a torch file holding a state dict or a dict with one under one of :data:`STATE_KEYS`
    (a training checkpoint, whose "model_name" / "model_options" entries are read too). Torch files are
    read with ``weights_only=True``: tensors and plain containers, no code. DistributedDataParallel's
    "module." prefix is removed.

    Returns:
        (state dict on the CPU, {"model_name": str, "model_options": dict, "converted_from": str} with the
        entries the file has).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFile: the file cannot be read, or reading it would run code (a ValueError).
        ValueError: it holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            header = read_metadata(path)
            state = load_file(os.fspath(path), device="cpu")
            verify_safetensors_checksum(path, state, header)
            if header.get("model"):
                meta["model_name"] = header["model"]
            if "model_options" in header:
                meta["model_options"] = _json_options(header["model_options"], path)
            if header.get("converted_from"):
                meta["converted_from"] = header["converted_from"]
        else:
            loaded = load_torch_file(path)
            state = loaded
            if (
                isinstance(loaded, dict)
                and loaded.get(CHECKSUM_KEY) is not None
                and loaded[CHECKSUM_KEY] != state_checksum(loaded)
            ):
                raise UnreadableFile(path, "corrupt: its content does not match the checksum written with it")
            if isinstance(loaded, dict):
                state = next((loaded[k] for k in STATE_KEYS if isinstance(loaded.get(k), dict)), loaded)
                meta.update({k: loaded[k] for k in ("model_name", "model_options") if k in loaded})
                if isinstance(loaded.get("model"), str):
                    meta["model_name"] = loaded["model"]
    except UnreadableFile as err:
        raise UnreadableFile(path, f"no weights: {err.reason}") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign safetensors file (SafetensorError, ...)
        raise UnreadableFile(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (looked at the file and its {', '.join(STATE_KEYS)} entries)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    check_weights(state, os.fspath(path))
    return state, meta


def _json_options(text: str, path: Path) -> dict[str, Any]:
    """A safetensors file's ``model_options`` metadata: a JSON object of keyword arguments."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, f"its metadata model_options is not JSON ({e.msg}): {text[:80]!r}") from None
    if not isinstance(options, dict):
        raise UnreadableFile(
            path, f"its metadata model_options must be a JSON object of keyword arguments; got {text[:80]!r}"
        )
    return options


def load_model(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    num_classes: int | None = None,
    context: str = "",
    **overrides: Any,
) -> nn.Module:
    """The model a weights file records, rebuilt and filled (eval mode).

    Reads the file with :func:`read_state_dict` (safetensors written by ``nonlocalnet convert`` or by training,
    training checkpoints, bare state dicts), builds the registered model it names with the options it records
    (``nonlocalnet convert`` records what makes a zoo's network compute what it computed there), then
    ``overrides`` on top, and loads every tensor.

    Args:
        path: the weights file.
        name: the registered model expected; default: the one the file names. A file that names another model
            is refused (its tensors may fit and still compute something else).
        num_classes: classifier outputs; default: the file's classifier rows (0, no classifier, for a file
            without one).
        context: appended to the model's name in a mismatch error (e.g. " with data.num_classes=5").
        **overrides: model options replacing the recorded ones.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no model named anywhere, another model than ``name``, an option the model does not take, or
            weights that do not fit (names or shapes); the message names the file.
    """
    from ..registry import create_model, get_model_entry

    state, meta = read_state_dict(path)
    what = os.fspath(path)
    recorded = meta.get("model_name")
    name = get_model_entry(name).name if name else name  # an alias is the name it builds
    if name and recorded and recorded != name:
        raise ValueError(
            f"{what} holds weights of {recorded} (recorded in the file), not {name}: set the model name to {recorded}"
        )
    name = name or recorded
    if not name:
        raise ValueError(f"{what} does not name its model: pass the model name (--model)")
    options = dict(meta.get("model_options") or {})
    options.update(overrides)
    if num_classes is not None:
        options["num_classes"] = num_classes
    elif "num_classes" not in options:  # the file's classifier rows; a file without classifier: none
        fc = state.get("head.fc.weight")
        if fc is not None and fc.dim() != 2:
            raise ValueError(
                f"{what}: tensor 'head.fc.weight' must be 2-D (classes x features); got shape {list(fc.shape)}"
            )
        options["num_classes"] = int(fc.shape[0]) if fc is not None else 0
    try:
        model = create_model(name, **options)
    except TypeError as e:  # an option the model does not take
        raise ValueError(f"{what}: model {name}: {e}") from None
    load_state_dict_or_raise(model, state, f"{what} does not fit {name}{context}")
    model.eval()
    model.nonlocalnet_record = {"model": name, "options": options}  # what was built, for reports
    return model
