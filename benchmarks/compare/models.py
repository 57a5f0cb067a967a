"""The ``models`` section: training steps and inference clips per second of whole networks, ours against the
peers' own networks, side by side in one process.

Each pair is an NL I3D R50 or an I3D R50 of ours and the peer network it competes with:

- ours as our trainer, ``test``, ``predict`` and ``extract`` run it by default (``train.memory_format`` and
  ``train.amp`` "auto": the layout and precision of :mod:`nonlocalnet.engine.precision` for the device, its
  optimizer from the default config);
- the peer as its own training code runs it by default: mmaction2's NL I3D R50 (its ``ResNet3d`` built from its
  config, with its head's dropout and its config's SGD and gradient clipping at norm 40), PyTorchVideo's hub
  ``i3d_r50`` (with its SGD recipe); both in float32 in torch's default layout, eager.

A train step is forward, cross-entropy, backward and the optimizer's step; an inference step a forward pass
under ``torch.inference_mode`` in eval mode. The two networks of a pair (and any extra variants of ours,
``--model-variants``) are built in one child process and timed round-robin, so drift hits them alike; the ratio
is ours / peer (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import time
from typing import Any

import torch
from torch import nn

from .._common import fmt, machine, run_child, synchronize, time_round_robin

# (ours, peer): ours by registered name, the peer by package:network
PAIRS = [
    ("mmaction2_nl_i3d_r50_embedded_gaussian", "mmaction2:nl_i3d_r50"),
    ("nl_i3d_r50", "mmaction2:nl_i3d_r50"),  # the paper's 32x2 layout against mmaction2's
    ("i3d_r50_8x8", "pytorchvideo:i3d_r50"),
]
# ours in other execution variants, for --model-variants: "default" is what our commands run
VARIANTS = ("default", "contiguous", "channels_last", "bf16", "compile", "torch_conv")


class _Head(nn.Module):
    """mmaction2's I3DHead as its config builds it: average pool, dropout 0.5, a 400-class fc."""

    def __init__(self, backbone: nn.Module, classes: int = 400) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.backbone(x).mean(dim=(2, 3, 4))))


def _unavailable(peer: str) -> str | None:
    """None if the peer's network can be built here, else why not (the row's status)."""
    try:
        if peer.startswith("pytorchvideo:"):
            importlib.import_module("pytorchvideo.models.hub")
        else:
            from ..swap import mmaction2_resnet3d

            importlib.import_module("mmengine.config")
            mmaction2_resnet3d()
    except (Exception, SystemExit) as error:  # an installed but broken package fails with anything
        return f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return None


def _peer(name: str) -> tuple[nn.Module, float | None]:
    """The peer network and the gradient-norm clip its training config applies (None: none)."""
    package, network = name.split(":", 1)
    if package == "pytorchvideo":
        from pytorchvideo.models import hub

        # the hub's builders pool a 8x224x224 clip's head with a fixed kernel; an adaptive pool takes any clip
        return getattr(hub, network)(pretrained=False, head_pool=nn.AdaptiveAvgPool3d, model_num_class=400), None
    from ..swap import build

    return _Head(build("embedded_gaussian").backbone), 40.0  # mmaction2's sgd_100e schedule: clip_grad max_norm 40


def _ours(name: str, variant: str, device: torch.device) -> tuple[nn.Module, str, Any]:
    """Our network in ``variant``: (model, its train.memory_format setting, autocast context factory)."""
    from nonlocalnet.engine.config import DEFAULTS
    from nonlocalnet.engine.precision import autocast
    from nonlocalnet.models import create_model

    model = create_model(name, num_classes=400).to(device)
    amp = "bf16" if variant == "bf16" else DEFAULTS["train"]["amp"]
    layout = variant if variant in ("contiguous", "channels_last") else DEFAULTS["train"]["memory_format"]
    if variant == "compile":
        model.compile()
    return model, layout, (lambda: autocast(device, amp))


