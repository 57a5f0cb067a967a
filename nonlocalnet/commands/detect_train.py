"""``nonlocalnet detect-train --config tiny_shapes output_dir=runs/shapes [key=value ...]``: train torchvision's Mask
R-CNN / Keypoint R-CNN with non-local blocks, with the conventions of ``train``.

Runs under torchrun for several GPUs (or several CPU processes with gloo):
``torchrun --nproc_per_node 8 -m nonlocalnet.cli detect-train --config maskrcnn_r50_fpn_nl_1x``. The run folder and
its files, ``--resume`` and the overrides are those of ``train`` (see :mod:`nonlocalnet.detection.train`).
"""

from __future__ import annotations

import argparse
import logging

from . import add_override_arguments, add_resume_arguments, overrides_of, resume_of

HELP = "train torchvision's Mask R-CNN / Keypoint R-CNN with non-local blocks (COCO format)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="tiny_shapes",
        help="config file, or the name of one in configs/coco (default: tiny_shapes, the built-in data)",
    )
    add_resume_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the log lines stay)")
    add_override_arguments(parser, "config", "output_dir=runs/shapes train.epochs=2 model.backbone_nonlocal=null")


def run(args: argparse.Namespace) -> int:
    from nonlocalnet.detection.config import load_config
    from nonlocalnet.detection.train import train
    from nonlocalnet.engine.distributed import cleanup, is_main_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    resume = resume_of(args)
    overrides = overrides_of(args) + (["progress=false"] if args.no_progress else [])
    config = load_config(args.config, overrides)
    try:
        train(config, resume=resume, allow_config_change=args.allow_config_change)
        main_process = is_main_process()  # said once per job, not once per process
    finally:
        cleanup()
    if main_process:
        print(f"run directory: {config['output_dir']}")
    return 0
