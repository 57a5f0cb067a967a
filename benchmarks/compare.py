"""Our non-local block against the implementations a user would pick instead, side by side, on the same inputs.

    pip install -e ".[bench]"                    # the peers: mmcv-lite + mmengine, timm, pytorchvideo
    OMP_NUM_THREADS=1 python benchmarks/compare.py   # every section at the paper's shapes (~10 min, 1 thread)
    python benchmarks/compare.py --quick         # small shapes and models, a smoke run
    python benchmarks/compare.py --sections table --markdown compare.md --json compare.json --plot scale.png

Sections (``--sections``):

- ``table``: forward+backward time and peak memory of each peer in each configuration it supports, against our
  block configured to compute the same function. Equivalence before speed: the peer's weights are randomised
  and loaded into our block (subsample before or after the projections, scale, norm as the peer has them),
  both run on the same input, and the max abs difference of the outputs is a column; a peer whose output
  differs is marked "mismatch", one that raises is marked "failed" with the reason, and a configuration whose
  dense pairwise matrices would pass ``--budget-gb`` is skipped and marked. Ratios are peer / ours.
- ``scale``: the largest 2D map without subsampling (B=1, C=``--scale-channels``) each implementation handles
  under ``--scale-budget-gb``, growing the side by √2 until the memory budget or a step longer than
  ``--scale-max-step-s`` stops it; a PNG (``--plot``) of time and memory against positions.
- ``efficiency``: achieved FLOP/s of each of our paths (flops counted by torch's FlopCounterMode over a
  forward+backward) as a fraction of a plain float32 matrix multiply measured in the same run.
- ``models``: training and inference throughput (clips/s) of whole networks: ours with and without non-local
  blocks and PyTorchVideo's C2D / I3D R50 (no non-local blocks: it has no NL network), eager contiguous,
  channels-last, and torch.compile with ``--compile``.

Every measurement runs in a fresh child process, so one run's allocations cannot hide another's and a peer that
crashes or runs out of memory is reported instead of ending the benchmark. Times are medians; peer and ours of
one table row are interleaved round-robin; a step longer than ``--long-step-s`` is timed once (its first call).
Peak memory on CPU is the rise of the resident set over one forward+backward (see ``_common.py``); on CUDA
torch.cuda.max_memory_allocated.

On a CPU that other processes share, run with OMP_NUM_THREADS=1: with more threads than free cores, PyTorch's
CPU flash-attention kernel (our softmax path) waits on descheduled threads and slows down several-fold, far more
than the peers' large matrix multiplies do, which makes the comparison about the machine rather than the code.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (fmt, matmul_gflops, peak_memory_mb, synchronize, time_round_robin,  # noqa: E402
                     track_allocations_exactly, write_atomic)
from block import DENSE_CONCAT_LIMIT, SHAPES  # noqa: E402

from nonlocalnet import NonLocalBlock  # noqa: E402
from nonlocalnet.io import atomic_path  # noqa: E402
from nonlocalnet.layers import IMPLS_BY_MODE, MODES  # noqa: E402
from nonlocalnet.layers.pairwise import resolve_impl  # noqa: E402

# --quick: the same kinds of input, small enough for a smoke run
QUICK_SHAPES = {
    "res4": ((1, 256, 4, 14, 14), (1, 2, 2), "res4-like, C=256, B=1"),
    "res3": ((1, 128, 4, 28, 28), (1, 2, 2), "res3-like, C=128, B=1"),
    "image": ((1, 128, 48, 48), None, "image map, C=128, no subsampling"),
}
# the peers, the modules they need and the configurations (their own names) they offer
PEERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mmcv": (("mmcv.cnn", "mmengine"), ("embedded_gaussian", "gaussian", "dot_product", "concatenation")),
    "timm": (("timm.layers",), ("NonLocalAttn",)),
    "pytorchvideo": (("pytorchvideo.layers.nonlocal_net",), ("softmax", "dot_product")),
}
# Not measured: AlexHex7/Non-local_pytorch (the PyTorch port most copied) is not on the package index; mmcv's
# NonLocal2d/3d is written after it (same subsample-after-projection layout, same modes).

# whole networks: ours (registered names) with and without NL, and PyTorchVideo's hub builders; the 8x8 layouts
# take 8-frame clips as PyTorchVideo's C2D / I3D R50 (8x8) do
MODELS = ["c2d_r50_8x8", "nl_c2d_r50_8x8", "i3d_r50_8x8", "nl_i3d_r50_8x8", "pytorchvideo:c2d_r50",
          "pytorchvideo:i3d_r50"]
AGREE_RTOL = 1e-3  # outputs agree when max|z_peer - z_ours| <= 1e-5 + AGREE_RTOL * max|z_peer - x|


class NotApplicable(Exception):
    """The peer has no configuration for this input (wrong dimensionality or subsampling)."""


@dataclass
class Pair:
    """A peer module and our block configured to compute the same function, with the peer's weights.

    Attributes:
        peer: the peer's module.
        ours: our NonLocalBlock.
        input_shape: the input both take (the benchmark shape, or adapted to what the peer accepts).
        options: the keyword arguments our block was built with.
        note: how the peer is configured / adapted, for the table.
    """

    peer: nn.Module
    ours: NonLocalBlock
    input_shape: tuple[int, ...]
    options: dict[str, Any]
    note: str


def peer_unavailable(peer: str) -> str | None:
    """None if the peer imports, else why not (for the table's status column)."""
    for module in PEERS[peer][0]:
        try:
            importlib.import_module(module)
        except Exception as error:  # an installed but broken package fails with anything, not only ImportError
            return f"unavailable: import {module} failed ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    return None


# ---- the peers, and how their weights map onto our block -------------------------------------------------
# A builder makes the peer module for one of its configurations and says how our block must be configured to
# compute the same function; a loader copies the peer's weights into that block.

Built = tuple[nn.Module, tuple[int, ...], dict[str, Any], str]  # peer module, its input shape, our options, note


def _build_mmcv(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from mmcv.cnn import NonLocal2d, NonLocal3d
    dim = len(shape) - 2
    pools = {2: (2, 2), 3: (1, 2, 2)}  # mmcv's only subsampling: a max-pool after the φ and g convs
    if dim not in pools:
        raise NotApplicable("mmcv exports NonLocal2d / NonLocal3d only")
    if subsample not in (None, pools[dim]):
        raise NotApplicable(f"mmcv subsamples by {pools[dim]} only")
    peer = (NonLocal2d if dim == 2 else NonLocal3d)(shape[1], sub_sample=subsample is not None, mode=variant)
    options = dict(dim=dim, mode=variant, subsample=subsample, subsample_position="projection",
                   scale="auto" if variant == "embedded_gaussian" else None, norm=None)
    where = "after the projections" if subsample else "none"
    return peer, shape, options, f"NonLocal{dim}d; subsample {where}; no norm"


def _load_mmcv(peer: nn.Module, ours: NonLocalBlock) -> None:
    def conv(m: nn.Module) -> nn.Module:  # a ConvModule, or Sequential(ConvModule, MaxPool) when subsampling
        return (m[0] if isinstance(m, nn.Sequential) else m).conv

    _copy_conv(conv(peer.g), ours.g)
    _copy_conv(peer.conv_out.conv, ours.out)
    if peer.mode != "gaussian":  # gaussian compares raw features: no θ, φ
        _copy_conv(conv(peer.theta), ours.theta)
        _copy_conv(conv(peer.phi), ours.phi)
    if peer.mode == "concatenation":
        _copy_conv(peer.concat_project.conv, ours.concat_project[0])


def _build_timm(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from timm.layers import NonLocalAttn
    if len(shape) != 4 or subsample is not None:
        raise NotApplicable("NonLocalAttn is 2D without subsampling")
    peer = NonLocalAttn(shape[1])  # its defaults: C' = C/8, scale C^-1/2 (not C'^-1/2), BatchNorm
    options = dict(dim=2, mode="embedded_gaussian", inter_channels=peer.t.out_channels, scale=peer.scale,
                   norm="batch")
    return peer, shape, options, f"embedded gaussian; C'=C/8={peer.t.out_channels}; scale C^-1/2"


def _load_timm(peer: nn.Module, ours: NonLocalBlock) -> None:
    for src, dst in ((peer.t, ours.theta), (peer.p, ours.phi), (peer.g, ours.g), (peer.z, ours.out)):
        _copy_conv(src, dst)
    ours.norm.load_state_dict(peer.norm.state_dict())


def _build_pytorchvideo(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from pytorchvideo.layers.nonlocal_net import create_nonlocal
    note = "subsample before the projections" if subsample else "no subsampling"
    if len(shape) == 4:  # PyTorchVideo's block is 3D only: an image is a one-frame video
        shape = (shape[0], shape[1], 1, *shape[2:])
        subsample = None if subsample is None else (1, *subsample)
        note += "; image as a 1-frame video"
    elif len(shape) != 5:
        raise NotApplicable("PyTorchVideo's NonLocal is 3D only")
    inter = shape[1] // 2
    peer = create_nonlocal(dim_in=shape[1], dim_inner=inter, pool_size=subsample or (1, 1, 1),
                           instantiation=variant)
    mode = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}[variant]
    options = dict(dim=3, mode=mode, inter_channels=inter, subsample=subsample, subsample_position="input",
                   scale="auto" if variant == "softmax" else None, norm="batch")
    return peer, shape, options, note


def _load_pytorchvideo(peer: nn.Module, ours: NonLocalBlock) -> None:
    for src, dst in ((peer.conv_theta, ours.theta), (peer.conv_phi, ours.phi), (peer.conv_g, ours.g),
                     (peer.conv_out, ours.out)):
        _copy_conv(src, dst)
    ours.norm.load_state_dict(peer.norm.state_dict())


_BUILD = {"mmcv": _build_mmcv, "timm": _build_timm, "pytorchvideo": _build_pytorchvideo}
_LOAD = {"mmcv": _load_mmcv, "timm": _load_timm, "pytorchvideo": _load_pytorchvideo}


def _copy_conv(src: nn.Module, dst: nn.Module) -> None:
    """Copies a 1x1 conv's weight (and bias; zero where the source has none) into ours."""
    dst.weight.copy_(src.weight.reshape(dst.weight.shape))
    if dst.bias is not None:
        if src.bias is None:
            dst.bias.zero_()
        else:
            dst.bias.copy_(src.bias)


def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Gives every parameter a random value (convs ~ N(0, 1/fan_in), vectors ~ U(-1, 1)), so that the
    non-local term is not zero as at init and a wrong weight mapping shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=generator) * 2 - 1)


def build_pair(peer: str, variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None,
               seed: int = 0, impl: str = "auto") -> Pair:
    """The peer with random weights, and our block configured as the peer and holding the same weights.

    Args:
        peer: a key of :data:`PEERS`.
        variant: one of the peer's configurations, in its own words (``PEERS[peer][1]``).
        shape: the benchmark input (B, C, *spatial); the pair's ``input_shape`` may adapt it to the peer.
        subsample: the benchmark's key/value subsampling, or None.
        seed: for the random weights.
        impl: our block's path ("auto" = what a user gets).

    Raises:
        NotApplicable: the peer has no configuration for this shape / subsampling.
    """
    module, input_shape, options, note = _BUILD[peer](variant, shape, subsample)
    randomize_(module, seed)
    ours = NonLocalBlock(input_shape[1], impl=impl, **options)
    with torch.no_grad():
        _LOAD[peer](module, ours)
    return Pair(module, ours, input_shape, options, note)


def our_path(pair: Pair) -> str:
    """The path our block's impl="auto" takes for this input."""
    block, shape = pair.ours, pair.input_shape
    n = math.prod(shape[2:])
    m = math.prod(s // k for s, k in zip(shape[2:], block.subsample)) if block.subsample else n
    cq = block.in_channels if block.mode == "gaussian" else block.inter_channels
    device = next(block.parameters()).device.type
    return resolve_impl(block.mode, block.impl, n, m, cq, block.inter_channels, device, shape[0])


def step(module: nn.Module, x: Tensor) -> None:
    """One forward+backward, gradients dropped afterwards."""
    module(x).sum().backward()
    x.grad = None
    module.zero_grad(set_to_none=True)


def check_equivalence(pair: Pair, x: Tensor) -> dict[str, Any]:
    """Runs peer and ours forward+backward on ``x``; the max abs differences of outputs and input gradients.

    Returns:
        dict with ``z_diff``, ``grad_diff`` (None if a backward failed), ``term`` (max |z_peer - x|, the size
        of the non-local term the difference is judged against), ``agree``, the wall time of each step
        (``peer_s``, ``ours_s``) and ``error`` (the peer's exception as text, or None).
    """
    out: dict[str, Any] = dict(z_diff=None, grad_diff=None, term=None, agree=False, error=None)
    grads = {}
    zs = {}
    for name, module in (("ours", pair.ours), ("peer", pair.peer)):
        xi = x.detach().clone().requires_grad_(True)
        synchronize(x.device.type)
        start = time.perf_counter()
        try:
            z = module(xi)
            zs[name] = z.detach()
            z.sum().backward()
            grads[name] = xi.grad
        except Exception as error:
            if name == "ours":
                raise
            stage = "backward" if name in zs else "forward"
            out["error"] = f"{stage} raises {_short(error)}"
        synchronize(x.device.type)
        out[f"{name}_s"] = time.perf_counter() - start
        module.zero_grad(set_to_none=True)
    if "peer" in zs:
        out["z_diff"] = (zs["peer"] - zs["ours"]).abs().max().item()
        out["term"] = (zs["peer"] - x).abs().max().item()
        out["agree"] = out["z_diff"] <= 1e-5 + AGREE_RTOL * out["term"]
    if "peer" in grads:
        out["grad_diff"] = (grads["peer"] - grads["ours"]).abs().max().item()
    return out


# ---- the table ---------------------------------------------------------------------------------------------

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


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One table row, in this process: equivalence, round-robin timing, then peak memory of peer and ours."""
    torch.set_num_threads(spec["threads"])
    shape, subsample, _ = spec["shapes"][spec["shape"]]
    torch.manual_seed(spec["seed"])
    pair = build_pair(spec["peer"], spec["variant"], tuple(shape), tuple(subsample) if subsample else None,
                      spec["seed"])
    device = spec["device"]
    pair.peer.to(device).train()
    pair.ours.to(device).train()
    x = torch.randn(pair.input_shape, device=device)
    row: dict[str, Any] = dict(note=pair.note, ours_path=our_path(pair), input_shape=list(pair.input_shape))
    check = check_equivalence(pair, x)  # also the warm-up step of both
    row.update(z_diff=check["z_diff"], grad_diff=check["grad_diff"], term=check["term"])
    if check["error"]:
        row["status"] = f"failed: {check['error']}"
        return row
    row["status"] = "ok" if check["agree"] else "mismatch: outputs differ"
    xr = x.detach().clone().requires_grad_(True)
    steps = {"peer": lambda: step(pair.peer, xr), "ours": lambda: step(pair.ours, xr)}
    if max(check["peer_s"], check["ours_s"]) > spec["long_step_s"]:
        # a step of several seconds: its first-call overhead is noise, the warm-up is the one sample
        times = {"peer": check["peer_s"], "ours": check["ours_s"]}
        row["samples"] = 1
    else:
        times = time_round_robin(steps, spec["repeats"], device, warmup=False)
        row["samples"] = spec["repeats"]
    row.update(peer_ms=times["peer"] * 1e3, ours_ms=times["ours"] * 1e3)
    if spec["memory"]:
        for name, fn in steps.items():
            gc.collect()
            row[f"{name}_mb"] = peak_memory_mb(fn, device)
    return row


def table_section(args: argparse.Namespace, shapes: dict) -> list[dict[str, Any]]:
    rows = []
    header = ("| shape | peer | configuration | max abs diff | peer ms | ours ms (path) | time peer/ours | "
              "peer MB | ours MB | mem peer/ours | status |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"\n## Peers, forward+backward (ratios peer / ours; {_machine(args.device)})\n\n{header}", flush=True)
    for shape_name in args.shapes:
        shape, subsample, _ = shapes[shape_name]
        for peer in args.peers:
            missing = peer_unavailable(peer)
            for variant in PEERS[peer][1]:
                row: dict[str, Any] = dict(shape=shape_name, peer=peer, variant=variant)
                if missing:
                    row["status"] = missing
                else:
                    try:
                        _BUILD[peer](variant, shape, subsample)  # cheap: only the 1x1 convs
                    except NotApplicable as why:
                        row["status"] = f"n/a: {why}"
                if "status" not in row:
                    need = estimate_peer_gb(peer, variant, shape, subsample)
                    if need > args.budget_gb:
                        row["status"] = f"skipped: needs ~{need:.0f} GB > budget {args.budget_gb:g} GB"
                    else:
                        spec = dict(shape=shape_name, shapes=shapes, peer=peer, variant=variant,
                                    seed=args.seed, threads=torch.get_num_threads(), repeats=args.repeats,
                                    device=args.device,
                                    long_step_s=args.long_step_s, memory=not args.no_memory)
                        row.update(_child("run_case", spec, args.case_timeout))
                if row["status"].startswith("n/a") and not args.show_na:
                    continue
                rows.append(row)
                print(_table_line(row), flush=True)
    return rows


def _table_line(r: dict[str, Any]) -> str:
    config = f"{r['variant']} ({r['note']})" if r.get("note") else r["variant"]
    ours = f"{fmt(r.get('ours_ms'), '', 1)} ({r['ours_path']})" if r.get("ours_ms") else "—"
    time_ratio = r["peer_ms"] / r["ours_ms"] if r.get("peer_ms") and r.get("ours_ms") else None
    mem_ratio = r["peer_mb"] / r["ours_mb"] if r.get("peer_mb") and r.get("ours_mb") else None
    diff = f"{r['z_diff']:.1e}" if r.get("z_diff") is not None else "—"
    return (f"| {r['shape']} | {r['peer']} | {config} | {diff} | {fmt(r.get('peer_ms'), '', 1)} | {ours} | "
            f"{fmt(time_ratio, 'x')} | {fmt(r.get('peer_mb'), '', 0)} | {fmt(r.get('ours_mb'), '', 0)} | "
            f"{fmt(mem_ratio, 'x')} | {r['status']} |")


# ---- scale: the largest map under a memory budget --------------------------------------------------------

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
        module, shape, _, _ = _BUILD[who](variant, (1, channels, 32, 32), None)
        frame = len(shape) == 5
    module.to(device).train()
    result: dict[str, Any] = dict(points=[], stop=None)

    def input_for(side: int) -> Tensor:
        x = torch.randn(1, channels, side, side, device=device)
        return (x.unsqueeze(2) if frame else x).requires_grad_(True)

    try:
        step(module, input_for(32))  # warm-up
    except Exception as error:
        result["stop"] = f"failed: {_short(error)}"
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
        print("POINT " + json.dumps(point), flush=True)
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
    print(f"\n## Scale: the largest 2D map without subsampling under {args.scale_budget_gb:g} GB "
          f"(B=1, C={args.scale_channels}, forward+backward)\n\n"
          "| implementation | largest side | positions | ms there | MB there | stopped by | side the budget allows |\n"
          "|---|---:|---:|---:|---:|---|---:|",
          flush=True)
    rows = []
    for name, (who, _) in SCALE_IMPLS.items():
        if who != "ours" and who not in args.peers:
            continue
        missing = peer_unavailable(who) if who != "ours" else None
        if missing:
            result: dict[str, Any] = dict(points=[], stop=missing)
        else:
            spec = dict(name=name, channels=args.scale_channels, budget_gb=args.scale_budget_gb,
                        max_side=args.scale_max_side, max_step_s=args.scale_max_step_s,
                        threads=torch.get_num_threads(), device=args.device)
            result = _child("run_scale", spec, args.case_timeout)
            if "points" not in result:  # the child died: keep the sizes it printed
                result = dict(points=result.get("partial", []), stop=result["status"])
        fits = [p for p in result["points"] if not p.get("over_budget")]
        best = fits[-1] if fits else None
        projected = None
        if best and who == "ours" and result["stop"].startswith("time"):
            # stopped by time, not memory: our paths' memory grows as N = side², so the budget allows about
            # side·sqrt(budget / memory there) -- a projection, not a measurement
            projected = int(best["side"] * (args.scale_budget_gb * 1000 / best["mb"]) ** 0.5)
        rows.append(dict(name=name, points=result["points"], stop=result["stop"], largest=best,
                         projected_side=projected))
        if projected:
            allows = f"≈{projected} (projected)"
        elif best and result["stop"].startswith("time"):
            allows = f"≥{best['side']}"
        else:
            allows = best["side"] if best else "—"
        print(f"| {name} | {best['side'] if best else '—'} | {best['positions'] if best else '—'} | "
              f"{fmt(best['ms'] if best else None, '', 0)} | {fmt(best['mb'] if best else None, '', 0)} | "
              f"{result['stop']} | {allows} |", flush=True)
    if args.plot:
        plot_scale(rows, args.plot, args.scale_budget_gb, args.scale_channels, _machine(args.device))
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


# ---- efficiency: our paths against a plain matmul --------------------------------------------------------

def count_flops(fn: Callable[[], object]) -> int:
    """Flops torch counts (matmuls, convolutions, SDPA kernels) in ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


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
        times = time_round_robin({i: (lambda r=r: step(*r)) for i, r in runs.items()}, spec["repeats"], device,
                                 warmup=False)
        dense = flops.get("dense") or dense_flops_fake(shape, subsample, mode)
        for impl, seconds in times.items():
            rows.append(dict(mode=mode, impl=impl, ms=seconds * 1e3, gflop=flops[impl] / 1e9,
                             gflops=flops[impl] / seconds / 1e9,
                             dense_gflops=dense / seconds / 1e9 if dense else None))
    after = matmul_gflops(spec["matmul_n"], device=device)
    return dict(rows=rows, matmul_before=before, matmul_after=after)


def efficiency_section(args: argparse.Namespace, shapes: dict) -> dict[str, Any]:
    spec = dict(shapes=shapes, shape=args.efficiency_shape, modes=list(MODES), repeats=args.repeats,
                matmul_n=args.matmul_n, threads=torch.get_num_threads(), device=args.device)
    result = _child("run_efficiency", spec, args.case_timeout)
    if "rows" not in result:
        print(f"\nefficiency section failed: {result.get('status')}")
        return result
    limit = max(result["matmul_before"], result["matmul_after"])
    shape, subsample, what = shapes[args.efficiency_shape]
    print(f"\n## Efficiency at {args.efficiency_shape} ({what}, {tuple(shape)}, subsample {subsample})\n\n"
          f"Plain float32 matmul {args.matmul_n}x{args.matmul_n}: {result['matmul_before']:.0f} GFLOP/s before, "
          f"{result['matmul_after']:.0f} after; the limit below is the larger. 'dense-equivalent' divides the "
          f"dense path's flops by the path's time: the arithmetic a fast path avoids counts as done.\n\n"
          "| mode | path | fwd+bwd ms | GFLOP executed | GFLOP/s | % of matmul | dense-equivalent GFLOP/s | % |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        r["fraction"] = r["gflops"] / limit
        r["dense_fraction"] = r["dense_gflops"] / limit if r["dense_gflops"] else None
        print(f"| {r['mode']} | {r['impl']} | {r['ms']:.1f} | {fmt(r['gflop'])} | {fmt(r['gflops'], '', 1)} | "
              f"{fmt(100 * r['fraction'], '%', 1)} | {fmt(r['dense_gflops'], '', 1)} | "
              f"{fmt(100 * r['dense_fraction'] if r['dense_fraction'] else None, '%', 0)} |", flush=True)
    result["limit"] = limit
    return result


# ---- whole models ------------------------------------------------------------------------------------------

def _make_model(name: str) -> nn.Module:
    if name.startswith("pytorchvideo:"):
        from pytorchvideo.models import hub
        # the hub's builders pool a 8x224x224 clip's head with a fixed kernel; an adaptive pool takes any clip
        return getattr(hub, name.split(":", 1)[1])(pretrained=False, head_pool=nn.AdaptiveAvgPool3d,
                                                    model_num_class=400)
    from nonlocalnet.models import create_model
    return create_model(name, num_classes=400)


def run_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and inference clips/s of one network in one execution variant."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    model = _make_model(spec["model"]).to(device)
    batch = spec["batch"]
    x = torch.randn(batch, 3, *spec["clip"], device=device)
    labels = torch.randint(0, 400, (batch,), device=device)
    variant = spec["variant"]
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    run = torch.compile(model) if variant == "compile" else model
    out: dict[str, Any] = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(run(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode():
            run(x)

    for phase, fn, mode in (("train", train_step, True), ("infer", infer_step, False)):
        model.train(mode)
        start = time.perf_counter()
        fn()  # warm-up (compiles under torch.compile)
        synchronize(device)
        out[f"{phase}_first_s"] = time.perf_counter() - start
        times = time_round_robin({phase: fn}, spec["repeats"], device, warmup=False)
        out[f"{phase}_clips_s"] = batch / times[phase]
    return out


def models_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    clip = tuple(args.clip)
    variants = ["eager", "channels_last"] + (["compile"] if args.compile else [])
    print(f"\n## Whole models: clips/s, batch {args.batch}, clip {clip[0]}x{clip[1]}x{clip[2]} "
          f"({_machine(args.device)}; train = forward+backward+SGD step)\n\n"
          "| model | params (M) | variant | train clips/s | inference clips/s | first call s (train / infer) |\n"
          "|---|---:|---|---:|---:|---|", flush=True)
    rows = []
    for model in args.models:
        for variant in variants:
            if model.startswith("pytorchvideo:") and (missing := peer_unavailable("pytorchvideo")):
                row: dict[str, Any] = dict(model=model, variant=variant, status=missing)
            else:
                spec = dict(model=model, variant=variant, batch=args.batch, clip=clip, repeats=args.model_repeats,
                            threads=torch.get_num_threads(), device=args.device)
                row = dict(model=model, variant=variant, **_child("run_model", spec, args.case_timeout))
                row.setdefault("status", "ok")
            rows.append(row)
            first = (f"{row['train_first_s']:.1f} / {row['infer_first_s']:.1f}" if "train_first_s" in row
                     else row["status"])
            print(f"| {model} | {fmt(row.get('params_m'), '', 1)} | {variant} | {fmt(row.get('train_clips_s'))} | "
                  f"{fmt(row.get('infer_clips_s'))} | {first} |", flush=True)
    return rows


# ---- plumbing ----------------------------------------------------------------------------------------------

def _child(function: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs ``function(spec)`` of this module in a fresh Python process; its result, or a status saying why
    there is none (killed by the kernel, timed out, raised)."""
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import compare; print('RESULT ' + json.dumps(compare.{function}(json.loads(sys.argv[1]))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return dict(status=f"failed: timed out after {timeout:g} s", partial=_points(stdout))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = tail[-1][:160] if tail else f"exit code {proc.returncode}"
    return dict(status=f"failed: {reason}", partial=_points(proc.stdout))


def _short(error: BaseException) -> str:
    """An exception in one table cell: its type and the first clause of its message."""
    text = (str(error).strip().splitlines() or [""])[0].split(": [")[0]
    return f"{type(error).__name__}: {text[:100]}"


def _points(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("POINT ")]


def _machine(device: str = "cpu") -> str:
    """The machine the numbers come from, for the tables' titles."""
    import platform
    where = (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads" if device == "cpu"
             else torch.cuda.get_device_name(torch.device(device)))
    return f"torch {torch.__version__}, {where}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["table", "scale", "efficiency", "models"],
                        choices=["table", "scale", "efficiency", "models"])
    parser.add_argument("--quick", action="store_true", help="small shapes and models (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory from torch.cuda there)")
    parser.add_argument("--shapes", nargs="+", help="table shapes (default: all of the chosen set)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--long-step-s", type=float, default=3.0,
                        help="a step longer than this is timed once (its warm-up)")
    parser.add_argument("--budget-gb", type=float, default=8.0,
                        help="table: skip a peer configuration whose estimated peak exceeds this")
    parser.add_argument("--no-memory", action="store_true", help="table: skip the peak-memory measurement")
    parser.add_argument("--show-na", action="store_true", help="table: also list configurations a peer lacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=600, help="seconds before a child is stopped")
    parser.add_argument("--scale-budget-gb", type=float, default=4.0)
    parser.add_argument("--scale-channels", type=int, default=64)
    parser.add_argument("--scale-max-side", type=int, default=2048)
    parser.add_argument("--scale-max-step-s", type=float, default=8.0,
                        help="scale: stop growing once a step takes longer than this")
    parser.add_argument("--plot", help="scale: write the time/memory plot to this PNG")
    parser.add_argument("--efficiency-shape", help="efficiency: the shape (default res3)")
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--models", nargs="+", help="default: " + " ".join(MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--clip", type=int, nargs=3, default=(8, 112, 112), metavar=("T", "H", "W"))
    parser.add_argument("--model-repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="models: also measure torch.compile (slow)")
    parser.add_argument("--markdown", help="write the printed tables to this markdown file")
    parser.add_argument("--json", help="write every measurement to this JSON file")
    args = parser.parse_args(argv)

    shapes = QUICK_SHAPES if args.quick else SHAPES
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
        args.models = args.models or ["c2d_r50_8x8", "nl_c2d_r50_8x8"]
        args.clip = (8, 64, 64)
        args.batch = 1
        args.model_repeats = 1
    args.models = args.models or MODELS

    capture = _Tee() if args.markdown else None
    results: dict[str, Any] = dict(machine=_machine(args.device), argv=sys.argv[1:])
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
