"""Detection run configs: the schema that :mod:`nonlocalnet.engine.config`, the one config loader, reads them with.

A config has the sections ``model``, ``data``, ``train`` and ``test`` and, as a video config, the top-level
``output_dir`` (the run folder), ``device`` and ``progress``. ``model`` holds the arguments of
:func:`~nonlocalnet.detection.builders.build_detector` (checked when the detector is built; ``model.task`` here;
``model.backbone_weights`` a local torchvision ResNet state dict to start from); ``data``, ``train`` and ``test``
hold the keys of :data:`DATA_DEFAULTS`, :data:`TRAIN_DEFAULTS` and :data:`TEST_DEFAULTS` (an unknown key, or a
value of another type, is an error that names it). Files live in ``configs/coco/``; a config is named by path or
by file stem (``tiny_shapes``), may extend another with ``base:``, and takes the ``key=value`` overrides of
every command (``train.epochs=2 model.backbone_nonlocal=null``, values read as YAML).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..engine.config import AMP_CHOICES, ConfigError, ConfigSchema, Items, Range, build_config, check_steps
from ..engine.config import load_config as _load_config
from .builders import TASKS
from .synthetic import BUILTIN_KINDS

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
    "log_every": 20,  # iterations between log rows and log lines
    "eval_every": 1,  # epochs between evaluations on the val set (and always at the end)
    "keep_checkpoints": 3,  # checkpoints are written at the end of every epoch; this many are kept (0: all)
    "max_iters_per_epoch": None,  # cut every epoch to this many iterations (a short first run)
    # mixed precision: false, bf16, fp16, or true (the policy of nonlocalnet.engine.precision, CPUs included)
    "amp": False,
    "sync_bn": False,  # SyncBatchNorm for NL blocks with norm "batch" under DDP
    "seed": 0,
}

TEST_DEFAULTS: dict[str, Any] = {
    "at_end": True,  # evaluate the final model when training ends (false: stop after model_final)
}


def _check(cfg: Mapping[str, Any]) -> None:
    task = cfg["model"].get("task")
    if task not in TASKS:
        raise ConfigError(f"model.task must be one of {', '.join(TASKS)}; got {task!r}")
    data = cfg["data"]
    if data["builtin"] is not None and data["builtin"] not in BUILTIN_KINDS:
        raise ConfigError(f"data.builtin must be one of {', '.join(BUILTIN_KINDS)} or null; got {data['builtin']!r}")
    if data["builtin"] is None and not (data["val_annotations"] and data["val_images"]):
        raise ConfigError(
            "data needs either 'builtin' or val_images + val_annotations (and for training "
            "train_images + train_annotations)"
        )
    if (
        cfg["train"]["amp"] not in AMP_CHOICES
        or isinstance(cfg["train"]["amp"], (int, float))
        and not isinstance(cfg["train"]["amp"], bool)
    ):
        raise ConfigError(f"train.amp must be false, bf16, fp16 or true; got {cfg['train']['amp']!r}")
    cut = cfg["train"]["max_iters_per_epoch"]
    if cut is not None and (isinstance(cut, bool) or not isinstance(cut, int) or cut < 1):
        raise ConfigError(f"train.max_iters_per_epoch must be a positive integer or null; got {cut!r}")
    check_steps(cfg, "train.lr_steps", "epochs")


SCHEMA = ConfigSchema(
    {
        "output_dir": "runs/detection",
        "model": {},
        "data": DATA_DEFAULTS,
        "train": TRAIN_DEFAULTS,
        "test": TEST_DEFAULTS,
        "device": "auto",
        "progress": True,
    },
    free=("model",),
    untyped=("train.amp", "train.max_iters_per_epoch"),
    positive=(
        "data.num_train",
        "data.num_val",
        "data.image_size",
        "train.epochs",
        "train.lr_reference_batch",
        "train.batch_size",
        "train.log_every",
    ),
    non_negative=(
        "train.lr",
        "train.lr_gamma",
        "train.momentum",
        "train.weight_decay",
        "train.warmup_iters",
        "train.warmup_factor",
        "train.workers",
        "train.eval_every",
        "train.keep_checkpoints",
    ),
    check=_check,
    folder="coco",
    ranges={
        "train.lr_gamma": Range(0, 1, low_open=True),
        "train.warmup_factor": Range(0, 1),
        "train.momentum": Range(0, 1),
        "train.hflip": Range(0, 1),
        "train.seed": Range(0, 2**63 - 1),
        "data.seed": Range(0, 2**63 - 1),
        "train.workers": Range(0, 1024),
    },
    items={
        "train.lr_steps": Items("int", Range(0)),
        "data.kpt_oks_sigmas": Items("number", Range(0, low_open=True), 1),
    },
    optional={
        "data.builtin": (str,),
        "data.root": (str,),
        "data.train_images": (str,),
        "data.train_annotations": (str,),
        "data.val_images": (str,),
        "data.val_annotations": (str,),
    },
)


def load_config(name: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A detection config file (a path, or a shipped config's stem) with ``key=value`` overrides, complete and
    checked (:func:`nonlocalnet.engine.config.load_config` with :data:`SCHEMA`)."""
    return _load_config(name, tuple(overrides), SCHEMA)


def complete_config(config: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A detection config given as a mapping (e.g. the one a checkpoint recorded), with ``key=value`` overrides,
    its defaults filled in and checked."""
    return build_config(config, overrides, SCHEMA)
