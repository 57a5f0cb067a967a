"""The video-list format, read by one function for every reader (the dataset, ``prepare-videos``);
:func:`read_video_list` adds the dataset's check of the labels against the number of classes.

One video a line: ``path label`` (Kinetics: the label is the last field, so a path may hold spaces) or, for
multi-label lists, ``path l1,l2 l3`` (Charades: the path is the first field, every other field holds labels,
comma- or space-separated). Blank lines and lines starting with ``#`` are skipped. Labels are non-negative decimal
integers; a single-label list refuses a comma in its label. A path is relative and stays under the data root (no
``..``, not absolute): the dataset reads it under ``data.root``, ``prepare-videos`` writes its output under the
output root. The file is UTF-8 (a leading byte-order mark is ignored). Every error names the file and line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

_LABEL = re.compile(r"[0-9]+")


def read_list_text(list_file: str | os.PathLike) -> list[str]:
    """The lines of a list file, without their ends of line.

    Raises:
        FileNotFoundError: no such file (naming it).
        ValueError: a directory, or bytes that are not UTF-8 (naming the file, the line and the byte).
    """
    list_file = Path(list_file)
    if list_file.is_dir():
        raise ValueError(f"video list {list_file} is a directory, not a list file of 'path label' lines")
    if not list_file.is_file():
        raise FileNotFoundError(2, "no such list file", str(list_file))
    raw = list_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of a path
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{list_file}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    lines = re.split(r"\r\n|\r|\n", text)  # the ends of line of Unix, Windows and old Macs, nothing else
    return lines[:-1] if lines[-1] == "" else lines


def parse_list_line(line: str, where: str, multi_label: bool) -> tuple[str, tuple[int, ...]] | None:
    """One line of a list: ``(path, labels in line order)``, or None for a blank or comment line.

    Args:
        line: the line.
        where: "file, line N", for the messages.
        multi_label: Charades style (the first field is the path, every other field labels).

    Raises:
        ValueError: no label, a label that is not a non-negative integer, several labels in a single-label list, or
            a path that is absolute or leaves its root; naming ``where``.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split() if multi_label else stripped.rsplit(maxsplit=1)
    if len(fields) < 2:
        raise ValueError(f"{where}: expected 'path label', got {stripped!r}")
    path = fields[0]
    if not multi_label and "," in fields[1]:
        raise ValueError(
            f"{where}: several labels {fields[1]!r} in a single-label list (multi-label lists are data.type=charades)"
        )
    tokens = [t for field in fields[1:] for t in field.split(",") if t != ""]
    if not tokens:
        raise ValueError(f"{where}: no label in {stripped!r}")
    for token in tokens:
        if not _LABEL.fullmatch(token):
            raise ValueError(f"{where}: label {token!r} is not a non-negative integer")
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{where}: the path {path!r} must be relative to the data root and stay in it")
    return path, tuple(int(t) for t in tokens)


def read_video_list(
    list_file: str | Path, *, num_classes: int, multi_label: bool = False
) -> list[tuple[str, int | tuple[int, ...]]]:
    """Parse a Kinetics-style (``path label``) or Charades-style (``path 3,17,42``) list file (the one format
    of this module, which ``prepare-videos`` reads too), checking the labels against ``num_classes``.

    Args:
        list_file: the text file.
        num_classes: labels must lie in ``[0, num_classes)``.
        multi_label: Charades style, several labels per video (comma- or space-separated, at least one).

    Returns:
        ``(relative path, label)`` per video, in file order; the label is an int, or a sorted tuple of distinct
        ints when ``multi_label``.

    Raises:
        FileNotFoundError: no such list file.
        ValueError: a malformed line, a label out of range, a path outside the root, or bytes that are not UTF-8,
            naming the file and the line number.
    """
    list_file = Path(list_file)
    entries: list[tuple[str, int | tuple[int, ...]]] = []
    for number, line in enumerate(read_list_text(list_file), start=1):
        where = f"{list_file}, line {number}"
        parsed = parse_list_line(line, where, multi_label)
        if parsed is None:
            continue
        path, labels = parsed
        for label in labels:
            if label >= num_classes:
                raise ValueError(f"{where}: label {label} out of range [0, {num_classes})")
        entries.append((path, tuple(sorted(set(labels))) if multi_label else labels[0]))
    if not entries:
        raise ValueError(f"{list_file} lists no video")
    return entries
