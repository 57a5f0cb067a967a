"""Our convolutions (nonlocalnet/layers/conv.py) and max-pools (layers/pooling.py) against torch's own, at the
networks' shapes.

    python -m benchmarks.conv                       # CPU, one thread per the environment (OMP_NUM_THREADS=1)
    python -m benchmarks.conv --json docs/benchmarks/conv.json

Each row is one convolution of NL I3D R50 (mmaction2's layout, 8x112x112 clips, batch 2) or of the tiny networks
the tests and the demo train, in the layout our commands give it (contiguous for training, channels-last for
inference on a CPU). For each, the forward pass without gradients (what ``test`` and ``predict`` run) and the
forward+backward pass (a training step's share) are timed with our module and with torch's own dispatch
(``torch_conv_dispatch``), round-robin in one process, medians. "ours on" says which kernels ours took: oneDNN
(and, for a k x 1 x 1 kernel on a large enough map, the module's own backward) or torch's dispatch (the call is below
``ONEDNN_MIN_ELEMENTS`` or ``ONEDNN_MIN_MACS``). The ratio is torch's time over ours: above 1 ours is faster.
The limit each row is measured against is torch's own kernels on the same call. A second table does the same
for the networks' max-pools (MaxPool3d against nn.MaxPool3d, on maps in the default layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

import torch

from ._common import fmt, machine, provenance, time_round_robin, write_atomic

# (name, input (B, C, T, H, W), out channels, kernel, stride, padding)
CASES: tuple[
    tuple[str, tuple[int, ...], int, tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]], ...
] = (
    ("res2 1x1x1 256->64", (2, 256, 4, 28, 28), 64, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res2 3x1x1 256->64", (2, 256, 4, 28, 28), 64, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
    ("res2 1x1x1 64->256", (2, 64, 4, 28, 28), 256, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res3 1x1x1 128->512", (2, 128, 2, 14, 14), 512, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res3 1x3x3 128->128", (2, 128, 2, 14, 14), 128, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ("res4 1x1x1 1024->512 (NL)", (2, 1024, 1, 7, 7), 512, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res4 3x1x1 1024->256", (2, 1024, 1, 7, 7), 256, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
    ("res4 1x1x1 256->1024", (2, 256, 1, 7, 7), 1024, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res5 1x1x1 512->2048", (2, 512, 1, 4, 4), 2048, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("res5 3x1x1 2048->512", (2, 2048, 1, 4, 4), 512, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
    ("tiny block 1x1x1 64->32", (2, 64, 4, 8, 8), 32, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("tiny 1x1x1 16->16", (2, 16, 4, 8, 8), 16, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
)


def measure(case: tuple, repeats: int) -> dict[str, Any]:
    from nonlocalnet.layers import conv

    name, shape, out, kernel, stride, padding = case
    module = conv.Conv3d(shape[1], out, kernel, stride=stride, padding=padding, bias=False)
    row: dict[str, Any] = dict(name=name, input=list(shape), out=out, kernel=list(kernel))
    for phase, layout in (("infer", torch.channels_last_3d), ("train", torch.contiguous_format)):
        x = torch.randn(shape).contiguous(memory_format=layout)
        module.to(memory_format=layout)
        if phase == "train":
            x.requires_grad_()

        def step(dispatch, x=x, phase=phase):
            with dispatch():
                if phase == "infer":
                    with torch.inference_mode():
                        module(x)
                else:
                    module(x).sum().backward()

        seconds = time_round_robin(
            {"ours": lambda: step(contextlib.nullcontext), "torch": lambda: step(conv.torch_conv_dispatch)}, repeats
        )
        _record(row, phase, seconds)
        row[f"{phase}_onednn"] = conv.uses_onednn(x, module.weight)
    row["train_own_backward"] = type(module(x).grad_fn).__name__ == "_LeadingKernelConvolutionBackward"
    return row


# (name, input (B, C, T, H, W), kernel, stride, padding): the networks' max-pools, and a map below the threshold
POOLS: tuple[tuple[str, tuple[int, ...], tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]], ...] = (
    ("stem 1x3x3 / 1x2x2", (2, 64, 8, 56, 56), (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("temporal 3x1x1 / 2x1x1", (2, 256, 8, 28, 28), (3, 1, 1), (2, 1, 1), (1, 0, 0)),
    ("tiny 1x3x3 / 1x2x2", (2, 16, 4, 16, 16), (1, 3, 3), (1, 2, 2), (0, 1, 1)),
)


def measure_pool(case: tuple, repeats: int) -> dict[str, Any]:
    """Our MaxPool3d against nn.MaxPool3d on a default-layout map (the layout a CPU training step runs in)."""
    from torch import nn

    from nonlocalnet.layers.pooling import MaxPool3d

    name, shape, kernel, stride, padding = case
    ours, plain = MaxPool3d(kernel, stride, padding), nn.MaxPool3d(kernel, stride, padding)
    row: dict[str, Any] = dict(name=name, input=list(shape), kernel=list(kernel))
    for phase in ("infer", "train"):
        x = torch.randn(shape).relu().requires_grad_(phase == "train")

        def step(module, x=x, phase=phase):
            if phase == "infer":
                with torch.inference_mode():
                    module(x)
            else:
                module(x).sum().backward()

        _record(row, phase, time_round_robin({"ours": lambda: step(ours), "torch": lambda: step(plain)}, repeats))
    return row


def _record(row: dict[str, Any], phase: str, seconds: dict[str, float]) -> None:
    row[f"{phase}_ours_ms"] = seconds["ours"] * 1e3
    row[f"{phase}_torch_ms"] = seconds["torch"] * 1e3
    row[f"{phase}_ratio"] = seconds["torch"] / seconds["ours"]


def _timing_cells(row: dict[str, Any], phase: str) -> list[str]:
    return [fmt(row[f"{phase}_ours_ms"], "", 3), fmt(row[f"{phase}_torch_ms"], "", 3), fmt(row[f"{phase}_ratio"], "x")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="write the rows and their provenance here")
    args = parser.parse_args(argv)
    print(
        f"## Our convolutions against torch's dispatch ({machine()}; ms, medians of {args.repeats}; ratio: torch's "
        "time / ours)\n\n| convolution | input | ours on (infer) | infer ours | torch | ratio | ours on (train) | "
        "fwd+bwd ours | torch | ratio |\n|---|---|---|---:|---:|---:|---|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for case in CASES:
        row = measure(case, args.repeats)
        rows.append(row)
        on = {True: "oneDNN", False: "torch"}
        cells = [row["name"], "x".join(map(str, row["input"]))]
        for phase in ("infer", "train"):
            kernels = on[row[f"{phase}_onednn"]]
            if phase == "train" and row["train_own_backward"]:
                kernels += ", own backward"
            cells += [kernels, *_timing_cells(row, phase)]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(
        "\n## Our max-pool against nn.MaxPool3d, default layout (ms; ratio: torch's time / ours)\n\n"
        "| pool | input | infer ours | torch | ratio | fwd+bwd ours | torch | ratio |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    pools = []
    for case in POOLS:
        row = measure_pool(case, args.repeats)
        pools.append(row)
        cells = [row["name"], "x".join(map(str, row["input"])), *_timing_cells(row, "infer")]
        cells += _timing_cells(row, "train")
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        result = dict(provenance("benchmarks.conv", argv), rows=rows, pools=pools)
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
