"""The number of classes of a run: ``data.num_classes``, or the training list's when the config leaves it null."""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Mapping
from typing import Any

from ..data import is_multi_label
from ..data.video_list import read_video_list
from .config import ConfigError

log = logging.getLogger("nonlocalnet")


def classes_in_list(data: Mapping[str, Any]) -> int:
    """The number of classes of the config's training list: its largest label + 1 (labels count from 0)."""
    entries = read_video_list(data["train_list"], num_classes=sys.maxsize, multi_label=is_multi_label(data))
    return 1 + max(max(label) if isinstance(label, tuple) else label for _, label in entries)


def resolve_num_classes(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config with ``data.num_classes`` set from the training list when it is null (the config itself
    otherwise)."""
    data = cfg["data"]
    if data["type"] == "synthetic" or data["num_classes"] is not None:
        return cfg
    resolved = copy.deepcopy(dict(cfg))
    resolved["data"]["num_classes"] = classes_in_list(data)
    log.info("data.num_classes=%d, from the labels of %s", resolved["data"]["num_classes"], data["train_list"])
    return resolved


def check_num_classes(cfg: Mapping[str, Any]) -> None:
    """Refuses a ``data.num_classes`` other than the training list's number of classes: a 400-way classifier on a
    2-class list would score 398 classes that never occur, and say nothing.

    Raises:
        ConfigError: naming both numbers and the two ways out.
    """
    data = cfg["data"]
    if data["type"] == "synthetic":
        return
    found = classes_in_list(data)
    if data["num_classes"] != found:
        raise ConfigError(
            f"data.num_classes is {data['num_classes']} but the training list {data['train_list']} "
            f"has {found} classes (labels 0 to {found - 1}); set data.num_classes={found}, or "
            f"data.num_classes=null to take it from the list"
        )
