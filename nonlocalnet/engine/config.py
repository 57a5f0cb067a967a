"""Run configurations: YAML files (a path, or a config shipped in the package, :func:`~nonlocalnet.io.find_config`)
on top of the defaults, overridable with ``key=value``.

A config is a nested dict with the sections ``model``, ``data``, ``train``, ``test`` and the top-level
``output_dir`` and ``seed``. A YAML file may name a ``base`` file (relative to itself) that it extends. Command-line
overrides use dotted keys and YAML values: ``train.lr=0.02 train.lr_steps=[100,200] model.name=nl_i3d_r50``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..io import find_config, write_text_atomic

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/default",
    "model": {
        "name": "nl_c2d_r50",
        "options": {},            # keyword overrides of the registered model (num_classes is set from data)
        "pretrained": None,       # a .safetensors / .pt / .pth state dict (2D ImageNet weights are inflated)
    },
    "data": {
        "type": "synthetic",      # "synthetic" (built in), "kinetics" (path label lists), "charades" (multi-label)
        "num_classes": 2,
        "root": None,
        "train_list": None,
        "test_list": None,
        "frames": 8,
        "sampling_rate": 8,
        "train_scale": [256, 320],
        "crop_size": 224,
        "test_scale": 256,
        "test_clips": 10,
        "test_crops": 3,
        "skip_missing": False,
        "workers": 0,
        # built-in data only
        "train_size": 4096,
        "test_size": 1024,
        "image_size": 32,
    },
    "train": {
        "batch_size": 8,          # clips per process
        "iterations": 400000,
        "lr": 0.01,
        "lr_steps": [150000, 300000],
        "lr_gamma": 0.1,
        "warmup_iterations": 0,
        "warmup_factor": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,
        "bn_weight_decay": 0.0,
        "clip_grad_norm": None,
        "amp": False,
        "freeze_bn": False,
        "sync_bn": False,
        "precise_bn_batches": 200,
        "log_every": 20,
        "checkpoint_every": 5000,
        "keep_checkpoints": 3,
        "eval_every": 0,          # iterations between evaluations during training; 0 = only at the end
    },
    "test": {
        "batch_size": 8,
        "fully_convolutional": False,
        "checkpoint": None,
    },
    "device": "auto",
    "progress": True,
}


class ConfigError(ValueError):
    """A config file or override that cannot be used."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The defaults, updated by a YAML file (and the files it extends), then by ``key=value`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            path = find_config(path)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        merge(cfg, _read_yaml_chain(path))
    for item in overrides:
        apply_override(cfg, item)
    check_config(cfg)
    return cfg


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} extends itself through its 'base' chain")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections; got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    out = _read_yaml_chain(path.parent / base, seen + (path.resolve(),))
    merge(out, data, strict=False)  # keys are checked against the defaults once the chain is resolved
    return out


def merge(into: dict[str, Any], update: Mapping[str, Any], where: str = "", strict: bool = True) -> dict[str, Any]:
    """Recursively updates ``into`` with ``update``.

    With ``strict``, unknown keys are an error, except inside ``model.options`` (the model's own keyword
    arguments).
    """
    for key, value in update.items():
        name = f"{where}{key}"
        free = _is_free(name)
        if strict and key not in into and not free and (where or key not in DEFAULTS):
            known = ", ".join(sorted(into))
            raise ConfigError(f"unknown config key {name!r}; known keys{f' of {where[:-1]!r}' if where else ''}: "
                              f"{known}")
        if isinstance(into.get(key), dict) and isinstance(value, Mapping) and not free:
            merge(into[key], value, name + ".", strict)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _is_free(name: str) -> bool:
    return name.startswith("model.options.")


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """Applies one ``dotted.key=value`` override; the value is parsed as YAML (numbers, lists, null, ...)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.02)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[:i + 1])
        if part not in node and _is_free(here):
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"override {item!r}: {here!r} is not a config section")
        node = node[part]
    where = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
    merge(node, {parts[-1]: value}, where)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raises ConfigError for values that cannot work, naming the key."""
    data, train = cfg["data"], cfg["train"]
    if data["type"] not in ("synthetic", "kinetics", "charades"):
        raise ConfigError(f"data.type must be 'synthetic', 'kinetics' or 'charades'; got {data['type']!r}")
    if data["type"] != "synthetic":
        for key in ("root", "train_list", "test_list"):
            if not data[key]:
                raise ConfigError(f"data.type={data['type']!r} needs data.{key}")
    for key in ("batch_size", "iterations"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer; got {train[key]!r}")
    steps = list(train["lr_steps"])
    if steps != sorted(steps):
        raise ConfigError(f"train.lr_steps must be increasing; got {steps}")
    if not isinstance(cfg["test"]["batch_size"], int) or cfg["test"]["batch_size"] < 1:
        raise ConfigError(f"test.batch_size must be a positive integer; got {cfg['test']['batch_size']!r}")


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))


def to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
