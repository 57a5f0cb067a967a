"""A run directory belongs to one run: a fresh start refuses a used one, a resume refuses a changed config, and
what a resumed run replays is cut from its logs first.

Used by the training loop (:mod:`nonlocalnet.engine.loop`) for every task.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..io import write_text_atomic


class RunDirectoryError(ValueError):
    """A start that would mix two runs in one directory, or resume with another config."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


# The files that mark a directory as holding a run.
RUN_FILES = ("checkpoints", "metrics.jsonl", "model_final.safetensors", "test_metrics.json", "checkpoint.pth",
             "log.jsonl")

# Keys a resumed run may change without changing what it computes: where output goes, how it is shown, how many
# loader processes read the (deterministically chosen) items, when the non-local blocks are checked (a warning
# only), and what happens after training.
RESUMABLE_KEYS = ("output_dir", "progress", "data.workers", "train.log_every", "train.eval_every",
                  "train.keep_checkpoints", "train.check_blocks_after", "test.*")


def check_unused(directory: str | os.PathLike, files: Iterable[str] = RUN_FILES) -> None:
    """Raises :class:`RunDirectoryError` when ``directory`` already holds a run's files (a fresh start there
    would delete or mix them)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirectoryError(f"output_dir {directory} is a file, not a directory")
    found = [name for name in files if (directory / name).exists()]
    if found:
        raise RunDirectoryError(
            f"output_dir {directory} already holds a run ({', '.join(found)}); continue it with --resume, or start "
            f"the new run in another directory (output_dir=...)")


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (``model.options`` flattened too)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _resumable(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in allowed)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   allowed: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """The keys whose values differ between two configs (except those in ``allowed``), as ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    allowed = tuple(allowed)
    changes = []
    for key in sorted(set(a) | set(b)):
        if _resumable(key, allowed):
            continue
        missing = object()
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(unset)" if v is missing else json.dumps(v)  # noqa: E731
            changes.append(f"{key}: {show(va)} -> {show(vb)}")
    return changes


def check_resume_config(old: Mapping[str, Any] | None, new: Mapping[str, Any], source: str | os.PathLike, *,
                        allow_change: bool, warn: Callable[[str], None], allowed: Iterable[str] = RESUMABLE_KEYS
                        ) -> list[str]:
    """Refuses to resume ``source`` with a config other than the one it was trained with, unless ``allow_change``
    (then the changes are reported through ``warn``). Returns the changes."""
    if old is None:
        return []
    changes = config_changes(old, new, allowed)
    if changes and not allow_change:
        raise RunDirectoryError(
            f"--resume {os.fspath(source)}: the config differs from the one the checkpoint was trained with "
            f"({'; '.join(changes)}); resuming so would not continue the same run. Pass --allow-config-change "
            f"to resume anyway, or start a new run in another output_dir")
    if changes:
        warn(f"resuming {os.fspath(source)} with a changed config: {'; '.join(changes)}")
    return changes


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrites a JSON-lines log keeping the rows ``keep`` accepts (atomically); returns how many were dropped.

    A resumed run replays the steps after its checkpoint; their rows from the interrupted attempt go first, so
    that the log reads as one uninterrupted run. A torn last line (a kill mid-write) is dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
