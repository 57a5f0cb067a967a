"""Training checkpoints: written atomically (temporary file, then rename), the last k kept, read without running
code (``torch.load(weights_only=True)``), verified against the checksum written inside them
(:func:`state_checksum`), and on resume the newest *readable* one is used.

The training loop (:mod:`~nonlocalnet.engine.loop`) writes every task's here, as
``checkpoints/checkpoint_<iteration>.pt`` (:func:`save_checkpoint`); a resume loads its state back with
:func:`restore_training_state`."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checksum import CHECKSUM_KEY, state_checksum
from ..io import UnreadableFile, atomic_path, load_torch_file
from ..models.checkpoints.weights import load_state_dict_or_raise
from .distributed import DistInfo, set_rng_state
from .signals import deferred

log = logging.getLogger("nonlocalnet")

_NAME = re.compile(r"^checkpoint_(\d{9})\.pt$")
UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt (checksum), foreign, or a pickle that would
    run code."""

    all_processes = True  # every process of a torchrun job reads the same checkpoint: the CLI says it once


def verify_checksum(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raises :class:`CheckpointError` when ``state`` carries a checksum that its content does not match (a
    file changed after it was written: a flipped bit, a bad copy). A state without one (written by an older
    version, or by another tool) passes."""
    recorded = state.get(CHECKSUM_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, str) or recorded != state_checksum(state):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} is corrupt: its content does not match the checksum written with it"
        )


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
    # every entry of a checkpoint's name counts, a directory or a dangling link too: the reader then reports it
    # unreadable and falls back over it, instead of silently resuming from an older one
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
    with deferred():  # a stop signal waits for the file and the rotation (see write_checkpoint)
        write_checkpoint(state, path)
        if keep > 0:
            older = [p for p in list_checkpoints(directory) if checkpoint_iteration(p) <= iteration]
            for old in older[:-keep]:
                old.unlink(missing_ok=True)
    return path


def write_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced, then renamed over it: a crash or an error while
    writing leaves ``path`` as it was (and at most a hidden ``.tmp`` file, see :func:`remove_debris`). The state
    is written with its checksum (:func:`state_checksum`), verified by :func:`load_checkpoint`. A SIGINT / SIGTERM
    under :func:`~nonlocalnet.engine.signals.handled` lets the file complete and then stops
    (:func:`~nonlocalnet.engine.signals.deferred`)."""
    state = dict(state)
    state[CHECKSUM_KEY] = state_checksum(state)
    with deferred(), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint` (or a bare state dict), with a clear error.

    Only tensors and plain containers are read (``weights_only=True``): a file whose pickle would run code is
    refused, not executed. A checkpoint whose content does not match its checksum is refused as corrupt.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: ``path`` is a directory, a dangling link, unreadable, truncated, corrupt or foreign.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"cannot read checkpoint {path}: a link to {os.readlink(path)}, which does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot read checkpoint {path}: it is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = load_torch_file(path)
    except UnreadableFile as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.reason}") from None
    except OSError as e:  # no permission, an I/O error of the disk
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    verify_checksum(state, path)
    return state


def restore_training_state(
    state: Mapping[str, Any],
    source: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    info: DistInfo,
    *,
    scaler: torch.amp.GradScaler | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    mismatch: str = "holds weights of another model",
) -> bool:
    """Loads a training checkpoint's state into a run's objects, for a resume.

    The model's weights (other names or shapes: a :class:`CheckpointError` naming ``source``), the optimizer's
    state, the lr scheduler's and the GradScaler's when given (a checkpoint without a scaler state leaves the
    scaler as it is), and this process's random-generator states: ``rng_per_rank[rank]`` when the checkpoint
    holds one per process of a run of this size, else (process 0 only) ``rng``.

    Args:
        state: the checkpoint (:func:`load_checkpoint`).
        source: its path, for the messages.
        model: the model, not wrapped in DistributedDataParallel.
        mismatch: what the error says after ``source`` when the weights do not fit.

    Returns:
        Whether this process's random state was restored (if not, the caller seeds it).
    """
    load_state_dict_or_raise(
        model, state["model"], f"{os.fspath(source)} {mismatch}", CheckpointError, source=os.fspath(source)
    )
    optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_per_rank")
    rng = per_rank[info.rank] if per_rank and len(per_rank) == info.world_size else None
    if rng is None and info.rank == 0:
        rng = state.get("rng")
    if rng is not None:
        set_rng_state(rng, device)
    return rng is not None


def newest_readable_checkpoint(
    directory: str | os.PathLike,
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that reads, skipping unreadable ones of every kind: truncated (a
    kill during a write on a file system without atomic rename, a full disk), corrupt (checksum mismatch), a
    directory or a dangling link in a checkpoint's name.

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
