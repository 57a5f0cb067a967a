"""``nonlocalnet detect-test --checkpoint runs/shapes/model_final.safetensors``: COCO box / mask / keypoint AP of a
detect-train run's weights, with the conventions of ``test``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_override_arguments, overrides_of

HELP = "COCO box / mask / keypoint AP of a detect-train run's weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="the run's model_final.safetensors or one of its checkpoints/checkpoint_<iteration>.pt",
    )
    parser.add_argument(
        "--config", default=None, help="evaluate with this config instead of the one the weights recorded"
    )
    add_override_arguments(parser, "config", "data.num_val=200 device=cpu")
    parser.add_argument("--results", default=None, help="also write the detections (COCO results json) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nonlocalnet.detection.config import load_config
    from nonlocalnet.detection.train import test
    from nonlocalnet.engine.distributed import cleanup

    # the overrides change --config, or else the config the weights recorded
    config = load_config(args.config) if args.config is not None else None
    try:
        overrides = overrides_of(args) + (["progress=false"] if args.no_progress else [])
        test(Path(args.checkpoint), config=config, overrides=overrides, results_file=args.results)
    finally:
        cleanup()
    return 0
