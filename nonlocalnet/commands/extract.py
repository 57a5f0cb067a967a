"""``nonlocalnet extract VIDEO_OR_LIST... --checkpoint FILE --out FILE.safetensors``: features of every clip.

    nonlocalnet extract videos.txt --checkpoint run/model_final.safetensors --out feats.safetensors
    nonlocalnet extract a.mp4 b.mp4 --checkpoint m.safetensors --layer res4 --per-video --out feats.npy

Clips of the model's clip length (or ``--frames`` / ``--sampling-rate``), one every ``--stride`` frames, scaled and
centre-cropped as the one-crop test view; features of ``forward_features`` or of ``--layer``, averaged over time
and space. An interrupted run resumes where it stopped when run again with the same arguments (see
:mod:`nonlocalnet.engine.extract`). Exit status 1 when some videos could not be decoded (each is named on stderr;
the others are written), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

from .predict import add_model_arguments, add_video_arguments, load_network


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_video_arguments(parser)
    parser.add_argument(
        "--out",
        required=True,
        help="the output: FILE.safetensors (a feature bank file: per video "
        "(clips, C) features and clip starts) or FILE.npy (--per-video)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--layer",
        default=None,
        help="take this layer's output (a module name, e.g. res4 or res4.5) instead of forward_features (res5)",
    )
    parser.add_argument("--per-video", action="store_true", help="one feature per video: the mean over its clips")
    parser.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's / config's)")
    parser.add_argument(
        "--sampling-rate",
        type=int,
        default=None,
        help="one video frame every this many in a clip (default: the model's / config's)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="video frames between clip starts (default: a clip's span, clips side by side)",
    )
    parser.add_argument("--scale", type=int, default=None, help="short side (default: the config's data.test_scale)")
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="centre crop side, 0 for the full frame (default: the config's data.crop_size)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.inputs import video_inputs
    from ..engine.extract import ExtractSettings, extract_features

    videos = video_inputs(args.videos, args.root)
    model, cfg, _ = load_network(args)
    data = cfg["data"]
    crop = data["crop_size"] if args.crop is None else (args.crop or None)
    settings = ExtractSettings(
        frames=args.frames or data["frames"],
        sampling_rate=args.sampling_rate or data["sampling_rate"],
        stride=args.stride,
        scale=args.scale or data["test_scale"],
        crop=crop,
        layer=args.layer,
        per_video=args.per_video,
        model=model.nonlocalnet_record["model"],
        checkpoint=str(args.checkpoint),
        decoder=data["decoder"],
    )
    model.to(torch.device(args.device))
    result = extract_features(
        model,
        videos,
        args.out,
        settings,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
        amp=cfg["train"]["amp"],
        memory_format=cfg["train"]["memory_format"],
    )
    print(
        f"wrote {result.output}: {'per-video' if settings.per_video else 'per-clip'} features ({result.channels} "
        f"channels) of {result.videos} videos"
        + (f" ({result.resumed} from an interrupted run)" if result.resumed else "")
    )
    for video, error in result.failed.items():
        print(f"nonlocalnet extract: skipped {video}: {error}", file=sys.stderr)
    return 1 if result.failed else 0
