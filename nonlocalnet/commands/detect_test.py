"""``nonlocalnet detect-test``: COCO box / mask / keypoint AP of a detect-train checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

HELP = "COCO box / mask / keypoint AP of a detect-train checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pth written by detect-train")
    parser.add_argument("--config", default=None,
                        help="evaluate with this config instead of the one stored in the checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of the config (YAML), e.g. --set data.num_val=200; repeatable")
    parser.add_argument("--data-root", default=None, help="folder the config's relative data paths are under")
    parser.add_argument("--results", default=None, help="also write the detections (COCO results json) here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nonlocalnet.io import load_torch_file

    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    from nonlocalnet.detection.config import apply_overrides, complete_config, load_config
    from nonlocalnet.detection.train import test

    overrides = list(args.overrides)
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    if args.config is not None:
        config = load_config(args.config, overrides)
    else:
        state = load_torch_file(args.checkpoint)
        stored = state.get("config") if isinstance(state, dict) else None
        if stored is None:
            raise ValueError(f"{args.checkpoint} holds no config (not a detect-train checkpoint?); pass --config")
        config = complete_config(apply_overrides(stored, overrides), source=args.checkpoint)
    test(args.checkpoint, config=config, device=args.device, results_file=args.results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nonlocalnet.commands.detect_test``: the same command and error handling
    without the ``nonlocalnet`` front."""
    from nonlocalnet.cli import main as cli_main

    return cli_main(["detect-test", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
