"""A run directory belongs to one run: a fresh start refuses a used one, a resume refuses a changed config or
another run's checkpoint, one process at a time holds the directory, and what a resumed run replays is cut from its
logs first.

Used by the training loop (:mod:`nonlocalnet.engine.loop`) for every task, through three calls at the start of a
run (main process)::

    lock = lock_run_directory(out)                 # before anything in ``out`` is read; released when the run ends
    identity = claim_run(out, cfg, state, source, ...)  # after the checkpoint (if any) is read: which run this is
    record_run(out, identity)                      # once every check passed, beside config.yaml: run.json

and the identity carried by every checkpoint (``state["run"] = identity.as_dict()``) and every log row
(``MetricLogger(..., run_id=identity.run_id)``); ``lock.release()`` when the run ends (or the process exits).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import write_text_atomic


class RunDirectoryError(ValueError):
    """A start that would mix two runs in one directory, or resume with another config."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


# The files that mark a directory as holding a run.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "model_final.safetensors",
    "test_metrics.json",
    "checkpoint.pth",
    "log.jsonl",
)
# What a run leaves besides its checkpoints: a directory holding these and no checkpoint is a run that cannot be
# resumed (its checkpoints were deleted), which a resume must not overwrite.
RESULT_FILES = ("metrics.jsonl", "model_final.safetensors", "test_metrics.json", "log.jsonl")
RUN_FILE = "run.json"  # the run's identity (RunIdentity)
LOCK_FILE = ".lock"  # held (flock) by the process that runs in the directory; names it

# Keys a resumed run may change without changing what it computes: where output goes, how it is shown, how many
# loader processes read the (deterministically chosen) items, when the non-local blocks are checked (a warning
# only), and what happens after training.
RESUMABLE_KEYS = (
    "output_dir",
    "progress",
    "data.workers",
    "train.log_every",
    "train.eval_every",
    "train.keep_checkpoints",
    "train.check_blocks_after",
    "test.*",
)


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
            f"the new run in another directory (output_dir=...)"
        )


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


def config_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_KEYS
) -> list[str]:
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


def check_resume_config(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    source: str | os.PathLike,
    *,
    allow_change: bool,
    warn: Callable[[str], None],
    allowed: Iterable[str] = RESUMABLE_KEYS,
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
            f"to resume anyway, or start a new run in another output_dir"
        )
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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RunDirectoryError(
            f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); the run's log is "
            f"damaged: repair or remove that line to resume"
        ) from None
    for line in text.splitlines():
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


