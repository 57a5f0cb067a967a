"""Detection run configs: one YAML file with three sections, ``model``, ``data`` and ``train``.

``model`` holds the arguments of :func:`~nonlocalnet.detection.builders.build_detector`; ``data`` and ``train``
are checked here against :data:`DATA_DEFAULTS` and :data:`TRAIN_DEFAULTS` (an unknown key is an error that names
it). Files live in ``configs/coco/``; a config is named by path or by file stem (``tiny_shapes``). Values can
be overridden from the command line as ``section.key=value`` (the value is read as YAML).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..io import find_config

SECTIONS = ("model", "data", "train")

DATA_DEFAULTS: dict[str, Any] = {
    # a built-in dataset drawn on the fly ("shapes" or "figures"), or None for files on disk
    "builtin": None,
    "num_train": 512,
    "num_val": 128,
    "image_size": 128,
    "seed": 0,
    # COCO-format files on disk; relative paths are under root
    "root": None,
    "train_images": None,
    "train_annotations": None,
    "val_images": None,
    "val_annotations": None,
    # per-keypoint OKS sigmas for keypoint AP; None = COCO's 17
    "kpt_oks_sigmas": None,
}

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 12,
    "lr": 0.02,  # at lr_reference_batch images per step; scaled linearly with the real batch
    "lr_reference_batch": 16,
    "lr_steps": [8, 11],  # epochs after which the lr is multiplied by lr_gamma
    "lr_gamma": 0.1,
    "batch_size": 2,  # images per process
    "momentum": 0.9,
    "weight_decay": 1.0e-4,
    "warmup_iters": 1000,
    "warmup_factor": 0.001,
    "hflip": 0.5,
    "workers": 4,
    "print_freq": 20,
    "amp": False,  # mixed precision (CUDA only)
    "sync_bn": False,  # SyncBatchNorm for NL blocks with norm "batch" under DDP
    "seed": 0,
}


def resolve_config_path(name: str | Path) -> Path:
    """A config file by path, or a shipped detection config by stem ("tiny_shapes")."""
    return find_config(name, folder="coco")


def load_config(name: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a config, apply ``section.key=value`` overrides, fill defaults and check every key."""
    path = resolve_config_path(name)
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config is a mapping with sections {SECTIONS}")
    config = apply_overrides(raw, overrides)
    return complete_config(config, source=str(path))


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (value parsed as YAML) in a copy of ``config``."""
    config = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        parts = key.split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise ValueError(f"override {item!r}: the key must start with one of {', '.join(SECTIONS)} "
                             "and name a key inside it")
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return config


def complete_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Fill the data / train defaults and check that no section or key is unknown."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; expected {', '.join(SECTIONS)}")
    if "model" not in config or not isinstance(config["model"], dict):
        raise ValueError(f"{source}: needs a 'model' section")
    out = {"model": copy.deepcopy(config["model"])}
    for section, defaults in (("data", DATA_DEFAULTS), ("train", TRAIN_DEFAULTS)):
        given = dict(config.get(section) or {})
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"{source}: unknown {section} option(s) {unknown}; expected some of {sorted(defaults)}")
        out[section] = {**copy.deepcopy(defaults), **given}
    data = out["data"]
    if data["builtin"] is None and not (data["val_annotations"] and data["val_images"]):
        raise ValueError(f"{source}: data needs either 'builtin' or val_images + val_annotations (and for "
                         "training train_images + train_annotations)")
    return out
