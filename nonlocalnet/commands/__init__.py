"""The commands of the ``nonlocalnet`` CLI, one module each (see :mod:`nonlocalnet.cli`).

Every command takes its overrides the same way: ``key=value`` with a dotted key and a YAML value, read by
:func:`nonlocalnet.engine.config.parse_override`, given as ``--set key=value`` (repeatable) or, for the commands
that run a config, also as bare words (``nonlocalnet train --config ... train.lr=0.02``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_override_arguments(parser: argparse.ArgumentParser, what: str, examples: str, words: bool = True) -> None:
    """The override arguments of a command: ``--set KEY=VALUE`` and, with ``words``, bare ``key=value`` words.

    Args:
        parser: the command's parser.
        what: what an override sets, e.g. "config" or "model option".
        examples: overrides separated by spaces, e.g. "train.lr=0.02 data.workers=8".
        words: also take overrides as bare words (commands whose positional arguments are not files).
    """
    if words:
        parser.add_argument(
            "overrides", nargs="*", metavar="key=value", help=f"{what} overrides (YAML values), e.g. {examples}"
        )
    first = examples.split()[0]
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"one {what} override (a YAML value), e.g. --set {first}; repeatable"
        + ("; applied after the bare key=value words" if words else ""),
    )


def overrides_of(args: argparse.Namespace) -> list[str]:
    """A command's overrides in the order they apply: the bare words, then the ``--set`` ones."""
    return [*getattr(args, "overrides", ()), *args.set_overrides]


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count: a batch, arrows, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """The resume options every training command takes (``train``, ``detect-train``): one convention, one
    definition; :func:`resume_of` reads ``--resume`` back."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the run directory's newest readable checkpoint, or from CHECKPOINT "
        "(without --resume, output_dir must not hold another run)",
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even when the config differs from the checkpoint's (the changed keys are "
        "listed; the result is then no longer the uninterrupted run's)",
    )


def resume_of(args: argparse.Namespace) -> bool | str:
    """A training command's ``--resume`` (False, True or a checkpoint's path), taking back an override argparse gave
    it: in ``--resume train.lr=0.5`` the word is an override (put first among ``args.overrides``), not a file."""
    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        args.overrides.insert(0, resume)
        return True
    return resume
