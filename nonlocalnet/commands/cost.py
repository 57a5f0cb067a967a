"""``nonlocalnet cost MODEL --clip TxHxW --batch B [--train] [--amp bf16|fp16] [--impl PATH]``: parameters,
multiply-adds and the peak memory of one step, per non-local block and in total, for each exact path, estimated on
fake tensors (nothing runs at full size; see :mod:`nonlocalnet.models.cost`)."""

from __future__ import annotations

import argparse
import json

from . import add_override_arguments, overrides_of
from .flops import parse_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered model name (see nonlocalnet.models.list_models())")
    parser.add_argument(
        "--clip", type=parse_clip, default=None, help="input clip TxHxW (default: the model's clip length at 224x224)"
    )
    parser.add_argument("--batch", type=int, default=1, help="clips per step")
    parser.add_argument(
        "--train", action="store_true", help="a training step (forward, loss, backward) instead of an inference one"
    )
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="the forward pass under autocast")
    parser.add_argument(
        "--impl",
        choices=["dense", "sdpa", "chunked", "linear", "sorted"],
        default=None,
        help="only this path in the per-path rows (default: every exact path of each block's mode)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="whose kernels and path choices to simulate (cuda needs CUDA available)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the estimate as JSON here")
    add_override_arguments(parser, "model option", "num_classes=157", words=False)


def run(args: argparse.Namespace) -> int:
    from ..engine.config import options_from_overrides
    from ..io import write_text_atomic
    from ..models.cost import estimate_cost

    if args.batch < 1:
        raise ValueError(f"--batch must be positive; got {args.batch}")
    overrides = options_from_overrides(overrides_of(args), "num_classes=157")
    try:
        estimate = estimate_cost(
            args.model,
            args.clip,
            batch=args.batch,
            train=args.train,
            amp=args.amp,
            impl=args.impl,
            device=args.device,
            overrides=overrides,
        )
    except TypeError as exc:  # an option the model does not take
        raise ValueError(f"--set: {exc}") from None
    print(estimate.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(estimate.to_dict(), indent=2) + "\n")
    return 0
