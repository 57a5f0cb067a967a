"""``nonlocalnet convert SRC DST``: a checkpoint of another zoo (official Caffe2, PyTorchVideo, mmaction2) into
a safetensors file of the nonlocalnet model that computes the same function (see
:mod:`nonlocalnet.models.checkpoints.formats`)."""

from __future__ import annotations

import argparse
import json
import os

from . import add_override_arguments, overrides_of


def add_arguments(parser: argparse.ArgumentParser, source_format: str = "auto") -> None:
    parser.add_argument(
        "input", help="the checkpoint: an official Caffe2 .pkl, a PyTorchVideo .pyth or an mmaction2 .pth"
    )
    parser.add_argument("output", help="the .safetensors file to write (its folder is created)")
    parser.add_argument(
        "--from",
        dest="source_format",
        default=source_format,
        choices=("auto", "caffe2", "pytorchvideo", "mmaction2"),
        help=f"the zoo the file comes from (default: {source_format}"
        + (", recognised from the file)" if source_format == "auto" else ")"),
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the registered model to convert into, e.g. nl_i3d_r50_8x8 (default: worked out from "
        "the tensors, the file name and any config the file records)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs (default: the rows of the checkpoint's classifier)",
    )
    parser.add_argument(
        "--skip-classifier",
        action="store_true",
        help="leave the classifier out (checkpoints without one, e.g. the official fine-tuning "
        "inits, or to fine-tune on other classes): the file holds the model with "
        "num_classes=0, and model.pretrained fills a classifier of any size fresh",
    )
    parser.add_argument(
        "--paper-layout",
        action="store_true",
        help="(caffe2) build the paper's layout (pool1 padded by 1, 56x56 at 224²) instead of the "
        "official network the checkpoint was trained in (pool1 unpadded, 55x55)",
    )
    add_override_arguments(parser, "model option", "layers=[3,4,6,3]", words=False)


def run(args: argparse.Namespace) -> int:
    from ..data.class_names import class_names_metadata, dataset_class_names, dataset_of
    from ..engine.config import options_from_overrides
    from ..io import atomic_path
    from ..models import save_weights
    from ..models.checkpoints.formats import convert_checkpoint

    if not args.output.endswith(".safetensors"):
        raise ValueError(
            f"the output {args.output!r} must end in .safetensors (the format it is written in, "
            f"which is how nonlocalnet reads it back)"
        )
    if os.path.isdir(args.output):
        raise ValueError(f"the output {args.output!r} is a directory; give a file name ending in .safetensors")
    result = convert_checkpoint(
        args.input,
        source_format=args.source_format,
        model=args.model,
        num_classes=args.num_classes,
        skip_classifier=args.skip_classifier,
        paper_layout=args.paper_layout,
        overrides=options_from_overrides(overrides_of(args), "layers=[3,4,6,3]"),
    )
    model = result.model
    options = {k: v for k, v in result.options.items() if k != "num_classes"}
    metadata = {
        "model": result.model_name,
        "num_classes": str(model.num_classes),
        "source": os.path.basename(args.input),
        "converted_from": result.source_format,
        "model_options": json.dumps(options),
    }
    dataset = dataset_of(model.num_classes)  # the zoos' classifiers are Kinetics-400's or Charades'
    if dataset is not None:
        metadata.update(dataset=dataset, **class_names_metadata(dataset_class_names(dataset)))
    if result.source_format == "caffe2":
        metadata["affine"] = "yes" if any("affine" in n for n in result.notes) else "no"
    with atomic_path(args.output) as tmp:  # the output folder is created; a failed write leaves no half file
        save_weights(result.state_dict, tmp, metadata=metadata)
    print(
        f"wrote {args.output}: {len(result.state_dict)} tensors of a {result.source_format} checkpoint for "
        f"{result.model_name} ({model.num_classes} classes"
        + (f", options {json.dumps(options)}" if options else "")
        + ")"
        + "".join(f"; {note}" for note in result.notes)
        + (f"; class names of {dataset}" if dataset else "")
        + ("; classifier left out (num_classes 0: the model gives pooled features)" if args.skip_classifier else "")
    )
    return 0
