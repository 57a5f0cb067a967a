"""What ``low_memory=True`` saves and costs on a training step: a whole network and the largest single block.

    python -m benchmarks.low_memory                          # table to stdout
    python -m benchmarks.low_memory --json low_memory.json   # and the rows as JSON
    python -m benchmarks.low_memory --repeats 5 --size 112

Two cases, each built by default and with ``low_memory=True``:
  network  one training step (forward, cross-entropy, backward) of NL I3D R50 (``nl_i3d_r50_8x8``, five blocks in
           res3 and res4) on one 8-frame clip at ``--size`` pixels
  res3_128 one forward+backward of a block at the 128-frame clip's res3 (benchmarks/block.py's ``res3_128``
           shape and block: embedded Gaussian, BN after W_z, all 16 frames attended together, the path ``auto``
           picks)
  res3_128_zoo the same with the block the 128-frame models of the zoo place there (``*_128x1``: no norm after
           W_z, attention within 4 groups of 4 frames; W_z drawn at random so that gradients reach every weight)
Times are medians measured side by side in this process, the two builds interleaved round-robin. Peak memory is
measured in a fresh child process per build: the rise of the resident set over one step after a warm-up step
(``peak MB``), and the child's whole peak resident set (``process MB``: the model, the input and both steps).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from nonlocalnet import NonLocalBlock
from nonlocalnet.models import create_model, model_defaults

from . import block as block_bench
from ._common import (MALLOC_ENV, fmt, machine, peak_rss_rise_mb, run_child, status_kb, time_round_robin,
                      write_atomic)

NETWORK = "nl_i3d_r50_8x8"
BLOCK_SHAPE, BLOCK_MODE = "res3_128", "embedded_gaussian"
CASES = ("network", "res3_128", "res3_128_zoo")


def build(case: str, low_memory: bool, size: int) -> tuple[nn.Module, torch.Tensor]:
    """The module of ``case`` in training mode and its input."""
    if case == "network":
        model = create_model(NETWORK, nonlocal_options={"low_memory": low_memory}).train()
        return model, torch.randn(1, 3, 8, size, size)
    if case == "res3_128":
        return block_bench.build(BLOCK_SHAPE, BLOCK_MODE, "auto" + (block_bench.LOW_MEMORY if low_memory else ""),
                                 "cpu")
    shape, subsample, _ = block_bench.SHAPES[BLOCK_SHAPE]
    options = {**model_defaults("nl_i3d_r50_128x1")["nonlocal_options"],
               **model_defaults("nl_i3d_r50_128x1")["nonlocal_stage_options"]["res3"]}
    block = NonLocalBlock(shape[1], dim=3, **{**options, "low_memory": low_memory}).train()
    with torch.no_grad():
        block.out.weight.normal_(0.0, 0.01)  # W_z is zero at init: a live block
    return block, torch.randn(*shape, requires_grad=True)


def train_step(case: str, module: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward (the network's with a cross-entropy loss against class 0), gradients dropped."""
    if case == "network":
        logits = module(x)  # (1, classes)
        nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long)).backward()
    else:
        block_bench.step(module, x)
    module.zero_grad(set_to_none=True)


def measure_memory(spec: dict) -> dict:
    """In a child process: the step's peak resident-set rise after a warm-up step, and the process's peak."""
    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    module, x = build(spec["case"], spec["low_memory"], spec["size"])
    train_step(spec["case"], module, x)  # warm-up: allocator caches and kernels in place
    before = status_kb("VmHWM")  # this process's peak so far (not ru_maxrss: Linux carries that across exec)
    rise = peak_rss_rise_mb(lambda: train_step(spec["case"], module, x))
    return dict(mb=rise, process_mb=max(before, status_kb("VmHWM")) / 1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--size", type=int, default=112, help="the network case's frame size in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(f"{machine()}; float32; network {NETWORK} on (1, 3, 8, {args.size}, {args.size}); blocks on "
          f"{block_bench.SHAPES[BLOCK_SHAPE][0]}")
    print("| case | low_memory | step ms | × default time | peak MB | × default peak | process MB |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for case in args.cases:
        runs = {flag: build(case, flag, args.size) for flag in (False, True)}
        times = time_round_robin({flag: (lambda run=run: train_step(case, *run)) for flag, run in runs.items()},
                                 args.repeats)
        del runs
        memory = {}
        for flag in (False, True):
            spec = dict(case=case, low_memory=flag, size=args.size, threads=torch.get_num_threads())
            memory[flag] = run_child("benchmarks.low_memory:measure_memory", spec, timeout=600, env=MALLOC_ENV)
        for flag in (False, True):
            row = dict(case=case, low_memory=flag, ms=times[flag] * 1e3, time_ratio=times[flag] / times[False],
                       mb=memory[flag].get("mb"), process_mb=memory[flag].get("process_mb"),
                       status=memory[flag].get("status"))
            base = memory[False].get("mb")
            row["mb_ratio"] = row["mb"] / base if row["mb"] is not None and base else None
            rows.append(row)
            print(f"| {case} | {flag} | {row['ms']:.0f} | {fmt(row['time_ratio'], 'x')} | {fmt(row['mb'])} | "
                  f"{fmt(row['mb_ratio'], 'x')} | {fmt(row['process_mb'])} |"
                  + (f" {row['status']}" if row["status"] else ""), flush=True)
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
