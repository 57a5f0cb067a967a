"""``nonlocalnet detect-test``: COCO box / mask / keypoint AP of a detect-train checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import add_override_arguments, overrides_of

HELP = "COCO box / mask / keypoint AP of a detect-train checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pth written by detect-train")
    parser.add_argument("--config", default=None,
                        help="evaluate with this config instead of the one stored in the checkpoint")
    add_override_arguments(parser, "config", "data.num_val=200")
    parser.add_argument("--data-root", default=None, help="folder the config's relative data paths are under")
    parser.add_argument("--results", default=None, help="also write the detections (COCO results json) here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from nonlocalnet.detection.config import load_config
    from nonlocalnet.detection.train import test

    overrides = overrides_of(args)
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    # the overrides change --config, or else the config the checkpoint recorded
    config = load_config(args.config) if args.config is not None else None
    test(args.checkpoint, config=config, overrides=overrides, device=args.device, results_file=args.results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nonlocalnet.commands.detect_test``: the same command and error handling
    without the ``nonlocalnet`` front."""
    from nonlocalnet.cli import main as cli_main

    return cli_main(["detect-test", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
