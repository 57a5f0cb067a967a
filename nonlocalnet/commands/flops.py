"""``nonlocalnet flops MODEL --clip 8x224x224``: parameters and multiply-adds per layer and in total."""

from __future__ import annotations

import argparse

from . import add_override_arguments, overrides_of, positive_int


def parse_clip(text: str) -> tuple[int, int, int]:
    """ "8x224x224" -> (8, 224, 224)."""
    parts = text.lower().split("x")
    try:
        t, h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip must be TxHxW, e.g. 8x224x224; got {text!r}") from None
    if min(t, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--clip sizes must be positive; got {text!r}")
    return t, h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered model name (see nonlocalnet.models.list_models())")
    parser.add_argument(
        "--clip", type=parse_clip, default=None, help="input clip TxHxW (default: the model's clip length at 224x224)"
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "32x2", "8x8", "128x1"],
        help="the stem's clip layout; 'auto' keeps the model's unless --clip has the frame count "
        "of another layout (8 frames -> 8x8, 32 -> 32x2, 128 -> 128x1)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=2,
        help="table rows: modules this many levels down (1: stages, 2: blocks, 3: convs)",
    )
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size of the counted input")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the model's)")
    add_override_arguments(parser, "model option", "width=32", words=False)
    parser.add_argument(
        "--real", action="store_true", help="run the real arithmetic on the CPU instead of fake (shape-only) tensors"
    )


def run(args: argparse.Namespace) -> int:
    from ..engine.config import options_from_overrides
    from ..models import CLIP_LAYOUTS, model_defaults
    from ..models.flops import model_cost

    chosen = options_from_overrides(overrides_of(args))
    overrides = dict(chosen)
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    own = model_defaults(args.model).get("clip", "32x2")
    layout = overrides.pop("clip", None) or (args.layout if args.layout != "auto" else own)
    if (
        "clip" not in chosen
        and args.layout == "auto"
        and args.clip is not None
        and CLIP_LAYOUTS[own].frames != args.clip[0]
    ):
        # a clip of another layout's length means that layout's network (8 frames: the 8x8 stem)
        layout = next((n for n, c in CLIP_LAYOUTS.items() if c.frames == args.clip[0]), own)
    overrides["clip"] = layout
    try:
        report = model_cost(
            args.model, args.clip, batch=args.batch, depth=args.depth, fake=not args.real, overrides=overrides
        )
    except TypeError as exc:  # an option the model does not take
        raise ValueError(f"--set: {exc}") from None
    note = f" (the name's own layout is {own})" if layout != own else ""
    print(f"{args.model}: clip layout {layout}{note}")
    print(report.table())
    print(report.summary())
    return 0
