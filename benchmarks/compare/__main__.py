"""Our non-local block against the implementations a user would pick instead, side by side, on the same inputs.

    pip install -e ".[bench]"                          # the peers: mmcv-lite + mmengine, timm, pytorchvideo
    OMP_NUM_THREADS=1 python -m benchmarks.compare     # every section at the paper's shapes (1 thread)
    python -m benchmarks.compare --quick               # small shapes and models, a smoke run
    python -m benchmarks.compare --sections table --markdown compare.md --json compare.json --plot scale.png

(from the repository's root). One module per section (``peers.py`` holds the peers and their weight mappings);
this one parses the options and runs the sections.

Sections (``--sections``):

- ``table``: forward+backward time and peak memory of each peer in each configuration it supports, against our
  block configured to compute the same function. Equivalence before speed: the peer's weights are randomised
  and loaded into our block (subsample before or after the projections, scale, norm as the peer has them),
  both run on the same input, and the max abs difference of the outputs is a column; a peer whose output
  differs is marked "mismatch", one that raises is marked "failed" with the reason, and a configuration whose
  dense pairwise matrices would pass ``--budget-gb`` is skipped and marked. Ratios are peer / ours; the flops
  of each side (counted on fake tensors) say how much of a time ratio is arithmetic.
- ``scale``: the largest 2D map without subsampling (B=1, C=``--scale-channels``) each implementation handles
  under ``--scale-budget-gb``, growing the side by √2 until the memory budget or a step longer than
  ``--scale-max-step-s`` stops it; a PNG (``--plot``) of time and memory against positions.
- ``efficiency``: achieved FLOP/s of each of our paths (flops counted over a forward+backward by torch's
  FlopCounterMode with what it leaves out: ``_common.count_flops``) as a fraction of a plain float32 matrix
  multiply measured in the same run.
- ``models``: train steps/s and inference clips/s of whole networks, ours as our commands run them against the
  peers' own as their training code runs them (mmaction2's NL I3D R50, PyTorchVideo's I3D R50), each pair side by
  side in one child process; ``--model-variants`` adds ours in other layouts and precisions, compiled, or on
  torch's own convolution dispatch (``models.py`` says what each is).
- ``overhead``: the host time (wall and the profiler's CPU time) of one forward+backward of a tiny block, ours
  against each peer's, where Python and dispatch, not arithmetic, set the time.

Every measurement runs in a fresh child process, so one run's allocations cannot hide another's and a peer that
crashes or runs out of memory is reported instead of ending the benchmark. Times are medians; peer and ours of
one table row are interleaved round-robin after ``--warmup`` untimed steps each; a step longer than
``--long-step-s`` is timed once, after one warm-up step.
Peak memory on CPU is the rise of the resident set over one forward+backward (see ``_common.py``); on CUDA
torch.cuda.max_memory_allocated.

On a CPU that other processes share, run with OMP_NUM_THREADS=1: with more threads than free cores, PyTorch's
CPU flash-attention kernel (our softmax path) waits on descheduled threads and slows down several-fold, far more
than the peers' large matrix multiplies do, which makes the comparison about the machine rather than the code.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file from any folder: import the repository's packages, as -m would
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.compare"

import argparse
import json
import sys
import time
from typing import Any

from .._common import provenance, write_atomic
from ..block import DEFAULT_SHAPES, SHAPES
from .efficiency import efficiency_section
from .models import PAIRS, VARIANTS, models_section
from .overhead import overhead_section
from .peers import PEERS
from .scale import scale_section
from .table import table_section

# --quick: the same kinds of input, small enough for a smoke run
QUICK_SHAPES = {
    "res4": ((1, 256, 4, 14, 14), (1, 2, 2), "res4-like, C=256, B=1"),
    "res3": ((1, 128, 4, 28, 28), (1, 2, 2), "res3-like, C=128, B=1"),
    "image": ((1, 128, 48, 48), None, "image map, C=128, no subsampling"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["table", "scale", "efficiency", "models", "overhead"],
        choices=["table", "scale", "efficiency", "models", "overhead"],
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and models (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory from torch.cuda there)")
    parser.add_argument("--shapes", nargs="+", help="table shapes (default: all of the chosen set)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--variants", nargs="+", help="table: only these configurations (the peers' own names)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="table: untimed steps of each side after the equivalence check's (the allocator's and oneDNN's "
        "caches then hold what a training run's later steps find)",
    )
    parser.add_argument(
        "--long-step-s", type=float, default=5.0, help="a step longer than this is timed once, after one warm-up"
    )
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=8.0,
        help="table: skip a peer configuration whose estimated peak exceeds this",
    )
    parser.add_argument("--no-memory", action="store_true", help="table: skip the peak-memory measurement")
    parser.add_argument("--show-na", action="store_true", help="table: also list configurations a peer lacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=600, help="seconds before a child is stopped")
    parser.add_argument("--scale-budget-gb", type=float, default=4.0)
    parser.add_argument("--scale-channels", type=int, default=64)
    parser.add_argument("--scale-max-side", type=int, default=2048)
    parser.add_argument(
        "--scale-max-step-s", type=float, default=8.0, help="scale: stop growing once a step takes longer than this"
    )
    parser.add_argument("--plot", help="scale: write the time/memory plot to this PNG")
    parser.add_argument("--efficiency-shape", help="efficiency: the shape (default res3)")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument(
        "--pairs",
        nargs="+",
        metavar="OURS=PEER",
        help="models: the pairs to measure (default: " + " ".join(f"{a}={b}" for a, b in PAIRS) + ")",
    )
    parser.add_argument(
        "--model-variants",
        nargs="+",
        default=[],
        choices=VARIANTS,
        help="models: ours also in these variants (default: only as our commands run it)",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clip", type=int, nargs=3, default=(8, 112, 112), metavar=("T", "H", "W"))
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--overhead-repeats", type=int, default=200, help="overhead: timed steps per side (median)")
    parser.add_argument("--markdown", help="write the printed tables to this markdown file")
    parser.add_argument("--json", help="write every measurement to this JSON file")
    args = parser.parse_args(argv)

    paper = {name: SHAPES[name] for name in DEFAULT_SHAPES["cuda" if "cuda" in args.device else "cpu"]}
    shapes = QUICK_SHAPES if args.quick else paper
    args.shapes = args.shapes or list(shapes)
    for name in args.shapes:
        if name not in shapes:
            parser.error(f"unknown shape {name!r} for this set; choose from {', '.join(shapes)}")
    args.efficiency_shape = args.efficiency_shape or "res3"
    if args.efficiency_shape not in shapes:
        parser.error(f"unknown --efficiency-shape {args.efficiency_shape!r}; choose from {', '.join(shapes)}")
    if args.quick:
        args.scale_max_side = min(args.scale_max_side, 256)
        args.scale_max_step_s = min(args.scale_max_step_s, 2.0)
        args.clip = (8, 64, 64)
        args.batch = 1
        args.model_repeats = 1
        args.overhead_repeats = min(args.overhead_repeats, 5)
    args.pairs = [tuple(p.split("=", 1)) for p in args.pairs] if args.pairs else PAIRS
    for pair in args.pairs:
        if len(pair) != 2 or pair[1].split(":")[0] not in ("mmaction2", "pytorchvideo"):
            parser.error(f"--pairs takes OURS=PEER with PEER mmaction2:... or pytorchvideo:...; got {'='.join(pair)!r}")

    capture = _Tee() if args.markdown else None
    results: dict[str, Any] = dict(provenance("benchmarks.compare", argv, args.device))
    started = time.perf_counter()
    try:
        if "table" in args.sections:
            results["table"] = table_section(args, shapes)
        if "scale" in args.sections:
            results["scale"] = scale_section(args)
        if "efficiency" in args.sections:
            results["efficiency"] = efficiency_section(args, shapes)
        if "models" in args.sections:
            results["models"] = models_section(args)
        if "overhead" in args.sections:
            results["overhead"] = overhead_section(args)
    finally:
        if capture:
            capture.close()
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if args.markdown:
        write_atomic(args.markdown, capture.text)
    if args.json:
        write_atomic(args.json, json.dumps(results, indent=1, default=str))


class _Tee:
    """Copies what is printed to stdout, for --markdown."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.stdout = sys.stdout
        sys.stdout = self

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stdout.write(text)

    def flush(self) -> None:
        self.stdout.flush()

    def close(self) -> None:
        sys.stdout = self.stdout

    @property
    def text(self) -> str:
        return "".join(self.parts)


if __name__ == "__main__":
    main()
