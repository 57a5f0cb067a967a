"""``nonlocalnet demo``: a miniature of the paper's Table 2(a). A C2D baseline vs one NL block of each instantiation,
trained and tested on the built-in long-range data."""

from __future__ import annotations

import argparse

from . import add_override_arguments, overrides_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.demo import VARIANTS

    parser.add_argument(
        "--config",
        default=None,
        help="the NL network's config (default: configs/synthetic/nl_c2d_tiny.yaml); the baseline "
        "is the same network without its non-local blocks",
    )
    parser.add_argument("--out", default="outputs/demo", help="where the table, JSON, pictures and runs go")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="which networks to train (default: all five)",
    )
    parser.add_argument("--seed", type=int, default=None, help="the seed of data, init and order (default: config's)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: config's)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="networks trained at once, each in its own process (default: one per core)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each network (default 1; the table depends on it, not on --jobs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_override_arguments(parser, "config", "train.lr=0.05 data.train_size=2048")


def run(args: argparse.Namespace) -> int:
    from ..engine.demo import run_demo

    overrides = overrides_of(args)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.iterations is not None:
        overrides.append(f"train.iterations={args.iterations}")
    if args.no_progress:
        overrides.append("progress=false")
    result = run_demo(
        args.out, config=args.config, variants=args.variants, overrides=overrides, jobs=args.jobs, threads=args.threads
    )
    print()
    print(result["markdown"])
    each = ", ".join(f"{r['variant']} {r['train_seconds']:.0f} s" for r in result["rows"])
    print(
        f"\n{len(result['rows'])} networks trained and tested in {result['seconds']:.0f} s in all "
        f"({result['jobs']} at a time, {result['threads']} thread(s) each, torch {result['torch']}); training: "
        f"{each}. Table in {args.out}/results.md, details in {args.out}/results.json"
    )
    return 0
