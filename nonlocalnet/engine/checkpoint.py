"""Training checkpoints: written atomically (temporary file, then rename), the last k kept, read without running
code (``torch.load(weights_only=True)``), and on resume the newest *readable* one is used."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..io import UnreadableFile, atomic_path, load_torch_file

log = logging.getLogger("nonlocalnet")

_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, foreign, or a pickle that would run code."""


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> Path:
    return Path(directory) / f"checkpoint_{iteration:09d}.pt"


def checkpoint_iteration(path: str | os.PathLike) -> int | None:
    """The iteration in a checkpoint's file name, None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``directory``, oldest first (partial ``.tmp`` files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)))
    return [p for _, p in found]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, iteration: int, keep: int = 3) -> Path:
    """Writes ``state`` as ``checkpoint_<iteration>.pt`` atomically and deletes all but the newest ``keep``.

    A crash while writing leaves at most a hidden ``.tmp`` file behind (:func:`remove_debris` clears it); the
    previous checkpoints stay intact. Only checkpoints older than this one are rotated away, so the file just
    written is never deleted.
    """
    path = checkpoint_path(directory, iteration)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep > 0:
        older = [p for p in list_checkpoints(directory) if checkpoint_iteration(p) <= iteration]
        for old in older[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (or a bare state dict), with a clear error.

    Only tensors and plain containers are read (``weights_only=True``): a file whose pickle would run code is
    refused, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        state = load_torch_file(path)
    except UnreadableFile as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def newest_readable_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None,
                                                                      list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that reads, skipping unreadable ones (a kill during a write on a
    file system without atomic rename, a truncated copy, a full disk).

    Returns:
        (path, state, [(unreadable path, reason), ...]); (None, None, [...]) when none reads.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, None, skipped


def set_aside(path: Path) -> Path:
    """Renames an unreadable checkpoint to ``<name>.unreadable`` (kept for inspection, out of the rotation)."""
    target = path.with_name(path.name + UNREADABLE_SUFFIX)
    os.replace(path, target)
    return target


def remove_debris(directory: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files an interrupted atomic write left in ``directory`` (not recursively)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp")]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
