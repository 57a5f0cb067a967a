"""Training checkpoints: written atomically (temporary file, then rename), the last k kept."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path

_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")


def checkpoint_path(directory: str | os.PathLike, iteration: int) -> Path:
    return Path(directory) / f"checkpoint_{iteration:09d}.pt"


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

    A crash while writing leaves at most a hidden ``.tmp`` file behind; the previous checkpoints stay intact.
    """
    path = checkpoint_path(directory, iteration)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (or a bare state dict), with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state
