"""The ``table`` section: forward+backward time and peak memory of each peer in each configuration it supports,
against our block configured to compute the same function (equivalence checked first; ratios peer / ours)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
from typing import Any

import torch

from .._common import count_flops, fmt, machine, peak_memory_mb, run_child, time_round_robin
from .peers import BUILD, PEERS, NotApplicable, build_pair, check_equivalence, our_path, peer_unavailable, step


def estimate_peer_gb(peer: str, variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> float:
    """Rough peak of a peer's forward+backward: its dense (B, N, M) matrices dominate.

    The softmax and dot-product peers keep about four (B, N, M) float32 matrices alive (the products, the
    normalised weights and their gradients); mmcv's concatenation materialises θ and φ repeated to
    (B, C', N, M) each and their concatenation, about 4·C' such matrices.
    """
    batch, channels, *spatial = shape
    n = math.prod(spatial)
    m = math.prod(s // k for s, k in zip(spatial, subsample)) if subsample else n
    pair_bytes = batch * n * m * 4
    per_pair = 4 * (channels // 2) + 6 if variant == "concatenation" else 4
    activations = batch * n * channels * 4 * 12
    return (per_pair * pair_bytes + activations) / 1e9


@contextlib.contextmanager
def _float32_means_float32():
    """TF32 off while the outputs are compared: cuDNN's convolutions default to TF32 (10-bit mantissa) on CUDA,
    the likely reason why pairs that agree to 1.3e-4 or better on the CPU differed by 5.9e-3 to 3.4e-2 (max abs)
    on an H200 (docs/gpu-h200). The timings keep torch's defaults, what a user gets."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def count_pair_flops(
    peer: str, variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None, device: str = "cpu"
) -> dict[str, Any]:
    """GFLOP of one forward+backward of the peer and of our block (as :func:`count_flops` counts them), on fake
    tensors: shapes only, no arithmetic, so even the image's dense peers cost nothing to count. The ratio says
    how much of a time ratio is arithmetic (ours recomputing qᵀk, or the peer's dense dot product) and how much
    is speed per flop. A side that does not run on fake tensors gets None and its reason in ``flops_error``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counts: dict[str, Any] = dict(peer_gflop=None, ours_gflop=None)
    errors = []
    with FakeTensorMode(), torch.device(device):  # built where it runs: a chunk's size depends on the device
        try:
            pair = build_pair(peer, variant, shape, subsample)
        except Exception as error:
            return dict(counts, flops_error=f"build: {type(error).__name__}: {error}"[:200])
        x = torch.randn(pair.input_shape, requires_grad=True)
        for name, module in (("peer", pair.peer), ("ours", pair.ours)):
            try:
                counts[f"{name}_gflop"] = count_flops(lambda: step(module.train(), x)) / 1e9
            except Exception as error:  # e.g. a peer's own code that fake tensors cannot run: its cell shows —
                errors.append(f"{name}: {type(error).__name__}: {error}"[:200])
    if errors:
        counts["flops_error"] = "; ".join(errors)
    return counts


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One table row, in this process: equivalence, round-robin timing, then peak memory of peer and ours, and
    the flops of each (counted on fake tensors)."""
    torch.set_num_threads(spec["threads"])
    shape, subsample, _ = spec["shapes"][spec["shape"]]
    torch.manual_seed(spec["seed"])
    pair = build_pair(
        spec["peer"], spec["variant"], tuple(shape), tuple(subsample) if subsample else None, spec["seed"]
    )
    device = spec["device"]
    pair.peer.to(device).train()
    pair.ours.to(device).train()
    x = torch.randn(pair.input_shape, device=device)
    row: dict[str, Any] = dict(note=pair.note, ours_path=our_path(pair), input_shape=list(pair.input_shape))
    with _float32_means_float32():
        check = check_equivalence(pair, x)  # also the warm-up step of both
    row.update(z_diff=check["z_diff"], grad_diff=check["grad_diff"], term=check["term"])
    if check["error"]:
        row["status"] = f"failed: {check['error']}"
        return row
    row["status"] = "ok" if check["agree"] else "mismatch: outputs differ"
    xr = x.detach().clone().requires_grad_(True)
    steps = {"peer": lambda: step(pair.peer, xr), "ours": lambda: step(pair.ours, xr)}
    if device.startswith("cuda"):  # the check ran with TF32 off: one step each in the settings that are timed
        for fn in steps.values():
            fn()
    # a step of several seconds is timed once, after one warm-up step: the first call's one-time costs (the
    # allocator growing, oneDNN building its kernels) are not what a training run's steps pay
    long = max(check["peer_s"], check["ours_s"]) > spec["long_step_s"]
    for _ in range(min(spec["warmup"], 1) if long else spec["warmup"]):
        for fn in steps.values():  # round-robin too: both sides see the same machine state
            fn()
    row["samples"] = 1 if long else spec["repeats"]
    times = time_round_robin(steps, row["samples"], device, warmup=False)
    row.update(peer_ms=times["peer"] * 1e3, ours_ms=times["ours"] * 1e3)
    row.update(
        count_pair_flops(spec["peer"], spec["variant"], tuple(shape), tuple(subsample) if subsample else None, device)
    )
    if spec["memory"]:
        for name, fn in steps.items():
            gc.collect()
            row[f"{name}_mb"] = peak_memory_mb(fn, device)
    return row


