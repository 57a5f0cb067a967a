"""``nonlocalnet train --config configs/kinetics/nl_c2d_r50_8x8.yaml [key=value ...]``.

Runs single-process as it is, or data-parallel under torchrun:
``torchrun --nproc_per_node 8 -m nonlocalnet train --config ...`` (nccl on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import add_override_arguments, overrides_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="a YAML config (see configs/); default: the built-in defaults (synthetic data)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the run directory's newest readable checkpoint, or from CHECKPOINT "
                             "(without --resume, output_dir must not hold another run)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even when the config differs from the checkpoint's (the changed keys are "
                             "listed; the result is then no longer the uninterrupted run's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    add_override_arguments(parser, "config", "train.lr=0.02 output_dir=runs/x data.workers=8")


def run(args: argparse.Namespace) -> int:
    from ..engine import load_config, train
    from ..engine.distributed import cleanup
    from .test import print_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # `--resume train.lr=0.5`: argparse took the override for the checkpoint --resume may name
        args.overrides.insert(0, resume)
        resume = True
    overrides = overrides_of(args) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(args.config, overrides)
    try:
        report = train(cfg, resume=resume, allow_config_change=args.allow_config_change)
    finally:
        cleanup()
    if "stopped_at" not in report:
        print_report(report, cfg)
        print(f"run directory: {cfg['output_dir']}")
    return 0
