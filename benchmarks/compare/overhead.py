"""The ``overhead`` section: the host time of one forward+backward of a tiny block, ours against each peer's.

At a tiny shape the arithmetic takes microseconds and what a step costs is Python, argument checks and operator
dispatch: what bounds a GPU run of small blocks, where the device waits for the host. Each peer is loaded into our
block as in the ``table`` section (outputs checked equal first); both run on the CPU on one thread, and two
figures are given per side: the wall time of a step (median of ``--overhead-repeats``, round-robin), and the CPU
time torch's profiler attributes to the operators of a step (its self CPU total: dispatch and kernels, without the
Python between them; the median of several profiles per side taken in turn). Ratios are peer / ours (above 1: ours
has less overhead).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from .._common import fmt, time_round_robin
from .peers import PEERS, NotApplicable, build_pair, check_equivalence, peer_unavailable, step

SHAPE = (2, 64, 4, 8, 8)  # a tiny video map: 256 positions, 64 channels
SUBSAMPLE = (1, 2, 2)
PROFILE_ROUNDS = 7  # profiles per side, taken in turn; the table gives their median


def _profiled_cpu_ms(module: torch.nn.Module, x: torch.Tensor, steps: int = 20) -> float:
    """The profiler's self CPU time of the operators of one forward+backward, in ms (mean over ``steps``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(module, x)
    return sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps


def profiled_cpu_ms_round_robin(modules: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """:func:`_profiled_cpu_ms` of each module, median over ``rounds`` profiles taken in turn (the order reversed
    every round, after one unrecorded profile each), so that drift and the profiler's own warm-up hit all alike."""
    names = list(modules)
    for name in names:
        _profiled_cpu_ms(modules[name], x, steps=2)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(_profiled_cpu_ms(modules[name], x))
    return {name: statistics.median(values) for name, values in samples.items()}


def overhead_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    print(
        f"\n## Host overhead: one forward+backward of a tiny block {SHAPE}, subsample {SUBSAMPLE} (CPU, 1 thread)\n\n"
        "| peer | configuration | wall ms peer | wall ms ours | peer/ours | profiler CPU ms peer | ours | peer/ours |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for peer in args.peers:
        missing = peer_unavailable(peer)
        for variant in PEERS[peer][1]:
            row: dict[str, Any] = dict(peer=peer, variant=variant, shape=list(SHAPE))
            if missing:
                row["status"] = missing
            else:
                try:
                    pair = build_pair(peer, variant, SHAPE, SUBSAMPLE, seed=args.seed)
                except NotApplicable:
                    continue  # a configuration the peer has not for video maps (timm: 2D only)
                x = torch.randn(SHAPE, requires_grad=True)
                agreement = check_equivalence(pair, x)
                if agreement["error"] or not agreement["agree"]:
                    row["status"] = agreement["error"] or f"mismatch (max abs difference {agreement['z_diff']:.2g})"
                else:
                    wall = time_round_robin(
                        {"peer": lambda: step(pair.peer, x), "ours": lambda: step(pair.ours, x)},
                        args.overhead_repeats,
                    )
                    cpu = profiled_cpu_ms_round_robin({"peer": pair.peer, "ours": pair.ours}, x, PROFILE_ROUNDS)
                    row.update(
                        status="ok",
                        peer_wall_ms=wall["peer"] * 1e3,
                        ours_wall_ms=wall["ours"] * 1e3,
                        peer_cpu_ms=cpu["peer"],
                        ours_cpu_ms=cpu["ours"],
                    )
                    row["wall_ratio"] = row["peer_wall_ms"] / row["ours_wall_ms"]
                    row["cpu_ratio"] = row["peer_cpu_ms"] / row["ours_cpu_ms"]
            rows.append(row)
            if row["status"] != "ok":
                print(f"| {peer} | {variant} | {row['status']} | | | | | |", flush=True)
                continue
            print(
                f"| {peer} | {variant} | {fmt(row['peer_wall_ms'], '', 3)} | {fmt(row['ours_wall_ms'], '', 3)} | "
                f"{fmt(row['wall_ratio'], 'x')} | {fmt(row['peer_cpu_ms'], '', 3)} | "
                f"{fmt(row['ours_cpu_ms'], '', 3)} | {fmt(row['cpu_ratio'], 'x')} |",
                flush=True,
            )
    return rows
