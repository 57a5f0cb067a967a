"""``nonlocalnet predict VIDEO... --checkpoint FILE [--model NAME | --config CFG]``: the top classes of videos.

    nonlocalnet predict clip.mp4 --checkpoint nl_i3d_r50.safetensors --top-k 5
    nonlocalnet predict videos.txt --config run/config.yaml --checkpoint run/model_final.safetensors --json out.json

Every video is scored on the test views (the config's ``data.test_clips`` x ``data.test_crops``, or ``--views``),
the views averaged (:mod:`nonlocalnet.engine.predict`). Class names: ``--classes FILE``, else those the weights
file records, else the shipped Kinetics-400 / Charades names where the config names that dataset, else indices.

Exit status: 0; 1 when some videos could not be decoded (each is listed in the output with the decoder's message;
the others are scored); 2 (one ``error:`` line) for bad input, or when no video could be decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import add_override_arguments, overrides_of


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the network and its weights (``predict`` and ``extract``)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="weights: a .safetensors file (of training, or of `nonlocalnet convert`) or a training checkpoint (.pt)",
    )
    parser.add_argument(
        "--model", default=None, help="registered model name (default: the one the checkpoint records, or the config's)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a run's YAML config (its config.yaml works): model, options and the data's clip and test views",
    )
    parser.add_argument(
        "--root", default=None, help="folder the paths of a video list are relative to (default: the list's folder)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding videos (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_override_arguments(parser, "config", "data.test_scale=256 data.crop_size=224", words=False)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The videos a command reads (``predict``, ``extract``): files, or list files of them."""
    parser.add_argument(
        "videos",
        nargs="+",
        metavar="VIDEO",
        help="video files, or list files (.txt/.list/.csv: one video a line; 'path label' lines of a "
        "training list work too)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_video_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="classes to report per video (default 5)")
    parser.add_argument(
        "--views",
        default=None,
        metavar="CLIPSxCROPS",
        help="test views per video, e.g. 10x3 (default: the config's data.test_clips x "
        "data.test_crops, 10x3 without a config)",
    )
    parser.add_argument(
        "--classes", default=None, help="class names, one a line (line i names class i); default: the checkpoint's"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="what to print: a table per video (text) or the JSON"
    )


def parse_views(text: str) -> tuple[int, int]:
    """ "10x3" -> (10, 3)."""
    try:
        clips, crops = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--views must be CLIPSxCROPS, e.g. 10x3; got {text!r}") from None
    if clips < 1 or crops < 1:
        raise ValueError(f"--views needs at least one clip and one crop; got {text!r}")
    return clips, crops


def load_network(
    args: argparse.Namespace, extra_overrides: list[str] = ()
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """The model of ``--checkpoint`` (``--model`` / ``--config``), the run config (for data settings), and the
    checkpoint's metadata (empty for a torch file).

    Without ``--config`` the config is the defaults with the model's clip (frames, sampling rate), then ``--set``.
    """
    from ..engine.config import load_config
    from ..models.checkpoints.weights import load_model, read_metadata

    checkpoint = Path(args.checkpoint)
    overrides = [*extra_overrides, *overrides_of(args)]
    if args.config is not None:
        cfg = load_config(args.config, overrides)
        name = args.model or cfg["model"]["name"]
        options = {"num_classes": cfg["data"]["num_classes"], **cfg["model"]["options"]}
        model = load_model(checkpoint, name, context=f" with data.num_classes={cfg['data']['num_classes']}", **options)
    else:
        model = load_model(checkpoint, args.model)
        layout = getattr(model, "clip", None)
        clip = [f"data.frames={layout.frames}", f"data.sampling_rate={layout.sampling_rate}"] if layout else []
        cfg = load_config(None, [*clip, *overrides])
    metadata = read_metadata(checkpoint) if checkpoint.suffix == ".safetensors" else {}
    return model, cfg, metadata


def class_names(
    args: argparse.Namespace, cfg: dict[str, Any], metadata: dict[str, str], num_classes: int
) -> tuple[list[str] | None, str | None]:
    """(names, where they come from) for a classifier of ``num_classes``; (None, None) where unknown."""
    from ..data.class_names import DATASETS, dataset_class_names, read_class_names, recorded_class_names

    if args.classes is not None:
        names, source = read_class_names(args.classes), args.classes
    elif (names := recorded_class_names(metadata, args.checkpoint)) is not None:
        source = "checkpoint"
    else:
        dataset = (
            {"kinetics": "kinetics400", "charades": "charades"}.get(cfg["data"]["type"])
            if args.config is not None
            else None
        )
        if dataset is None or DATASETS[dataset][1] != num_classes:
            return None, None
        names, source = dataset_class_names(dataset), dataset
    if len(names) != num_classes:
        raise ValueError(f"{source}: {len(names)} class names for a classifier of {num_classes} classes")
    return names, source


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.inputs import video_inputs
    from ..engine.predict import predict_videos, top_classes

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1; got {args.top_k}")
    views = parse_views(args.views) if args.views else None
    extra = [f"data.test_clips={views[0]}", f"data.test_crops={views[1]}"] if views else []
    videos = video_inputs(args.videos, args.root)
    model, cfg, metadata = load_network(args, extra)
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes < 1:
        raise ValueError(
            f"{args.checkpoint} holds no classifier (num_classes 0); use `nonlocalnet extract` for features"
        )
    names, source = class_names(args, cfg, metadata, num_classes)
    if names is None:
        print(
            f"nonlocalnet predict: class names unknown ({args.checkpoint} records none); showing class indices "
            f"(--classes FILE names them)",
            file=sys.stderr,
        )
    multi_label = (
        cfg["data"]["type"] == "charades" if args.config is not None else metadata.get("dataset") == "charades"
    )
    model.to(torch.device(args.device))
    results = predict_videos(
        model,
        videos,
        cfg["data"],
        multi_label=multi_label,
        fully_convolutional=bool(cfg["test"]["fully_convolutional"]),
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
        amp=cfg["train"]["amp"],
        memory_format=cfg["train"]["memory_format"],
    )
    failed = [r for r in results if r.scores is None]
    if len(failed) == len(results):
        raise ValueError(
            failed[0].error
            if len(failed) == 1
            else f"none of the {len(failed)} videos could be decoded: " + "; ".join(r.error for r in failed[:3])
        )
    report = {
        "model": model.nonlocalnet_record["model"],
        "checkpoint": str(args.checkpoint),
        "activation": "sigmoid" if multi_label else "softmax",
        "views": {"clips": cfg["data"]["test_clips"], "crops": cfg["data"]["test_crops"]},
        "class_names": source,
        "videos": [
            {"video": r.video.id, "views": r.views, "top": top_classes(r.scores, args.top_k, names)}
            for r in results
            if r.scores is not None
        ],
        "failed": [{"video": r.video.id, "error": r.error} for r in failed],
    }
    if args.json:
        from ..io import write_text_atomic

        write_text_atomic(args.json, json.dumps(report, indent=2))
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    for r in failed:
        print(f"nonlocalnet predict: skipped {r.video.id}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def print_report(report: dict[str, Any]) -> None:
    """A small table per video: rank, class, score."""
    what = "probability" if report["activation"] == "softmax" else "score (sigmoid)"
    for video in report["videos"]:
        print(f"{video['video']}  ({video['views']} views; {what})")
        width = max(len(_label(t)) for t in video["top"])
        for rank, top in enumerate(video["top"], start=1):
            print(f"  {rank:>2}. {_label(top):<{width}}  {top['score']:.4f}")
    if report["failed"]:
        print(
            f"{len(report['failed'])} video(s) could not be decoded: " + ", ".join(f["video"] for f in report["failed"])
        )


def _label(top: dict[str, Any]) -> str:
    return f"{top['name']} ({top['class']})" if top["name"] is not None else f"class {top['class']}"
