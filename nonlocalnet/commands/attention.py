"""``nonlocalnet attention``: did each non-local block learn anything? Per block, on one or several clips: how much
its attention depends on the query, the entropy of its weights, where its strongest keys lie, and the size of its
term against its input; printed as a table, drawn as bar charts (see :mod:`nonlocalnet.viz.diagnostics`).

    nonlocalnet attention --checkpoint run/model_final.safetensors video1.mp4 video2.mp4 [--out diag.png]

Each video (named, or listed in a video list with ``--list``) gives one clip (the model's clip length and sampling
rate, centred), read as ``visualize`` reads it;
a ``.npy`` file is a clip already: (T, H, W, 3) uint8 frames. Without ``--checkpoint`` the model is the registered
one as initialised (every block at the identity).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import add_override_arguments, overrides_of
from .visualize import add_clip_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="VIDEO_OR_CLIP",
        help="video files (anything PyAV reads) or .npy clips of (T, H, W, 3) uint8 frames",
    )
    parser.add_argument(
        "--list",
        default=None,
        metavar="FILE",
        help="also every video of a video list ('path label' lines, Kinetics or Charades style)",
    )
    parser.add_argument(
        "--root", default=None, help="the directory the list's paths are relative to (default: the list file's)"
    )
    parser.add_argument(
        "--model", default=None, help="registered model name (default: the one the checkpoint's metadata names)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="weights: a .safetensors state dict or a training checkpoint (default: none, the model as initialised)",
    )
    parser.add_argument(
        "--block", default="all", help="a block's module name (res4.nl5) or stage.index (res4.5), or 'all' (default)"
    )
    parser.add_argument(
        "--max-queries",
        type=int,
        default=256,
        help="queries sampled per clip for the query distance (its cost grows with their square)",
    )
    add_clip_arguments(parser)
    parser.add_argument("--out", default="attention_diagnostics.png", help="the bar charts' PNG")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the values as JSON here")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: read from the checkpoint)"
    )
    parser.add_argument("--device", default="cpu", help="torch device to run the model on")
    add_override_arguments(parser, "model option", "layers=[1,1,1,1] width=8", words=False)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..engine.config import options_from_overrides
    from ..io import write_text_atomic
    from ..viz.capture import resolve_block_names
    from ..viz.diagnostics import diagnose_attention, diagnosis_table, draw_diagnosis, inactive_blocks

    overrides = options_from_overrides(overrides_of(args), "layers=[1,1,1,1]")
    model, name = _model(args, overrides)
    blocks = resolve_block_names(model, args.block)
    device = torch.device(args.device)
    model.to(device)
    paths = _inputs(args)
    clips = [_clip(path, model, args).unsqueeze(0).to(device) for path in paths]  # each (1, 3, T, H, W)
    diagnoses = diagnose_attention(model, clips, blocks, max_queries=args.max_queries)
    print(
        f"{name} on {len(clips)} clip(s) of {'x'.join(map(str, clips[0].shape[2:]))}"
        + ("" if args.checkpoint else " (no checkpoint: the model as initialised)")
    )
    print(diagnosis_table(diagnoses))
    for line in inactive_blocks(diagnoses):
        print(f"warning: {line}")
    print(f"wrote {draw_diagnosis(diagnoses, args.out)}")
    if args.json:
        values = {
            n: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(d).items()}
            for n, d in diagnoses.items()
        }
        write_text_atomic(
            args.json,
            json.dumps({"model": name, "checkpoint": args.checkpoint, "inputs": paths, "blocks": values}, indent=2)
            + "\n",
        )
    return 0


def _inputs(args: argparse.Namespace) -> list[str]:
    """The files to diagnose on: the positional ones, then the list's."""
    paths = list(args.inputs)
    if args.list is not None:
        from ..data.video_list import read_video_list

        root = Path(args.root) if args.root is not None else Path(args.list).parent
        # labels are not used here: read every style, whatever the number of classes
        paths += [str(root / path) for path, _ in read_video_list(args.list, num_classes=2**62, multi_label=True)]
    if not paths:
        raise ValueError("no video or clip given: name files, or --list a video list")
    return paths


def _model(args: argparse.Namespace, overrides: dict):
    """(the model in eval mode, its name): from the checkpoint, or the registered model as initialised."""
    if args.checkpoint is not None:
        from ..viz.loading import load_model

        model, info = load_model(args.checkpoint, args.model, overrides, args.num_classes)
        return model, info["model"]
    if args.model is None:
        raise ValueError("give --checkpoint, or --model for the model as initialised")
    from ..models import create_model

    if args.num_classes is not None:
        overrides = {**overrides, "num_classes": args.num_classes}
    try:
        return create_model(args.model, **overrides).eval(), args.model
    except TypeError as exc:  # an option the model does not take
        raise ValueError(f"--set: {exc}") from None


def _clip(path: str, model, args: argparse.Namespace):
    """One normalised clip (3, T, H, W) from a video file or a .npy clip."""
    if Path(path).suffix == ".npy":
        import numpy as np
        import torch

        from ..data import transforms

        frames = np.load(path, allow_pickle=False)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"{path}: a .npy clip must hold (T, H, W, 3) uint8 frames; got {frames.dtype} {frames.shape}"
            )
        clip = transforms.to_channels_first(torch.from_numpy(frames))  # (T, H, W, 3) -> (3, T, H, W)
        if args.size is not None:
            clip = transforms.short_side_resize(clip, args.size)
        if args.crop is not None:
            clip = transforms.spatial_crop(clip, args.crop, position=0, num_crops=1)
        return transforms.normalize(clip)
    from ..viz.loading import read_clip

    layout = getattr(model, "clip", None)
    _, clip = read_clip(
        path,
        frames=args.frames or getattr(layout, "frames", 8),
        sampling_rate=args.sampling_rate or getattr(layout, "sampling_rate", 1),
        size=args.size,
        crop=args.crop,
    )
    return clip
