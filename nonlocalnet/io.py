"""Files: atomic writes (an error or a crash never leaves a half-written file where a complete one is expected),
torch files loaded without running code, and the configs shipped inside the package."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; write it inside the block and it replaces ``path`` when the block ends.

    If the block raises, ``path`` keeps its old content (or stays absent) and the temporary file is removed; an
    OS error without a file name (a full disk while writing) is raised naming ``path``.
    The result gets the usual permissions (0666 minus the umask), not the temporary file's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a write into the file object (a full disk): the error names the file it was for
            raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class UnreadableFile(ValueError):
    """A file that cannot be loaded: truncated, foreign, or a pickle that would run code."""

    all_processes = True  # every process of a torchrun job reads the same files: the CLI says it once

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read {os.fspath(path)}: {reason}")
        self.path, self.reason = Path(path), reason


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of a file onto the CPU that never runs code from it (``weights_only=True``: tensors, numbers,
    strings and containers only).

    Raises:
        FileNotFoundError: no such file.
        UnreadableFile: truncated, not a torch file, or a pickle naming other objects (the message says which).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler or the zip reader raises, the file is unusable
        raise UnreadableFile(path, _unpickling_failure(e)) from None


def _unpickling_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words (torch's wording varies by version)."""
    text = str(error)
    found = re.search(r"unsupported (?:global|class)[: ]+(?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
    if found:
        return (
            f"it holds {found.group(1)}, not only tensors and plain containers; loading it could run code, "
            f"so it is refused"
        )
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.replace("WeightsUnpickler error:", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith(boilerplate)]
    return f"truncated, or not a file torch.save wrote ({(lines[0] if lines else type(error).__name__)[:160]})"


def packaged_configs() -> Path:
    """The folder of the YAML configs shipped with the package (``configs/`` in a checkout links to it)."""
    return Path(os.fspath(importlib.resources.files("nonlocalnet") / "configs"))


def shipped_configs(folder: str | None = None) -> list[str]:
    """The names of the shipped configs, as ``--config`` takes them ("synthetic/nl_c2d_tiny"), sorted; the files
    other configs extend (``base.yaml``) left out."""
    root = packaged_configs()
    pool = sorted((root / folder if folder else root).rglob("*.yaml"))
    return [p.relative_to(root).with_suffix("").as_posix() for p in pool if p.stem != "base"]


def find_config(name: str | os.PathLike, folder: str | None = None) -> Path:
    """A config file: ``name`` itself if it is a file, else the shipped config it names.

    A shipped config is named by its path under ``configs/`` ("synthetic/nl_c2d_tiny.yaml", also with the
    ``configs/`` prefix, so the paths of a checkout work from an installed package anywhere) or by its stem
    ("tiny_shapes"; within ``folder``, e.g. "coco", when given, else unique across folders).

    Raises:
        FileNotFoundError: naming ``name`` and the shipped configs it could have meant.
    """
    path = Path(name)
    if path.is_file():
        return path
    root = packaged_configs()
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (root / relative, (root / relative).with_suffix(".yaml")):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    pool = sorted((root / folder if folder else root).rglob("*.yaml"))
    matches = [p for p in pool if p.stem == path.name.removesuffix(".yaml")] if len(path.parts) == 1 else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FileNotFoundError(
            f"config {os.fspath(name)!r} is ambiguous: {len(matches)} shipped configs are called "
            f"so ({', '.join(p.relative_to(root).as_posix() for p in matches)}); name its folder"
        )
    known = ", ".join((p.stem if folder else p.relative_to(root).as_posix()) for p in pool)
    raise FileNotFoundError(f"config file not found: {os.fspath(name)!r} is no file, nor a shipped config ({known})")