def table_section(args: argparse.Namespace, shapes: dict) -> list[dict[str, Any]]:
    rows = []
    header = (
        "| shape | peer | configuration | max abs diff | peer ms | ours ms (path) | time peer/ours | "
        "flops peer/ours | peer MB | ours MB | mem peer/ours | status |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    print(f"\n## Peers, forward+backward (ratios peer / ours; {machine(args.device)})\n\n{header}", flush=True)
    for shape_name in args.shapes:
        shape, subsample, _ = shapes[shape_name]
        for peer in args.peers:
            missing = peer_unavailable(peer)
            for variant in [v for v in PEERS[peer][1] if not args.variants or v in args.variants]:
                row: dict[str, Any] = dict(shape=shape_name, peer=peer, variant=variant)
                if missing:
                    row["status"] = missing
                else:
                    try:
                        BUILD[peer](variant, shape, subsample)  # cheap: only the 1x1 convs
                    except NotApplicable as why:
                        row["status"] = f"n/a: {why}"
                if "status" not in row:
                    need = estimate_peer_gb(peer, variant, shape, subsample)
                    if need > args.budget_gb:
                        row["status"] = f"skipped: needs ~{need:.0f} GB > budget {args.budget_gb:g} GB"
                    else:
                        spec = dict(
                            shape=shape_name,
                            shapes=shapes,
                            peer=peer,
                            variant=variant,
                            seed=args.seed,
                            threads=torch.get_num_threads(),
                            repeats=args.repeats,
                            warmup=args.warmup,
                            device=args.device,
                            long_step_s=args.long_step_s,
                            memory=not args.no_memory,
                        )
                        row.update(_run(spec, args.case_timeout))
                if row["status"].startswith("n/a") and not args.show_na:
                    continue
                rows.append(row)
                print(_table_line(row), flush=True)
    return rows


def _run(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One row: on CPU in a fresh child process (the resident set is the process's, so each measurement needs
    its own); on CUDA here, since torch.cuda's peak statistics are reset per measurement and a child would spend
    seconds creating a CUDA context for each row."""
    if not spec["device"].startswith("cuda"):
        return run_child("benchmarks.compare.table:run_case", spec, timeout)
    try:
        return run_case(spec)
    except torch.cuda.OutOfMemoryError:
        return dict(status="failed: out of GPU memory")
    except Exception as error:  # a peer's own failure is a row of the table, not the end of it
        first_line = str(error).splitlines()[0][:160] if str(error) else ""
        return dict(status=f"failed: {type(error).__name__}: {first_line}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _table_line(r: dict[str, Any]) -> str:
    config = f"{r['variant']} ({r['note']})" if r.get("note") else r["variant"]
    ours = f"{fmt(r.get('ours_ms'), '', 1)} ({r['ours_path']})" if r.get("ours_ms") else "—"
    time_ratio = r["peer_ms"] / r["ours_ms"] if r.get("peer_ms") and r.get("ours_ms") else None
    mem_ratio = r["peer_mb"] / r["ours_mb"] if r.get("peer_mb") and r.get("ours_mb") else None
    flop_ratio = r["peer_gflop"] / r["ours_gflop"] if r.get("peer_gflop") and r.get("ours_gflop") else None
    diff = f"{r['z_diff']:.1e}" if r.get("z_diff") is not None else "—"
    return (
        f"| {r['shape']} | {r['peer']} | {config} | {diff} | {fmt(r.get('peer_ms'), '', 1)} | {ours} | "
        f"{fmt(time_ratio, 'x')} | {fmt(flop_ratio, 'x')} | {fmt(r.get('peer_mb'), '', 0)} | "
        f"{fmt(r.get('ours_mb'), '', 0)} | {fmt(mem_ratio, 'x')} | {r['status']} |"
    )
