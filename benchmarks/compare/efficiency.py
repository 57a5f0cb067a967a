"""The ``efficiency`` section: achieved FLOP/s of each of our paths (flops counted over a forward+backward by
:func:`benchmarks._common.count_flops`) as a fraction of a plain float32 matrix multiply measured in the same run."""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from nonlocalnet import NonLocalBlock
from nonlocalnet.layers import IMPLS_BY_MODE, MODES

from .._common import count_flops, fmt, matmul_gflops, run_child, time_round_robin
from ..block import DENSE_CONCAT_LIMIT
from .peers import step


def dense_flops_fake(shape: tuple[int, ...], subsample: tuple[int, ...] | None, mode: str) -> int | None:
    """Flops of the dense path's forward+backward, counted on fake tensors (no memory, no arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            block = NonLocalBlock(shape[1], dim=len(shape) - 2, mode=mode, subsample=subsample, impl="dense")
            x = torch.randn(shape, requires_grad=True)
            return count_flops(lambda: block(x).sum().backward())
    except Exception:
        return None


def run_efficiency(spec: dict[str, Any]) -> dict[str, Any]:
    """Times each path of each mode at one shape, counts its flops, and measures a plain matmul before and
    after (the practical limit of this machine in this run)."""
    torch.set_num_threads(spec["threads"])
    shape, subsample, _ = spec["shapes"][spec["shape"]]
    shape, subsample = tuple(shape), tuple(subsample) if subsample else None
    device = spec["device"]
    before = matmul_gflops(spec["matmul_n"], device=device)
    rows = []
    for mode in spec["modes"]:
        runs, flops = {}, {}
        for impl in IMPLS_BY_MODE[mode]:
            n = math.prod(shape[2:])
            m = math.prod(s // k for s, k in zip(shape[2:], subsample)) if subsample else n
            if mode == "concatenation" and impl == "dense" and shape[0] * n * m * shape[1] > DENSE_CONCAT_LIMIT:
                continue  # the literal (B, N, M, 2C') pair tensor: too large
            torch.manual_seed(0)
            block = NonLocalBlock(shape[1], dim=len(shape) - 2, mode=mode, subsample=subsample, impl=impl)
            with torch.no_grad():
                block.norm.weight.fill_(1.0)  # a live block: gradients reach every path
            block.to(device)
            x = torch.randn(shape, device=device, requires_grad=True)
            runs[impl] = (block, x)
            flops[impl] = count_flops(lambda: step(block, x))  # also the warm-up
        times = time_round_robin(
            {i: (lambda r=r: step(*r)) for i, r in runs.items()}, spec["repeats"], device, warmup=False
        )
        dense = flops.get("dense") or dense_flops_fake(shape, subsample, mode)
        for impl, seconds in times.items():
            rows.append(
                dict(
                    mode=mode,
                    impl=impl,
                    ms=seconds * 1e3,
                    gflop=flops[impl] / 1e9,
                    gflops=flops[impl] / seconds / 1e9,
                    dense_gflops=dense / seconds / 1e9 if dense else None,
                )
            )
    after = matmul_gflops(spec["matmul_n"], device=device)
    return dict(rows=rows, matmul_before=before, matmul_after=after)


def efficiency_section(args: argparse.Namespace, shapes: dict) -> dict[str, Any]:
    spec = dict(
        shapes=shapes,
        shape=args.efficiency_shape,
        modes=list(MODES),
        repeats=args.repeats,
        matmul_n=args.matmul_n,
        threads=torch.get_num_threads(),
        device=args.device,
    )
    result = run_child("benchmarks.compare.efficiency:run_efficiency", spec, args.case_timeout)
    if "rows" not in result:
        print(f"\nefficiency section failed: {result.get('status')}")
        return result
    limit = max(result["matmul_before"], result["matmul_after"])
    shape, subsample, what = shapes[args.efficiency_shape]
    print(
        f"\n## Efficiency at {args.efficiency_shape} ({what}, {tuple(shape)}, subsample {subsample})\n\n"
        f"Plain float32 matmul {args.matmul_n}x{args.matmul_n}: {result['matmul_before']:.0f} GFLOP/s before, "
        f"{result['matmul_after']:.0f} after; the limit below is the larger. 'dense-equivalent' divides the "
        f"dense path's flops by the path's time: the arithmetic a fast path avoids counts as done.\n\n"
        "| mode | path | fwd+bwd ms | GFLOP executed | GFLOP/s | % of matmul | dense-equivalent GFLOP/s | % |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in result["rows"]:
        r["fraction"] = r["gflops"] / limit
        r["dense_fraction"] = r["dense_gflops"] / limit if r["dense_gflops"] else None
        print(
            f"| {r['mode']} | {r['impl']} | {r['ms']:.1f} | {fmt(r['gflop'])} | {fmt(r['gflops'], '', 1)} | "
            f"{fmt(100 * r['fraction'], '%', 1)} | {fmt(r['dense_gflops'], '', 1)} | "
            f"{fmt(100 * r['dense_fraction'] if r['dense_fraction'] else None, '%', 0)} |",
            flush=True,
        )
    result["limit"] = limit
    return result
