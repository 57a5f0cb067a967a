"""``nonlocalnet test --config ... --checkpoint run/model_final.safetensors``: multi-view test, table and JSON.

The report goes to ``<output_dir>/test_metrics_<checkpoint name>.json`` (or ``--output``): the training run's own
``test_metrics.json`` is never replaced."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from typing import Any

from . import add_override_arguments, overrides_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="the run's YAML config (its config.yaml works); without it, the model the checkpoint "
        "records on the built-in defaults and the overrides",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights: a .safetensors file or a training checkpoint (.pt); default: "
        "<output_dir>/model_final.safetensors",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON report path (default: <output_dir>/test_metrics_<checkpoint name>.json, beside "
        "the training run's own test_metrics.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_override_arguments(parser, "config", "data.test_clips=10 data.test_crops=3 test.fully_convolutional=true")


def print_report(report: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """A short table of the test metrics."""
    views = report["views_per_video"]
    per_video = f"{views['min']}" if views["min"] == views["max"] else f"{views['min']}-{views['max']}"
    rows = [
        ("videos", report["videos"]),
        ("views", f"{report['views']} ({per_video} per video)"),
        ("skipped (corrupt) videos", report["skipped_videos"]),
    ]
    if "mAP" in report:
        rows[:0] = [
            ("mAP (video: views averaged)", f"{100 * report['mAP']:.2f}"),
            ("mAP (clip: each view alone)", f"{100 * report['clip_mAP']:.2f}"),
        ]
    else:
        rows[:0] = [
            ("top-1 (video: views averaged)", f"{100 * report['top1']:.2f}"),
            ("top-5 (video: views averaged)", f"{100 * report['top5']:.2f}"),
            ("top-1 (clip: each view alone)", f"{100 * report['clip_top1']:.2f}"),
            ("top-5 (clip: each view alone)", f"{100 * report['clip_top5']:.2f}"),
            ("mean class accuracy (video)", f"{100 * report['mean_class_accuracy']:.2f}"),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"{cfg['model']['name']} on {cfg['data']['type']} test data")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    per_class = report.get("per_class_accuracy") or report.get("per_class_ap")
    if per_class and len(per_class) <= 20:
        cells = ", ".join(f"{i}: {'n/a' if math.isnan(v) else f'{100 * v:.1f}'}" for i, v in enumerate(per_class))
        print(f"  per class ({'AP' if 'mAP' in report else 'accuracy'}): {cells}")


def _recorded_model(checkpoint: str) -> list[str]:
    """``model.name=...``, the model a weights file records (its options are read where it is loaded), for a test
    without ``--config``; nothing when the file names none."""
    from ..models.checkpoints.weights import read_state_dict

    name = read_state_dict(checkpoint)[1].get("model_name")
    return [f"model.name={name}"] if name else []


def run(args: argparse.Namespace) -> int:
    from ..engine import load_config, test
    from ..engine.distributed import cleanup, is_main_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = overrides_of(args) + (["progress=false"] if args.no_progress else [])
    if args.config is None and args.checkpoint and not any(o.startswith("model.name=") for o in overrides):
        overrides = _recorded_model(args.checkpoint) + overrides
    cfg = load_config(args.config, overrides)
    try:
        report = test(cfg, checkpoint=args.checkpoint, output=args.output)
        main_process = is_main_process()  # the results are printed once per job, not once per process
    finally:
        cleanup()
    if main_process:
        print_report(report, cfg)
    return 0
