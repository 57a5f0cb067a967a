"""The ``nonlocalnet`` command line.

Each sub-command lives in its own module under :mod:`nonlocalnet.commands` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. A module is imported only when its command runs, so
``nonlocalnet flops`` does not pay for the detection stack's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "nonlocalnet.commands.demo",
        "a C2D baseline and NL C2Ds of all four modes trained on built-in data, side by side",
    ),
    "train": (
        "nonlocalnet.commands.train",
        "train a video classifier from a YAML config (torchrun for many processes)",
    ),
    "test": ("nonlocalnet.commands.test", "multi-view test of a trained model: top-1/top-5 or mAP, table and JSON"),
    "predict": ("nonlocalnet.commands.predict", "top-k classes of video files, multi-view as at test time; JSON out"),
    "extract": ("nonlocalnet.commands.extract", "per-clip or per-video features of videos into safetensors or .npy"),
    "flops": ("nonlocalnet.commands.flops", "parameters and multiply-adds of a model, per layer and in total"),
    "cost": (
        "nonlocalnet.commands.cost",
        "parameters, multiply-adds and the peak memory of a step, per non-local block and path, estimated",
    ),
    "convert": (
        "nonlocalnet.commands.convert",
        "convert a checkpoint of the official Caffe2 code, PyTorchVideo or mmaction2 into safetensors",
    ),
    "convert-caffe2": ("nonlocalnet.commands.convert_caffe2", "nonlocalnet convert --from caffe2 (an alias)"),
    "visualize": (
        "nonlocalnet.commands.visualize",
        "draw what a model's non-local blocks attend to on a video clip (PNG)",
    ),
    "attention": (
        "nonlocalnet.commands.attention",
        "per non-local block: query dependence, entropy, strongest keys, contribution (table, PNG)",
    ),
    "feature-bank-demo": (
        "nonlocalnet.commands.feature_bank_demo",
        "long-term feature bank on the built-in long-video task: clip-only vs bank table",
    ),
    "detect-train": (
        "nonlocalnet.commands.detect_train",
        "train torchvision's Mask R-CNN / Keypoint R-CNN with non-local blocks (COCO format)",
    ),
    "detect-test": (
        "nonlocalnet.commands.detect_test",
        "COCO box / mask / keypoint AP of a detect-train run's weights",
    ),
    "prepare-videos": (
        "nonlocalnet.commands.prepare_videos",
        "re-encode a video list for fast training: short side 256, a key frame every 16 frames",
    ),
    "models": ("nonlocalnet.commands.models", "list the model names with parameters, clip and non-local blocks"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: nonlocalnet COMMAND [options]   (nonlocalnet --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'nonlocalnet COMMAND --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"nonlocalnet {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"nonlocalnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"nonlocalnet {name}", description=help_)
    module.add_arguments(parser)
    try:
        args = parser.parse_intermixed_args(argv[1:])  # overrides may come before, between or after options
    except _UsageError as e:
        print(f"nonlocalnet {name}: error: {e} (see nonlocalnet {name} --help)", file=sys.stderr)
        return 2
    from .engine.signals import handled

    try:
        with handled():  # SIGINT / SIGTERM: exit 130 / 143, checked at every training step too
            return int(module.run(args) or 0)
    except KeyboardInterrupt as e:
        print(f"nonlocalnet {name}: interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is re-raised
        message = user_error(e)
        if message is None or os.environ.get("NONLOCALNET_DEBUG"):
            raise
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank == 0 or not getattr(e, "all_processes", False):  # an error every process raises is said once
            where = f"[rank {rank}] " if world > 1 and rank else ""
            print(f"nonlocalnet {name}: {where}error: {message}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    """A command line argparse refused (an unknown option, a value of the wrong type)."""


class _Parser(argparse.ArgumentParser):
    """argparse, its errors one ``error:`` line like every other user error (not usage text and a second line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


# errno values of a full disk or an exhausted quota
_DISK_FULL = (28, 122)  # ENOSPC, EDQUOT


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error in what the user gave (a config, a file, data, a model name), or None
    for an error of the program itself, which keeps its traceback.

    User errors are ValueErrors (ConfigError, CheckpointError, UnknownModel, ... all are), OS errors about a
    named file (missing, a directory, no permission), a full disk, and memory that ran out (what the user asked
    for does not fit this machine).
    """
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: a GPU's
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "an allocation failed"
        return (
            f"out of memory ({first}); lower train.batch_size / test.batch_size, data.frames or the clip size, "
            f"or data.workers"
        )
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        where = f" while writing {e.filename}" if e.filename is not None else ""
        return f"no space left on the device{where}; the files written before are intact: free space and rerun"
    if isinstance(e, OSError) and (e.filename is not None or isinstance(e, FileNotFoundError)):
        if e.filename is None:
            return str(e)
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    if isinstance(e, ValueError):
        text = str(e)
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is last
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        return " ".join(text.split()) or type(e).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
