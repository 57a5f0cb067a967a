"""The ``scale`` section: the largest 2D map without subsampling each implementation handles under a memory
budget, growing the side by √2 until the budget or a step longer than the time limit stops it."""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch
from torch import Tensor

from nonlocalnet import NonLocalBlock
from nonlocalnet.io import atomic_path

from .._common import fmt, machine, peak_memory_mb, print_point, run_child, synchronize, track_allocations_exactly
from .peers import BUILD, peer_unavailable, short_error, step
from .table import estimate_peer_gb

# name -> (peer or "ours", configuration)
SCALE_IMPLS = {
    "ours embedded_gaussian": ("ours", "embedded_gaussian"),
    "ours dot_product": ("ours", "dot_product"),
    "ours concatenation": ("ours", "concatenation"),
    "mmcv embedded_gaussian": ("mmcv", "embedded_gaussian"),
    "mmcv dot_product": ("mmcv", "dot_product"),
    "mmcv concatenation": ("mmcv", "concatenation"),
    "timm NonLocalAttn": ("timm", "NonLocalAttn"),
    "pytorchvideo softmax": ("pytorchvideo", "softmax"),
    "pytorchvideo dot_product": ("pytorchvideo", "dot_product"),
}


def scale_sides(max_side: int, start: int = 32) -> list[int]:
    """Square sides growing by √2 (the positions double each step)."""
    sides, k = [], 0
    while True:
        side = int(round(start * 2 ** (k / 2)))
        if side > max_side:
            return sides
        sides.append(side)
        k += 1


def run_scale(spec: dict[str, Any]) -> dict[str, Any]:
    """Grows a square map until the step passes the memory budget or the time limit; prints one JSON line per
    size as it goes (so a child killed by the kernel still reports what it reached)."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    if device == "cpu":
        track_allocations_exactly()
    who, variant = SCALE_IMPLS[spec["name"]]
    channels, budget_mb = spec["channels"], spec["budget_gb"] * 1000
    torch.manual_seed(0)
    if who == "ours":
        module = NonLocalBlock(channels, dim=2, mode=variant, scale="auto" if "gaussian" in variant else None)
        frame = False
    else:
        module, shape, _, _ = BUILD[who](variant, (1, channels, 32, 32), None)
        frame = len(shape) == 5
    module.to(device).train()
    result: dict[str, Any] = dict(points=[], stop=None)

    def input_for(side: int) -> Tensor:
        x = torch.randn(1, channels, side, side, device=device)
        return (x.unsqueeze(2) if frame else x).requires_grad_(True)

    try:
        step(module, input_for(32))  # warm-up
    except Exception as error:
        result["stop"] = f"failed: {short_error(error)}"
        return result
    for side in scale_sides(spec["max_side"]):
        n = side * side
        if who != "ours":
            need = estimate_peer_gb(who, variant, (1, channels, side, side), None)
            if need * 1000 > 1.25 * budget_mb:
                result["stop"] = f"memory: {side}x{side} would need ~{need:.0f} GB (estimated)"
                break
        gc.collect()
        holder: dict[str, float] = {}

        def run() -> None:
            x = input_for(side)
            synchronize(device)
            start = time.perf_counter()
            step(module, x)
            synchronize(device)
            holder["s"] = time.perf_counter() - start

        mb = peak_memory_mb(run, device)
        if holder["s"] < 0.5:  # a quick step: time it again, warm
            run()
        point = dict(side=side, positions=n, ms=holder["s"] * 1e3, mb=mb)
        print_point(point)
        if mb > budget_mb:
            result["stop"] = f"memory: {side}x{side} took {mb / 1000:.1f} GB"
            point["over_budget"] = True
            result["points"].append(point)
            break
        result["points"].append(point)
        if holder["s"] > spec["max_step_s"]:
            result["stop"] = f"time: a step at {side}x{side} took {holder['s']:.1f} s (limit {spec['max_step_s']:g} s)"
            break
    else:
        result["stop"] = f"reached the largest side tried ({spec['max_side']})"
    return result


def scale_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    print(
        f"\n## Scale: the largest 2D map without subsampling under {args.scale_budget_gb:g} GB "
        f"(B=1, C={args.scale_channels}, forward+backward)\n\n"
        "| implementation | largest side | positions | ms there | MB there | stopped by | side the budget allows |\n"
        "|---|---:|---:|---:|---:|---|---:|",
        flush=True,
    )
    rows = []
    for name, (who, _) in SCALE_IMPLS.items():
        if who != "ours" and who not in args.peers:
            continue
        missing = peer_unavailable(who) if who != "ours" else None
        if missing:
            result: dict[str, Any] = dict(points=[], stop=missing)
        else:
            spec = dict(
                name=name,
                channels=args.scale_channels,
                budget_gb=args.scale_budget_gb,
                max_side=args.scale_max_side,
                max_step_s=args.scale_max_step_s,
                threads=torch.get_num_threads(),
                device=args.device,
            )
            result = run_child("benchmarks.compare.scale:run_scale", spec, args.case_timeout)
            if "points" not in result:  # the child died: keep the sizes it printed
                result = dict(points=result.get("partial", []), stop=result["status"])
        fits = [p for p in result["points"] if not p.get("over_budget")]
        best = fits[-1] if fits else None
        projected = None
        if best and who == "ours" and result["stop"].startswith("time"):
            # stopped by time, not memory: our paths' memory grows as N = side², so the budget allows about
            # side·sqrt(budget / memory there) -- a projection, not a measurement
            projected = int(best["side"] * (args.scale_budget_gb * 1000 / best["mb"]) ** 0.5)
        rows.append(
            dict(name=name, points=result["points"], stop=result["stop"], largest=best, projected_side=projected)
        )
        if projected:
            allows = f"≈{projected} (projected)"
        elif best and result["stop"].startswith("time"):
            allows = f"≥{best['side']}"
        else:
            allows = best["side"] if best else "—"
        print(
            f"| {name} | {best['side'] if best else '—'} | {best['positions'] if best else '—'} | "
            f"{fmt(best['ms'] if best else None, '', 0)} | {fmt(best['mb'] if best else None, '', 0)} | "
            f"{result['stop']} | {allows} |",
            flush=True,
        )
    if args.plot:
        plot_scale(rows, args.plot, args.scale_budget_gb, args.scale_channels, machine(args.device))
        print(f"\nplot: {args.plot}")
    return rows


def plot_scale(rows: list[dict[str, Any]], path: str, budget_gb: float, channels: int, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in rows:
        points = row["points"]
        if not points:
            continue
        style = "-" if row["name"].startswith("ours") else "--"
        n = [p["positions"] for p in points]
        ax_t.plot(n, [p["ms"] for p in points], style, marker="o", ms=3, label=row["name"])
        ax_m.plot(n, [p["mb"] for p in points], style, marker="o", ms=3, label=row["name"])
    ax_m.axhline(budget_gb * 1000, color="gray", lw=0.8, ls=":", label=f"budget {budget_gb:g} GB")
    for ax, label in ((ax_t, "forward+backward ms"), (ax_m, "peak memory MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"positions N = H·W (B=1, C={channels}, no subsampling)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(f"non-local blocks on a 2D map: time and memory against positions ({machine})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