# --- one process at a time -------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory (``flock`` on ``<dir>/.lock``), released by :meth:`release` or when
    the process ends (also when it is killed: the kernel drops the lock with the file descriptor)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_directory(directory: str | os.PathLike) -> RunLock:
    """Takes the run directory for this process (creating it), or raises :class:`RunDirectoryError` at once
    naming the process that holds it: two runs writing one directory would interleave their logs and
    checkpoints. The lock file records the holder (pid, host, command, start time).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirectoryError(f"output_dir {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirectoryError(
            f"output_dir {directory} is in use by another run ({holder}); wait for it to "
            f"end, or start this run in another directory (output_dir=...)"
        ) from None
    holder = (
        f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
        f"{' '.join(sys.argv)[:300]}"
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode() + b"\n", 0)
    return RunLock(path, fd)


# --- the run's identity ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunIdentity:
    """Which run a directory, a checkpoint or a log row belongs to.

    Attributes:
        run_id: random, drawn when the run starts.
        config_hash: :func:`config_hash` of the config it started with.
        resumed_from: the run id of the checkpoint a new run started from (another run's), or None.
    """

    run_id: str
    config_hash: str
    resumed_from: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "config_hash": self.config_hash, "resumed_from": self.resumed_from}

    @classmethod
    def from_dict(cls, data: Any) -> RunIdentity | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("run_id"), str):
            return None
        return cls(data["run_id"], str(data.get("config_hash", "")), data.get("resumed_from"))


def config_hash(cfg: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_KEYS) -> str:
    """A short hash of what a config computes: every key except those a resume may change (``allowed``)."""
    allowed = tuple(allowed)
    flat = {k: v for k, v in flatten(cfg).items() if not _resumable(k, allowed)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_identity(directory: str | os.PathLike) -> RunIdentity | None:
    """The identity ``run.json`` records in ``directory`` (None: no such file, or one that does not read)."""
    path = Path(directory) / RUN_FILE
    try:
        return RunIdentity.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def claim_run(
    directory: str | os.PathLike,
    cfg: Mapping[str, Any],
    state: Mapping[str, Any] | None,
    source: str | os.PathLike | None,
    *,
    has_checkpoints: bool,
    explicit: bool,
    allowed: Iterable[str] = RESUMABLE_KEYS,
    say: Callable[[str], None] = print,
) -> RunIdentity:
    """Decides which run this start is, refusing a start that would mix two runs; changes nothing
    (:func:`record_run` writes the result once every other check passed).

    Main process only, under :func:`lock_run_directory`, before anything in ``directory`` is changed.

    Args:
        directory: the run directory.
        cfg: this start's config.
        state: the checkpoint it resumes from (its ``run`` entry names the run it belongs to), or None.
        source: that checkpoint's path.
        has_checkpoints: whether ``directory`` holds checkpoints of its own (readable or not).
        explicit: ``--resume FILE`` (True) rather than ``--resume`` alone or a fresh start.
        allowed: config keys a resume may change (they do not enter the hash).
        say: where the plain statement of a new run started from another run's checkpoint goes.

    Returns:
        The run's identity: the directory's own when a checkpoint of it is resumed, else a new one.

    Raises:
        RunDirectoryError: a checkpoint of another run into a directory that holds a run; a directory that
            holds results but no checkpoints (``--resume`` would overwrite them); a fresh start into a used one.
    """
    directory = Path(directory)
    mine = read_identity(directory)
    found = [name for name in RUN_FILES if (directory / name).exists()]
    new = RunIdentity(secrets.token_hex(8), config_hash(cfg, allowed))
    if state is None:
        results = [name for name in RESULT_FILES if (directory / name).exists()]
        if results and not has_checkpoints:
            raise RunDirectoryError(
                f"output_dir {directory} holds the results of a run ({', '.join(results)}) but no checkpoint to "
                f"resume from; starting anew there would replace them. Start the run in another directory "
                f"(output_dir=...), or delete that directory first"
            )
        check_unused(directory)
        return new
    theirs = RunIdentity.from_dict(state.get("run"))
    if theirs is not None and mine is not None and theirs.run_id == mine.run_id:
        return mine
    if theirs is None and mine is None and not explicit:  # the directory's own checkpoint, written before run ids
        return new
    if found:
        owner = f"run {mine.run_id}" if mine else "another run"
        raise RunDirectoryError(
            f"--resume {os.fspath(source)}: the checkpoint belongs to "
            f"{f'run {theirs.run_id}' if theirs else 'a run without an id'}, and output_dir {directory} holds "
            f"{owner} ({', '.join(found)}); continuing there would overwrite and mix that run's files. Resume "
            f"into an empty directory (output_dir=...)"
        )
    new = RunIdentity(new.run_id, new.config_hash, resumed_from=theirs.run_id if theirs else None)
    say(
        f"starting a new run {new.run_id} in the empty directory {directory} from the checkpoint "
        f"{os.fspath(source)} of {f'run {theirs.run_id}' if theirs else 'another run'}"
    )
    return new


def record_run(directory: str | os.PathLike, identity: RunIdentity) -> None:
    """Writes the run's identity to ``<directory>/run.json`` (atomically)."""
    write_text_atomic(Path(directory) / RUN_FILE, json.dumps(identity.as_dict()) + "\n")
