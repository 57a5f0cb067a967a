"""``nonlocalnet detect-train``: train torchvision's Mask R-CNN / Keypoint R-CNN with non-local blocks.

Runs under torchrun for several GPUs (or several CPU processes with gloo):
``torchrun --nproc_per_node 8 -m nonlocalnet.cli detect-train --config maskrcnn_r50_fpn_nl_1x``. The config is
read by the engine's loader (``base:`` files, ``key=value`` overrides as for ``train``), and the run directory
follows ``train``'s rules (see :mod:`nonlocalnet.detection.train`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import add_override_arguments, overrides_of

HELP = "train torchvision's Mask R-CNN / Keypoint R-CNN with non-local blocks (COCO format)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny_shapes",
                        help="config file, or the name of one in configs/coco "
                             "(default: tiny_shapes, the built-in data)")
    add_override_arguments(parser, "config", "train.epochs=2 model.backbone_nonlocal=null")
    parser.add_argument("--data-root", default=None, help="folder the config's relative data paths are under")
    parser.add_argument("--output-dir", default=None, help="where checkpoint.pth and log.jsonl are written")
    parser.add_argument("--resume", default=None,
                        help="continue from this checkpoint (without it, --output-dir must not hold another run)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even when the config differs from the checkpoint's (the changes are listed)")
    parser.add_argument("--backbone-weights", default=None,
                        help="a local torchvision ResNet state dict (.pth or .safetensors) to start the backbone from")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-iters-per-epoch", type=int, default=None, help="cut epochs short (smoke runs)")
    parser.add_argument("--evaluate-every", type=int, default=1,
                        help="evaluate every this many epochs (and at the end)")


def run(args: argparse.Namespace) -> int:
    from nonlocalnet.detection.config import load_config
    from nonlocalnet.detection.train import main

    overrides = overrides_of(args)
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    config = load_config(args.config, overrides)
    main(config, output_dir=args.output_dir, resume=args.resume, backbone_weights=args.backbone_weights,
         device=args.device, max_iters_per_epoch=args.max_iters_per_epoch, evaluate_every=args.evaluate_every,
         allow_config_change=args.allow_config_change)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nonlocalnet.commands.detect_train``: the same command and error handling
    without the ``nonlocalnet`` front."""
    from nonlocalnet.cli import main as cli_main

    return cli_main(["detect-train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
