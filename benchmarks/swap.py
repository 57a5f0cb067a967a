"""mmaction2's NL I3D R50 before and after ``nonlocalnet.swap_nonlocal``: one training step's time and peak memory.

    python -m benchmarks.swap                                  # CPU, a (1, 3, 8, 112, 112) clip, 1 thread
    python -m benchmarks.swap --clip 32 224 224 --device cuda  # the paper's clip on a GPU

The network is mmaction2's own ``ResNet3d`` built from its NL I3D config (embedded gaussian by default: five
mmcv ``NonLocal3d`` blocks in res3 and res4, sub-sampled, no scale), with an average-pool + fc head of 400 classes;
the swapped copy is the same network with its blocks replaced by ours (weights mapped). Both live in this process
and run on the same clip; their training steps (forward, cross-entropy, backward) alternate, so that machine drift
hits them alike. The table gives the median step time, the peak memory of a step (CUDA: torch's peak allocation;
CPU: the rise of the resident set, every allocation mapped fresh as in benchmarks/_common.py) and the memory the
step keeps for its backward pass; the largest output difference checks that both compute the same function.
Needs mmaction2 (with mmcv and mmengine), as CI's environment with peers installs them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import statistics
import sys
import types
from pathlib import Path

import torch
from torch import nn

from ._common import fmt, machine, peak_memory_mb, time_round_robin, write_atomic

CONFIGS = {
    "embedded_gaussian": "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb",
    "dot_product": "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb",
    "gaussian": "i3d_imagenet-pretrained-r50-nl-gaussian_8xb8-32x2x1-100e_kinetics400-rgb",
}


def mmaction2_resnet3d() -> tuple[type, Path]:
    """mmaction2's ResNet3d class and its I3D config folder, from the installed wheel without the package's
    ``__init__`` (which asserts mmcv < 2.2 and imports what the wheel does not declare): only ``mmaction.registry``
    and the backbone's file run."""
    if "mmaction" in sys.modules:
        root = Path(list(sys.modules["mmaction"].__path__)[0])
    else:
        spec = importlib.util.find_spec("mmaction")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("benchmarks.swap needs mmaction2 (with mmcv and mmengine): CI's environment with peers")
        root = Path(list(spec.submodule_search_locations)[0])
        package = types.ModuleType("mmaction")
        package.__path__ = [str(root)]
        sys.modules["mmaction"] = package
    importlib.import_module("mmaction.registry")
    name = "mmaction.models.backbones.resnet3d"
    if name not in sys.modules:
        file = importlib.util.spec_from_file_location(name, root / "models" / "backbones" / "resnet3d.py")
        module = importlib.util.module_from_spec(file)
        sys.modules[name] = module
        file.loader.exec_module(module)
    return sys.modules[name].ResNet3d, root / ".mim" / "configs" / "recognition" / "i3d"


class Recognizer(nn.Module):
    """The backbone, a global average pool and a 400-class fc (mmaction2's I3DHead without dropout)."""

    def __init__(self, backbone: nn.Module, classes: int = 400) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x).mean(dim=(2, 3, 4)))  # (B, 2048, T, H, W) -> (B, 2048) -> (B, classes)


def build(mode: str) -> nn.Module:
    """mmaction2's NL I3D R50 from its config, its NL blocks at random (nonzero γ), in training mode."""
    from mmengine.config import Config

    resnet3d, configs = mmaction2_resnet3d()
    cfg = Config.fromfile(configs / f"{CONFIGS[mode]}.py")
    options = {k: v for k, v in cfg.model.backbone.items() if k not in ("type", "pretrained", "pretrained2d")}
    torch.manual_seed(0)
    backbone = resnet3d(pretrained=None, pretrained2d=False, **options)
    backbone.init_weights()
    with torch.no_grad():
        for m in backbone.modules():
            if type(m).__name__ == "NonLocal3d":
                m.conv_out.norm.weight.uniform_(0.5, 1.5)  # γ != 0: the blocks are not the identity
    model = Recognizer(backbone)
    model.train()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(CONFIGS), default="embedded_gaussian")
    parser.add_argument("--clip", type=int, nargs=3, default=(8, 112, 112), metavar=("T", "H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("swap.json"), help="where to write the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import nonlocalnet
    from nonlocalnet.models.swap import saved_for_backward_mb

    theirs = build(args.mode).to(args.device)
    ours = build(args.mode).to(args.device)
    report = nonlocalnet.swap_nonlocal(ours)
    print(report)
    x = torch.randn(args.batch, 3, *args.clip, device=args.device)
    labels = torch.randint(0, 400, (args.batch,), device=args.device)

    def step(model: nn.Module):
        def run() -> None:
            nn.functional.cross_entropy(model(x), labels).backward()
            model.zero_grad(set_to_none=True)

        return run

    with torch.no_grad():  # the same function: eval-mode outputs side by side
        theirs.eval(), ours.eval()
        expected = theirs(x)
        difference = ((ours(x) - expected).abs().max() / expected.abs().max()).item()  # relative to the largest
        theirs.train(), ours.train()
    names = {"mmaction2 (mmcv NonLocal3d)": theirs, "after swap_nonlocal": ours}
    seconds = time_round_robin({name: step(m) for name, m in names.items()}, args.repeats, args.device)
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(2):
        for name, model in names.items():
            peaks[name].append(peak_memory_mb(step(model), args.device))
    saved = {name: saved_for_backward_mb(model, x) for name, model in names.items()}
    rows = [
        dict(model=name, step_ms=seconds[name] * 1e3, peak_mb=statistics.median(peaks[name]), saved_mb=saved[name])
        for name in names
    ]
    clip = ", ".join(map(str, (args.batch, 3, *args.clip)))
    title = f"mmaction2 NL I3D R50 ({args.mode}), one training step on a ({clip}) clip; {machine(args.device)}"
    print(f"\n{title}\n")
    print("| model | step ms | peak MB | saved for backward MB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {fmt(r['step_ms'])} | {fmt(r['peak_mb'])} | {fmt(r['saved_mb'])} |")
    base, new = rows
    print(
        f"\nratio after/before: time {new['step_ms'] / base['step_ms']:.2f}, peak "
        f"{new['peak_mb'] / base['peak_mb']:.2f}; largest eval output difference {difference:.1e} of the largest "
        "output; "
        f"{len(report.swapped)} blocks swapped"
    )
    result = dict(
        command="python -m benchmarks.swap " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine(args.device),
        torch=torch.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        mode=args.mode,
        clip=list(args.clip),
        batch=args.batch,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        rows=rows,
        max_output_difference_relative=difference,
        swapped=report.swapped,
    )
    write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
