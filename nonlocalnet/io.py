"""Files: atomic writes (an error or a crash never leaves a half-written file where a complete one is expected)
and the configs shipped inside the package."""
from __future__ import annotations

import contextlib
import importlib.resources
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; write it inside the block and it replaces ``path`` when the block ends.

    If the block raises, ``path`` keeps its old content (or stays absent) and the temporary file is removed.
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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def packaged_configs() -> Path:
    """The folder of the YAML configs shipped with the package (``configs/`` in a checkout links to it)."""
    return Path(os.fspath(importlib.resources.files("nonlocalnet") / "configs"))


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
        raise FileNotFoundError(f"config {os.fspath(name)!r} is ambiguous: {len(matches)} shipped configs are called "
                                f"so ({', '.join(p.relative_to(root).as_posix() for p in matches)}); name its folder")
    known = ", ".join((p.stem if folder else p.relative_to(root).as_posix()) for p in pool)
    raise FileNotFoundError(f"config file not found: {os.fspath(name)!r} is no file, nor a shipped config ({known})")
