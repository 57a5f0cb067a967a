"""``nonlocalnet convert-caffe2 in.pkl out.safetensors --model nl_i3d_r50``: official checkpoints to safetensors."""
from __future__ import annotations

import argparse
import ast
import json
import os
from typing import Any


def parse_override(text: str) -> tuple[str, Any]:
    """"width=32" -> ("width", 32); the value is a Python literal (a bare word is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, e.g. layers=(3,4,6,3); got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an official Caffe2 checkpoint (.pkl)")
    parser.add_argument("output", help="the safetensors file to write")
    parser.add_argument("--model", required=True,
                        help="the registered model the checkpoint was trained as, e.g. nl_i3d_r50, i3d_r50_128x1")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier outputs (default: the rows of the checkpoint's pred_w)")
    parser.add_argument("--skip-classifier", action="store_true",
                        help="leave the classifier out (for checkpoints without pred_w/pred_b, e.g. the official "
                             "fine-tuning inits); load the file with strict=False")
    parser.add_argument("--paper-layout", action="store_true",
                        help="build the paper's layout (pool1 padded by 1, 56x56 at 224²) instead of the official "
                             "network the checkpoint was trained in (pool1 unpadded, 55x55)")
    parser.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="a model option, e.g. --set layers=(3,4,6,3); repeatable")


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_path
    from ..models import CLIP_LAYOUTS, create_model, save_weights
    from ..models.caffe2 import Caffe2ConversionError, convert_caffe2_blobs, load_caffe2_pickle

    create_model(args.model)  # an unknown name fails here, with the closest names, before the file is read
    blobs = load_caffe2_pickle(args.input)
    num_classes = args.num_classes
    if num_classes is None and "pred_w" in blobs and not args.skip_classifier:
        num_classes = int(blobs["pred_w"].shape[0])
    overrides = dict(args.overrides)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    try:
        model = create_model(args.model, **overrides)
        if "clip" not in overrides and not args.paper_layout and model.clip_name in CLIP_LAYOUTS \
                and f"{model.clip_name}_official" in CLIP_LAYOUTS:
            # the network the official code ran: same weights, pool1 unpadded
            overrides["clip"] = f"{model.clip_name}_official"
            model = create_model(args.model, **overrides)
    except TypeError as exc:  # an option the model does not take
        raise ValueError(f"--set: {exc}") from None
    try:
        result = convert_caffe2_blobs(blobs, model, skip=("head.",) if args.skip_classifier else ())
    except Caffe2ConversionError as exc:
        raise Caffe2ConversionError(f"{args.input} as {args.model}: {exc}") from None
    # the file must load back into the model it was made for
    model.load_state_dict(result.state_dict, strict=not args.skip_classifier)
    metadata = {"model": args.model, "num_classes": str(model.num_classes), "source": os.path.basename(args.input),
                "converted_from": "caffe2", "affine": "yes" if result.affine else "no",
                "model_options": json.dumps({k: v for k, v in overrides.items() if k != "num_classes"})}
    with atomic_path(args.output) as tmp:  # the output folder is created; a failed write leaves no half file
        save_weights(result.state_dict, tmp, metadata=metadata)
    print(f"wrote {args.output}: {len(result.state_dict)} tensors for {args.model} ({model.num_classes} classes, "
          f"clip layout {model.clip_name})"
          + (f"; {len(result.affine)} norm layers from affine (frozen-BN) blobs" if result.affine else "")
          + (f"; skipped {len(result.skipped)} training-state blobs" if result.skipped else "")
          + ("; classifier left out" if args.skip_classifier else ""))
    return 0
