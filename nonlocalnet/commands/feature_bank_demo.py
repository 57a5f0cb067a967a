"""``nonlocalnet feature-bank-demo``: the long-term feature bank on the built-in long-video task.

Trains a tiny short-term backbone, builds feature banks of every clip of every video (safetensors), trains a
clip-only head, a pooled-bank head and the feature bank operator head on frozen features, and prints the table
(also written as results.md and results.json in --out). See :mod:`nonlocalnet.bank.demo`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from . import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bank.demo import DemoConfig

    parser.add_argument(
        "--out", default="outputs/feature_bank_demo", help="folder for the banks, the backbone weights and the table"
    )
    parser.add_argument("--quick", action="store_true", help="the minute-scale version the tests run")
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"(default {getattr(defaults, f.name)}; --quick changes some)",
        )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bank.demo import QUICK, DemoConfig, format_table, run_feature_bank_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else DemoConfig()
    chosen = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
    config = replace(config, **chosen)
    result = run_feature_bank_demo(config, out_dir=args.out, progress=not args.no_progress)
    print()
    print(format_table(result))
    print(
        f"\nwrote {args.out}/results.md, results.json, bank_train.safetensors, bank_test.safetensors, "
        f"backbone.safetensors"
    )
    return 0
