"""``nonlocalnet visualize``: draw what a trained model's non-local blocks attend to on a video clip.

    nonlocalnet visualize --model nl_c2d_r50 --checkpoint run/model.safetensors --video clip.mp4 \\
        [--query t,y,x] [--block res4.5] [--out attention.png]

One clip is read from the video with PyAV (the model's clip length and sampling rate, centred in the video
unless --start is given), optionally scaled and centre-cropped, normalised as in training, and run through the
model once; the chosen block's weights are drawn over the frames (see :mod:`nonlocalnet.viz.render`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import add_override_arguments, overrides_of, positive_int


def parse_query(text: str) -> tuple[float, float, float]:
    """ "t,y,x" -> (t, y, x) in input pixels (frame index within the clip, row, column)."""
    try:
        t, y, x = (float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--query must be t,y,x (frame in the clip, row, column); got {text!r}"
        ) from None
    return t, y, x


def output_path(out: str) -> Path:
    """The PNG ``--out`` names: inside it when it is a folder (an existing one, or a name ending in a slash), with
    ``.png`` added when it has no suffix; what is printed is the file written."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / "attention.png"
    return path if path.suffix else path.with_name(path.name + ".png")


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """How a clip is read from a video for a look at the blocks (``visualize``, ``attention``)."""
    parser.add_argument("--frames", type=int, default=None, help="frames in a clip (default: the model's)")
    parser.add_argument(
        "--sampling-rate",
        type=int,
        default=None,
        help="keep one frame every this many (default: the model's clip layout)",
    )
    parser.add_argument("--size", type=int, default=None, help="scale the short side to this (default: as decoded)")
    parser.add_argument("--crop", type=int, default=None, help="centre crop of this size (default: the full frame)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="registered model name (default: the 'model' entry of the checkpoint's metadata)"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="weights: a .safetensors state dict, or a training checkpoint (.pt) with a 'model' entry",
    )
    parser.add_argument("--video", required=True, help="the video file to read the clip from (anything PyAV reads)")
    parser.add_argument(
        "--query",
        type=parse_query,
        default=None,
        help="query position t,y,x in the clip's input pixels (default: the strongest pairs)",
    )
    parser.add_argument(
        "--block",
        default=None,
        help="non-local block: a module name (res4.nl5) or stage.index (res4.5), or 'all' for "
        "one picture per block (default: the last block)",
    )
    parser.add_argument(
        "--out",
        default="attention.png",
        help="PNG to write (with --block all: the name's stem gets the block name appended)",
    )
    add_override_arguments(parser, "model option", "layers=[1,1,1,1] width=8", words=False)
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: read from the checkpoint)"
    )
    parser.add_argument("--start", type=int, default=None, help="first video frame of the clip (default: centred)")
    add_clip_arguments(parser)
    parser.add_argument("--top-k", type=positive_int, default=10, help="arrows to draw")
    parser.add_argument("--max-panels", type=positive_int, default=8, help="at most this many frames in the row")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on")


def run(args: argparse.Namespace) -> int:

    from ..engine.config import options_from_overrides
    from ..engine.distributed import resolve_device
    from ..viz import capture_attention, find_nonlocal_blocks, render_attention
    from ..viz.capture import resolve_block_names
    from ..viz.loading import load_model, read_clip

    overrides = options_from_overrides(overrides_of(args), "layers=[1,1,1,1]")
    model, info = load_model(args.checkpoint, args.model, overrides, args.num_classes)
    if not find_nonlocal_blocks(model):
        raise ValueError(f"model {info['model']} has no non-local block to visualise")
    layout = getattr(model, "clip", None)
    frames = args.frames or getattr(layout, "frames", 8)
    rate = args.sampling_rate or getattr(layout, "sampling_rate", 1)
    raw, clip = read_clip(
        args.video, frames=frames, sampling_rate=rate, start=args.start, size=args.size, crop=args.crop
    )
    names = resolve_block_names(model, args.block)
    device = resolve_device(args.device)
    model.to(device)
    attention = capture_attention(model, clip.unsqueeze(0).to(device), blocks=names)
    out = output_path(args.out)
    for name in names:
        path = out if len(names) == 1 else out.with_name(f"{out.stem}_{name.replace('.', '_')}{out.suffix}")
        summary = render_attention(
            raw, attention[name], path, query=args.query, top_k=args.top_k, max_panels=args.max_panels
        )
        att = attention[name]

        def at(coords) -> str:  # a cell centre in input pixels
            return "(" + ", ".join(f"{c:g}" for c in coords.tolist()) + ")"

        pairs = ", ".join(
            f"{at(att.query_coords[q])}->{at(att.key_coords[k])} {w:.3g}" for q, k, w in summary["pairs"][:5]
        )
        print(
            f"{name}: wrote {path}; query at (t, y, x) = {at(att.query_coords[summary['query']])}; "
            f"strongest pairs, query (t, y, x) -> key (t, y, x) weight: {pairs}"
        )
    print(
        json.dumps(
            {
                "model": info["model"],
                "checkpoint": str(args.checkpoint),
                "video": str(args.video),
                "clip": list(clip.shape),
                "blocks": names,
            }
        )
    )
    return 0
