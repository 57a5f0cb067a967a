"""Class names of the datasets the paper's checkpoints are trained on, and of one's own class lists.

Shipped lists (package data under ``nonlocalnet/data/classes/``), one name a line, line ``i`` naming class ``i``:

* ``kinetics400.txt``: the 400 Kinetics-400 classes in alphabetical order, the order the zoos' classifiers are
  trained in (the class indices of the Kinetics lists the official code, PyTorchVideo and mmaction2 train from;
  the same names and order as mmaction2's ``tools/data/kinetics/label_map_k400.txt`` and torchvision's
  ``_KINETICS400_CATEGORIES``, which the test compares where torchvision has it);
* ``charades.txt``: the 157 Charades classes in the order of the dataset's own ``Charades_v1_classes.txt``
  (``c000`` ... ``c156``; the ids are left out, the line number is the index).

A weights file records its class names in its safetensors metadata, under :data:`METADATA_KEY`, as a JSON list
(``nonlocalnet convert`` writes them for the zoos' Kinetics-400 and Charades classifiers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

__all__ = ["DATASETS", "METADATA_KEY", "dataset_class_names", "dataset_of", "read_class_names", "recorded_class_names"]

# dataset -> (file under nonlocalnet/data/classes, number of classes)
DATASETS: dict[str, tuple[str, int]] = {"kinetics400": ("kinetics400.txt", 400), "charades": ("charades.txt", 157)}
METADATA_KEY = "class_names"
# a Charades_v1_classes.txt line: "c042 Putting a box somewhere"
_CHARADES_ID = re.compile(r"^c\d{3} ")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a list file: one name a line, line ``i`` (from 0) naming class ``i``.

    Trailing blank lines are ignored; a blank line between names is an error (it would shift every later class).
    Lines of Charades' own ``Charades_v1_classes.txt`` (``c000 Holding some clothes``) are read without their id
    when every line has one.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no name, a blank line between names, or a name given twice (naming the lines).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"class list {path} is a directory, not a file of class names (one a line)")
    with open(path, encoding="utf-8-sig") as f:
        names = [line.strip() for line in f.read().rstrip().splitlines()]
    if not names or not names[0]:
        raise ValueError(f"{path} holds no class name (one name a line, line i naming class i)")
    for number, name in enumerate(names, start=1):
        if not name:
            raise ValueError(
                f"{path}, line {number}: a blank line between class names (line i names class i - 1; remove it)"
            )
    if all(_CHARADES_ID.match(name) for name in names):
        names = [name[5:].strip() for name in names]
    first: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in first:
            raise ValueError(f"{path}, line {number}: class name {name!r} again (line {first[name]} names it too)")
        first[name] = number
    return names


def dataset_class_names(dataset: str) -> list[str]:
    """The shipped class names of ``dataset`` (a key of :data:`DATASETS`)."""
    if dataset not in DATASETS:
        raise ValueError(f"no class names shipped for {dataset!r}; known: {', '.join(DATASETS)}")
    file, _ = DATASETS[dataset]
    text = resources.files("nonlocalnet.data").joinpath("classes", file).read_text(encoding="utf-8")
    return text.rstrip("\n").split("\n")


def dataset_of(num_classes: int) -> str | None:
    """The dataset of a zoo classifier with ``num_classes`` outputs: the zoos we convert train Kinetics-400 (400)
    and Charades (157) classifiers only; None for any other size."""
    return next((name for name, (_, count) in DATASETS.items() if count == num_classes), None)


def recorded_class_names(metadata: Mapping[str, str], what: str = "the weights file") -> list[str] | None:
    """The class names a weights file's metadata records (:data:`METADATA_KEY`), or None.

    Raises:
        ValueError: the entry is not a JSON list of strings.
    """
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{what}: metadata {METADATA_KEY!r} must be a JSON list of strings")
    return names


def class_names_metadata(names: Sequence[str]) -> dict[str, str]:
    """The metadata entry that records ``names`` in a weights file."""
    return {METADATA_KEY: json.dumps(list(names))}
