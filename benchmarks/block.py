"""Forward+backward time and peak memory of each non-local mode and path at the paper's shapes.

    python -m benchmarks.block                   # the paper's shapes, table to stdout (+ --markdown FILE)
    python -m benchmarks.block --shapes res4     # one shape
    python -m benchmarks.block --device cuda     # on a GPU (peak memory from torch.cuda), res3_128_b8 included
    python -m benchmarks.block --quick           # tiny shapes: a smoke run of the same code
    python -m benchmarks.block --autocast bf16   # every step under autocast (what mixed-precision training runs)

Each (shape, mode) ends with a line saying which path ``impl="auto"`` takes there and its time as a share of
the fastest path's (the planner's goal: within 5%).

Times are measured side by side in this process, the paths of one (shape, mode) interleaved round-robin so
that machine drift hits them alike; the ratio column is dense time / path time. Peak memory on CPU is the
rise of the resident set size over a forward+backward, measured in a fresh child process per configuration
(so one run's allocations cannot hide another's); on CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file from any folder: import the repository's packages, as -m would
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import argparse
import contextlib
import json
import math

import torch

from nonlocalnet import NonLocalBlock
from nonlocalnet.layers import IMPLS_BY_MODE, MODES, pairwise_softmax
from nonlocalnet.layers.pairwise import memory_budget, resolve_impl

from ._common import (
    MALLOC_ENV,
    fmt,
    machine,
    peak_memory_mb,
    peak_rss_rise_mb,
    provenance,
    run_child,
    time_round_robin,
    write_atomic,
)

# name -> (input shape (B, C, *spatial), subsample, what it is)
SHAPES = {
    "res4": ((2, 1024, 4, 14, 14), (1, 2, 2), "res4 of a 32-frame clip"),
    "res3": ((2, 512, 4, 28, 28), (1, 2, 2), "res3 of a 32-frame clip"),
    "res3_128": ((1, 512, 16, 28, 28), (1, 2, 2), "res3 of a 128-frame clip"),
    "image": ((1, 512, 128, 128), None, "image map, no subsampling"),
    "res3_128_b8": ((8, 512, 16, 28, 28), (1, 2, 2), "res3 of 128-frame clips, batch 8 (GPU runs)"),
}
# --quick: the same kinds of input, small enough for a smoke run of the same code
SHAPES.update(
    {
        "tiny_res4": ((1, 64, 2, 7, 7), (1, 2, 2), "res4-like, C=64"),
        "tiny_res3": ((1, 32, 2, 14, 14), (1, 2, 2), "res3-like, C=32"),
        "tiny_image": ((1, 32, 16, 16), None, "image map, C=32, no subsampling"),
    }
)
QUICK_SHAPES = ["tiny_res4", "tiny_res3", "tiny_image"]
DEFAULT_SHAPES = {
    "cpu": ["res4", "res3", "res3_128", "image"],
    "cuda": ["res4", "res3", "res3_128", "image", "res3_128_b8"],
}
# The literal concatenation reference builds a (B, N, M, 2C') pair tensor: skip it beyond this many elements.
DENSE_CONCAT_LIMIT = 1.5e9


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build(shape_name: str, mode: str, impl: str, device: str) -> tuple[NonLocalBlock, torch.Tensor]:
    """A live block and its input; ``impl`` is a path."""
    shape, subsample, _ = SHAPES[shape_name]
    dim = len(shape) - 2
    block = NonLocalBlock(shape[1], dim=dim, mode=mode, subsample=subsample, impl=impl).to(device)
    with torch.no_grad():
        block.norm.weight.fill_(1.0)  # a live block: gradients reach every path
    x = torch.randn(*shape, device=device, requires_grad=True)
    return block, x


def step(block: NonLocalBlock, x: torch.Tensor, autocast: str | None = None) -> None:
    """One forward+backward, under ``autocast`` (bf16 / fp16) when given: the precision policy of
    nonlocalnet.layers.pairwise decides what each path runs in."""
    with torch.autocast(x.device.type, dtype=AUTOCAST[autocast]) if autocast else contextlib.nullcontext():
        z = block(x)
    z.float().sum().backward()
    x.grad = None
    block.zero_grad(set_to_none=True)


def auto_choice(shape_name: str, mode: str, device: str, autocast: str | None = None) -> str:
    """The path a block with ``impl="auto"`` plans for this shape (spacetime extent: one problem per clip)."""
    shape, subsample, _ = SHAPES[shape_name]
    n = math.prod(shape[2:])
    m = math.prod(s // k for s, k in zip(shape[2:], subsample)) if subsample else n
    channels = shape[1]
    return resolve_impl(
        mode,
        "auto",
        n,
        m,
        channels if mode == "gaussian" else channels // 2,
        channels // 2,
        batch=shape[0],
        device_type=torch.device(device).type,
        dtype=AUTOCAST[autocast] if autocast else torch.float32,
        budget=memory_budget(device),
    )


def paths(mode: str) -> list[str]:
    """The rows of one mode: every path."""
    return list(IMPLS_BY_MODE[mode])


def too_big(shape_name: str, mode: str, impl: str) -> bool:
    if not (mode == "concatenation" and impl == "dense"):
        return False
    shape, subsample, _ = SHAPES[shape_name]
    n = 1
    for s in shape[2:]:
        n *= s
    m = n
    for k in subsample or ():
        m //= k
    return shape[0] * n * m * shape[1] > DENSE_CONCAT_LIMIT  # 2C' = C


def peak_memory(shape_name: str, mode: str, impl: str, device: str, autocast: str | None = None) -> float:
    """MB one forward+backward adds at its peak: torch.cuda's peak allocation on CUDA; on CPU the rise of the peak
    resident set in a fresh child process (so one run's allocations cannot hide another's)."""
    if device.startswith("cuda"):
        block, x = build(shape_name, mode, impl, device)
        step(block, x, autocast)  # warm-up
        return peak_memory_mb(lambda: step(block, x, autocast), device)
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, hiding later allocations from
    # the resident set; a fixed small threshold maps every tensor fresh and returns it on free.
    spec = dict(
        shape=shape_name,
        mode=mode,
        impl=impl,
        threads=torch.get_num_threads(),
        autocast=autocast,
        chunk_elements=pairwise_softmax.CHUNK_ELEMENTS,
    )
    result = run_child("benchmarks.block:measure_rss", spec, timeout=600, env=MALLOC_ENV)
    if "mb" not in result:
        raise RuntimeError(f"the memory child of {shape_name} {mode} {impl} {result['status']}")
    return result["mb"]


def measure_rss(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    pairwise_softmax.CHUNK_ELEMENTS = spec["chunk_elements"]
    block, x = build(spec["shape"], spec["mode"], spec["impl"], "cpu")
    step(block, x, spec["autocast"])  # warm-up: allocator caches and kernels in place
    return dict(mb=peak_rss_rise_mb(lambda: step(block, x, spec["autocast"])))


def time_paths(
    shape_name: str, mode: str, impls: list[str], device: str, repeats: int, autocast: str | None = None
) -> dict[str, float]:
    runs = {impl: build(shape_name, mode, impl, device) for impl in impls}
    return time_round_robin(
        {impl: (lambda run=run: step(*run, autocast)) for impl, run in runs.items()}, repeats, device
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        help="default: " + " ".join(DEFAULT_SHAPES["cpu"]) + " (on CUDA also res3_128_b8)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run of the same code)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-elements",
        type=int,
        metavar="N",
        help="the chunked path's chunk size in weights (default: nonlocalnet's, per device)",
    )
    parser.add_argument(
        "--autocast",
        choices=list(AUTOCAST),
        help="run every step under autocast in this dtype (default: float32 throughout)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (
        QUICK_SHAPES if args.quick else DEFAULT_SHAPES["cuda" if "cuda" in args.device else "cpu"]
    )

    if args.chunk_elements:
        pairwise_softmax.CHUNK_ELEMENTS = pairwise_softmax.GPU_CHUNK_ELEMENTS = args.chunk_elements
    rows: list[dict] = []
    plans: list[dict] = []  # per (shape, mode): auto's path against the fastest measured
    header = (
        "| shape | mode | path | fwd+bwd ms | × vs dense | peak MB | mem / dense |\n|---|---|---|---:|---:|---:|---:|"
    )
    chunks = pairwise_softmax.default_chunk_elements(torch.device(args.device).type)
    print(
        f"{machine(args.device)}; {'autocast ' + args.autocast if args.autocast else 'float32'}; "
        f"chunks of {chunks} weights"
    )
    print(header)
    for shape_name in args.shapes:
        for mode in args.modes:
            impls = [i for i in paths(mode) if not too_big(shape_name, mode, i)]
            times = time_paths(shape_name, mode, impls, args.device, args.repeats, args.autocast)
            for impl in paths(mode):
                if impl not in times:
                    row = dict(shape=shape_name, mode=mode, impl=impl, ms=None, speedup=None, mb=None, mem=None)
                    rows.append(row)
                    print(
                        f"| {shape_name} | {mode} | {impl} | skipped: the (B, N, M, 2C') pair tensor is too "
                        f"large | | | |"
                    )
                    continue
                mb = None if args.no_memory else peak_memory(shape_name, mode, impl, args.device, args.autocast)
                rows.append(
                    dict(shape=shape_name, mode=mode, impl=impl, autocast=args.autocast, ms=times[impl] * 1e3, mb=mb)
                )
            dense = next(
                (
                    r
                    for r in rows
                    if r["shape"] == shape_name and r["mode"] == mode and r["impl"] == "dense" and r["ms"] is not None
                ),
                None,
            )
            chosen = auto_choice(shape_name, mode, args.device, args.autocast)
            measured = [r for r in rows if r["shape"] == shape_name and r["mode"] == mode and r["ms"] is not None]
            fastest = min(measured, key=lambda r: r["ms"])
            for r in measured:
                r["speedup"] = dense["ms"] / r["ms"] if dense else None
                r["mem"] = (r["mb"] / dense["mb"]) if dense and r["mb"] and dense["mb"] else None
                r["auto"] = r["impl"] == chosen
                print(
                    f"| {shape_name} | {mode} | {r['impl']}{' (auto)' if r['auto'] else ''} | {r['ms']:.1f} | "
                    f"{fmt(r['speedup'], 'x')} | {fmt(r['mb'], '')} | {fmt(r['mem'], '')} |",
                    flush=True,
                )
            auto_ms = next(r["ms"] for r in measured if r["impl"] == chosen)
            plans.append(
                dict(
                    shape=shape_name,
                    mode=mode,
                    auto=chosen,
                    fastest=fastest["impl"],
                    speed_of_fastest=fastest["ms"] / auto_ms,  # 1.0: auto took the fastest path
                )
            )
    print("\n| shape | mode | auto takes | fastest | auto's speed / fastest's |\n|---|---|---|---|---:|")
    for p in plans:
        print(f"| {p['shape']} | {p['mode']} | {p['auto']} | {p['fastest']} | {p['speed_of_fastest']:.3f} |")
    if plans:
        worst = min(plans, key=lambda p: p["speed_of_fastest"])
        print(f"\nauto's worst row: {worst['shape']} {worst['mode']}, {worst['speed_of_fastest']:.3f} of the fastest")
    if args.markdown:
        lines = [header] + [
            f"| {r['shape']} | {r['mode']} | {r['impl']} | {fmt(r['ms'], '')} | "
            f"{fmt(r['speedup'], 'x')} | {fmt(r['mb'], '')} | {fmt(r['mem'], '')} |"
            for r in rows
        ]
        write_atomic(args.markdown, "\n".join(lines) + "\n")
    if args.json:
        write_atomic(
            args.json,
            json.dumps(dict(provenance("benchmarks.block", argv, args.device), rows=rows, plans=plans), indent=1),
        )


if __name__ == "__main__":
    main()
