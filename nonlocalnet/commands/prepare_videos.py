"""``nonlocalnet prepare-videos SRC DST --list LIST``: re-encode a video list for fast training (short side 256,
a key frame every 16 frames, every frame kept) and write the new list; see :mod:`nonlocalnet.data.prepare`."""

from __future__ import annotations

import argparse
import sys

FAILURES_SHOWN = 10
SIZES_SHOWN = 5
# the defaults of nonlocalnet.data.prepare, repeated so that --help does not import the video stack
DEFAULT_SHORT_SIDE, DEFAULT_GOP, DEFAULT_CRF = 256, 16, 23


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the folder the list's paths are relative to")
    parser.add_argument(
        "dst",
        metavar="DST",
        help="the output root: the same relative paths ending in .mp4, the new list (the list's "
        "file name) and <list stem>_prepare_report.json",
    )
    parser.add_argument(
        "--list",
        dest="list_file",
        required=True,
        metavar="LIST",
        help="the video list: 'path label' lines (or 'path 3,17,42'), as data.train_list reads",
    )
    parser.add_argument(
        "--multi-label",
        action="store_true",
        help="Charades lines with space-separated labels ('path 3 17 42'): the path is the first "
        "field (otherwise the label is the last field and the path may contain spaces)",
    )
    parser.add_argument(
        "--short-side",
        type=int,
        default=DEFAULT_SHORT_SIDE,
        help=f"short side of the outputs, even; smaller sources keep their size (default: {DEFAULT_SHORT_SIDE})",
    )
    parser.add_argument(
        "--gop", type=int, default=DEFAULT_GOP, help=f"a key frame every this many frames (default: {DEFAULT_GOP})"
    )
    parser.add_argument(
        "--crf",
        type=int,
        default=DEFAULT_CRF,
        help=f"libx264 quality, 0 (lossless) to 51 (worst) (default: {DEFAULT_CRF})",
    )
    parser.add_argument(
        "--fast-decode",
        action="store_true",
        help="libx264's tune=fastdecode: decoded in about half the time, files about 7%% larger (no deblocking filter)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="videos encoded in parallel, one process each (default: min(4, CPU count))",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say how many videos would be converted or are done, and a few target sizes; write nothing",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import plan_preparation, prepare_videos

    settings = {"short_side": args.short_side, "gop": args.gop, "crf": args.crf, "fast_decode": args.fast_decode}
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}")
    if args.dry_run:
        plan = plan_preparation(args.list_file, args.src, args.dst, multi_label=args.multi_label, **settings)
        _print_plan(plan, args.short_side)
        return 0
    report = prepare_videos(
        args.list_file,
        args.src,
        args.dst,
        workers=args.workers,
        multi_label=args.multi_label,
        progress=not args.no_progress,
        **settings,
    )
    for item in report.failed[:FAILURES_SHOWN]:
        print(f"failed: {item['name']} (line {item['lines'][0]}): {item['reason']}", file=sys.stderr)
    if len(report.failed) > FAILURES_SHOWN:
        print(f"... and {len(report.failed) - FAILURES_SHOWN} more failed (see {report.report_file})", file=sys.stderr)
    print(report.summary())
    if not report.listed:
        raise ValueError(
            f"no video of {args.list_file} could be prepared ({len(report.failed)} failed; the reasons "
            f"are in {report.report_file})"
        )
    return 0


def _print_plan(plan, short_side: int) -> None:
    from ..data.decode_errors import VideoDecodeError
    from ..data.prepare import output_path, probe_size, target_size

    total = len(plan.todo) + len(plan.done)
    print(
        f"dry run: {len(plan.todo)} of {total} videos to convert, {len(plan.done)} already done, into "
        f"{plan.dst_root}; the new list would be {plan.new_list}; nothing written"
    )
    for job in plan.todo[:SIZES_SHOWN]:
        try:
            width, height = probe_size(job.src)
        except VideoDecodeError as err:
            print(f"  {job.name}: would fail: {str(err).removeprefix(f'{job.src}: ')}")
            continue
        new_width, new_height = target_size(width, height, short_side)
        print(f"  {job.name}: {width}x{height} -> {output_path(job.name)}: {new_width}x{new_height}")
    if len(plan.todo) > SIZES_SHOWN:
        print(f"  ... and {len(plan.todo) - SIZES_SHOWN} more")
