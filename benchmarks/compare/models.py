"""The ``models`` section: training and inference throughput (clips/s) of whole networks, ours with and
without non-local blocks and PyTorchVideo's C2D / I3D R50 (no non-local blocks: it has no NL network), eager
contiguous, channels-last, under bfloat16 autocast (``--amp``: what train.amp runs) and torch.compile
(``--compile``)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from .._common import fmt, machine, run_child, synchronize, time_round_robin
from .peers import peer_unavailable

# whole networks: ours (registered names) with and without NL, and PyTorchVideo's hub builders; the 8x8 layouts
# take 8-frame clips as PyTorchVideo's C2D / I3D R50 (8x8) do
MODELS = [
    "c2d_r50_8x8",
    "nl_c2d_r50_8x8",
    "i3d_r50_8x8",
    "nl_i3d_r50_8x8",
    "pytorchvideo:c2d_r50",
    "pytorchvideo:i3d_r50",
]


def _make_model(name: str) -> nn.Module:
    if name.startswith("pytorchvideo:"):
        from pytorchvideo.models import hub

        # the hub's builders pool a 8x224x224 clip's head with a fixed kernel; an adaptive pool takes any clip
        return getattr(hub, name.split(":", 1)[1])(
            pretrained=False, head_pool=nn.AdaptiveAvgPool3d, model_num_class=400
        )
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
    precision = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=variant == "bf16")
    out: dict[str, Any] = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        with precision:
            loss = nn.functional.cross_entropy(run(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), precision:
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
    variants = ["eager", "channels_last"] + (["bf16"] if args.amp else []) + (["compile"] if args.compile else [])
    print(
        f"\n## Whole models: clips/s, batch {args.batch}, clip {clip[0]}x{clip[1]}x{clip[2]} "
        f"({machine(args.device)}; train = forward+backward+SGD step)\n\n"
        "| model | params (M) | variant | train clips/s | inference clips/s | first call s (train / infer) |\n"
        "|---|---:|---|---:|---:|---|",
        flush=True,
    )
    rows = []
    for variant in variants:  # compile last: its first calls take minutes, and must not crowd out the rest
        for model in args.models:
            if model.startswith("pytorchvideo:") and (missing := peer_unavailable("pytorchvideo")):
                row: dict[str, Any] = dict(model=model, variant=variant, status=missing)
            else:
                spec = dict(
                    model=model,
                    variant=variant,
                    batch=args.batch,
                    clip=clip,
                    repeats=args.model_repeats,
                    threads=torch.get_num_threads(),
                    device=args.device,
                )
                result = run_child("benchmarks.compare.models:run_model", spec, args.case_timeout)
                row = dict(model=model, variant=variant, **result)
                row.setdefault("status", "ok")
            rows.append(row)
            first = (
                f"{row['train_first_s']:.1f} / {row['infer_first_s']:.1f}" if "train_first_s" in row else row["status"]
            )
            print(
                f"| {model} | {fmt(row.get('params_m'), '', 1)} | {variant} | {fmt(row.get('train_clips_s'))} | "
                f"{fmt(row.get('infer_clips_s'))} | {first} |",
                flush=True,
            )
    return rows
