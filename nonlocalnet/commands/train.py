"""``nonlocalnet train --config configs/kinetics/nl_c2d_r50_8x8.yaml [key=value ...]``.

Runs single-process as it is, or data-parallel under torchrun:
``torchrun --nproc_per_node 8 -m nonlocalnet train --config ...`` (nccl on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import argparse
import logging

from . import add_override_arguments, add_resume_arguments, overrides_of, resume_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="a YAML config: a shipped one (synthetic/nl_c2d_tiny, kinetics/nl_i3d_r50_8x8, ...) "
        "or a file; without it, key=value overrides on the built-in defaults",
    )
    add_resume_arguments(parser)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars, for log files (the log line every train.log_every iterations stays)",
    )
    add_override_arguments(parser, "config", "train.lr=0.02 output_dir=runs/x data.workers=8")


def run(args: argparse.Namespace) -> int:
    from ..engine import load_config, train
    from ..engine.config import ConfigError
    from ..engine.distributed import cleanup, is_main_process
    from ..io import shipped_configs
    from .test import print_report

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    resume = resume_of(args)
    if args.config is None and not overrides_of(args) and resume is False:
        video = ", ".join(name for name in shipped_configs() if not name.startswith("coco/"))
        raise ConfigError(
            f"pass --config: a shipped config ({video}) or your own YAML file (without one, nothing "
            f"says what to train on, and the built-in defaults are the paper's 400,000 iterations)"
        )
    overrides = overrides_of(args) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(args.config, overrides)
    try:
        report = train(cfg, resume=resume, allow_config_change=args.allow_config_change)
        main_process = is_main_process()  # the results are printed once per job, not once per process
    finally:
        cleanup()
    if main_process and "stopped_at" not in report:
        if "finished" in report:
            print("training finished; no final test (test.at_end=false)")
        else:
            print_report(report, cfg)
        print(f"run directory: {cfg['output_dir']}")
    return 0
