"""The videos a command is given: video files, and list files naming videos (``nonlocalnet predict`` / ``extract``).

An argument ending in ``.txt``, ``.list`` or ``.csv`` is a list file: one video a line (blank lines and lines
starting with ``#`` ignored), a path relative to ``root`` (default: the list file's folder). A training list's
``path label`` (Kinetics) or ``path 3,17,42`` (Charades) lines work as they are: the line is the path when such a
file exists, else the line without its last field, else its first field. Any other argument is a video file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LIST_SUFFIXES", "VideoInput", "video_inputs"]

LIST_SUFFIXES = (".txt", ".list", ".csv")
MISSING_SHOWN = 5


@dataclass(frozen=True)
class VideoInput:
    """One video to read.

    Attributes:
        id: how outputs name it: the argument as typed, or the path as its list file writes it.
        path: the file.
    """

    id: str
    path: Path


def video_inputs(arguments: Sequence[str], root: str | os.PathLike | None = None) -> list[VideoInput]:
    """The videos of the command line's arguments, in order (list files expanded).

    Raises:
        FileNotFoundError: a video or list file that does not exist (all missing ones named, the first as the
            error's filename).
        ValueError: no video at all, or a video named twice.
    """
    videos: list[VideoInput] = []
    missing: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.suffix.lower() in LIST_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "no such video list", argument)
            base = Path(root) if root is not None else path.parent
            for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                found = _listed_path(line, base)
                if found is None:
                    missing.append(f"{base / line} ({argument}, line {number})")
                else:
                    videos.append(VideoInput(found[0], found[1]))
        elif path.is_file():
            videos.append(VideoInput(argument, path))
        else:
            missing.append(argument)
    if missing:
        shown = "; ".join(missing[:MISSING_SHOWN]) + (
            f"; ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        )
        raise FileNotFoundError(errno.ENOENT, f"no such video ({len(missing)} missing: {shown})", missing[0])
    if not videos:
        raise ValueError(f"no video in {', '.join(arguments) or 'the arguments'}")
    seen: set[str] = set()
    for video in videos:
        if video.id in seen:
            raise ValueError(f"video {video.id!r} is given twice (outputs are keyed by it)")
        seen.add(video.id)
    return videos


def _listed_path(line: str, base: Path) -> tuple[str, Path] | None:
    """(id, file) of a list line: the whole line, the line without its last field, or its first field."""
    fields = line.split()
    for candidate in (line, line.rsplit(maxsplit=1)[0] if len(fields) > 1 else None, fields[0]):
        if candidate is not None and (base / candidate).is_file():
            return candidate, base / candidate
    return None