def run_pair(spec: dict[str, Any]) -> dict[str, Any]:
    """Train steps/s and inference clips/s of one pair, ours in each requested variant, timed round-robin."""
    from nonlocalnet.engine.config import DEFAULTS
    from nonlocalnet.engine.optim import build_optimizer
    from nonlocalnet.engine.precision import apply_memory_format, memory_format
    from nonlocalnet.layers.conv import torch_conv_dispatch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    batch, clip = spec["batch"], tuple(spec["clip"])
    x = torch.randn(batch, 3, *clip, device=device)
    labels = torch.randint(0, 400, (batch,), device=device)
    runs: dict[str, dict[str, Any]] = {}
    torch.manual_seed(0)
    peer, clip_norm = _peer(spec["peer"])
    peer = peer.to(device)
    runs["peer"] = dict(
        model=peer,
        optimizer=torch.optim.SGD(peer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4),
        clip_norm=clip_norm,
        layout=None,  # torch's default layout
        precision=contextlib.nullcontext,
        dispatch=contextlib.nullcontext,
    )
    for variant in spec["variants"]:
        torch.manual_seed(0)
        model, layout, precision = _ours(spec["ours"], variant, device)
        runs[variant] = dict(
            model=model,
            optimizer=build_optimizer(model, DEFAULTS["train"]),
            clip_norm=DEFAULTS["train"]["clip_grad_norm"],
            layout=layout,
            precision=precision,
            dispatch=torch_conv_dispatch if variant == "torch_conv" else contextlib.nullcontext,
        )

    def train_step(run: dict[str, Any]):
        def step() -> None:
            with run["dispatch"]():
                with run["precision"]():
                    loss = nn.functional.cross_entropy(run["model"](run["input"]).float(), labels)
                run["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                if run["clip_norm"]:
                    nn.utils.clip_grad_norm_(run["model"].parameters(), run["clip_norm"])
                run["optimizer"].step()

        return step

    def infer_step(run: dict[str, Any]):
        def step() -> None:
            with run["dispatch"](), torch.inference_mode(), run["precision"]():
                run["model"](run["input"])

        return step

    out: dict[str, Any] = {
        name: dict(params_m=sum(p.numel() for p in run["model"].parameters()) / 1e6) for name, run in runs.items()
    }
    for phase, make, mode in (("train", train_step, True), ("infer", infer_step, False)):
        steps = {}
        for name, run in runs.items():
            run["model"].train(mode)
            run["input"] = x
            if run["layout"] is not None:  # ours: the layout our commands give this phase (train or inference)
                apply_memory_format(run["model"], device, run["layout"], training=mode)
                run["input"] = x.contiguous(memory_format=memory_format(device, run["layout"], training=mode))
            steps[name] = make(run)
            start = time.perf_counter()
            steps[name]()  # warm-up (compiles under torch.compile)
            synchronize(spec["device"])
            out[name][f"{phase}_first_s"] = time.perf_counter() - start
        seconds = time_round_robin(steps, spec["repeats"], spec["device"], warmup=False)
        for name in runs:
            out[name][f"{phase}_per_s"] = (1 if phase == "train" else batch) / seconds[name]
    return out


def models_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    clip = tuple(args.clip)
    variants = ["default"] + [v for v in args.model_variants if v != "default"]
    print(
        f"\n## Whole networks: ours as our commands run them against the peers' own, batch {args.batch}, clip "
        f"{clip[0]}x{clip[1]}x{clip[2]} ({machine(args.device)}; train steps/s: forward+backward+optimizer step; "
        f"inference clips/s)\n\n"
        "| ours | variant | peer | train steps/s ours | peer | ours/peer | inference clips/s ours | peer | "
        "ours/peer |\n|---|---|---|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    rows = []
    for ours, peer in args.pairs:
        missing = _unavailable(peer)
        if missing:
            result: dict[str, Any] = dict(status=missing)
        else:
            spec = dict(
                ours=ours,
                peer=peer,
                variants=variants,
                batch=args.batch,
                clip=clip,
                repeats=args.model_repeats,
                threads=torch.get_num_threads(),
                device=args.device,
            )
            result = run_child("benchmarks.compare.models:run_pair", spec, args.case_timeout)
        for variant in variants:
            row: dict[str, Any] = dict(ours=ours, peer=peer, variant=variant, batch=args.batch, clip=list(clip))
            if variant in result and "peer" in result:
                mine, theirs = result[variant], result["peer"]
                row.update({f"ours_{k}": v for k, v in mine.items()})
                row.update({f"peer_{k}": v for k, v in theirs.items()})
                row["train_ratio"] = mine["train_per_s"] / theirs["train_per_s"]
                row["infer_ratio"] = mine["infer_per_s"] / theirs["infer_per_s"]
                row["status"] = "ok"
            else:
                row["status"] = result.get("status", "failed")
            rows.append(row)
            if row["status"] != "ok":
                print(f"| {ours} | {variant} | {peer} | {row['status']} | | | | | |", flush=True)
                continue
            print(
                f"| {ours} | {variant} | {peer} | {fmt(row['ours_train_per_s'], '', 3)} | "
                f"{fmt(row['peer_train_per_s'], '', 3)} | {fmt(row['train_ratio'], 'x')} | "
                f"{fmt(row['ours_infer_per_s'])} | {fmt(row['peer_infer_per_s'])} | {fmt(row['infer_ratio'], 'x')} |",
                flush=True,
            )
    return rows
