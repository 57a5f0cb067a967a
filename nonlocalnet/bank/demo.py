"""The long-term feature bank on the built-in long-video task: clip-only vs pooled bank vs feature bank operator.

1. A short-term backbone (a tiny C2D ResNet3d) is trained on clips with the per-clip annotation (which shape,
   if any, the clip shows): what a clip can tell.
2. It is run over every clip of every video; the pooled features go to a feature bank on disk (safetensors).
3. Three heads are trained on the video label from the frozen features of one clip at a time:
   the clip alone (linear), the clip with the bank average-pooled (linear), and the clip with the feature bank
   operator (two non-local layers attending from the clip to the bank, then linear).
The label is the sum of two shapes shown in clips far apart, mod 3, so the clip alone is at chance (1/3).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.transforms import MEAN, STD
from ..layers.feature_bank import FeatureBankClassifier
from .build import build_feature_bank
from .heads import ClipOnlyHead, PooledBankHead
from .longvideo import LongVideoTask
from .store import FeatureBank
from .train import BankSamples, evaluate_head, train_head

__all__ = [
    "DemoConfig",
    "QUICK",
    "run_feature_bank_demo",
    "format_table",
    "frames_to_input",
    "make_backbone",
    "train_backbone",
]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults are small enough for a CPU.

    Attributes:
        backbone_videos: videos whose clips train the backbone (the first of the training videos).
        train_videos: videos in the training bank that the heads are trained on (forward passes only, so more
            of them are cheap).
        test_videos: held-out videos (another seed) the table reports on.
        num_clips: clips per video.
        clip_frames: frames per clip.
        size: frame size in pixels.
        width: bottleneck width of the tiny C2D backbone (layers (1, 1, 1, 1)).
        backbone_epochs: epochs of short-term training (each epoch: every event clip and as many plain clips).
        head_epochs: epochs of head training (over every (video, clip) sample).
        inter_channels: C' of the feature bank operator (512 in the paper).
        seed: everything derives from it (test videos use seed + 1).
    """

    backbone_videos: int = 320
    train_videos: int = 640
    test_videos: int = 200
    num_clips: int = 8
    clip_frames: int = 8
    size: int = 32
    width: int = 8
    backbone_epochs: int = 12
    head_epochs: int = 10
    inter_channels: int = 512
    seed: int = 0


# a minute-scale version for tests and smoke runs
QUICK = DemoConfig(
    backbone_videos=128, train_videos=256, test_videos=64, backbone_epochs=8, head_epochs=8, inter_channels=128
)


def frames_to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> a normalised network input (3, T, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()  # (T, H, W, 3) -> (3, T, H, W)
    return (x - MEAN) / STD


def make_backbone(task: LongVideoTask, width: int = 8) -> nn.Module:
    """The short-term model: a tiny C2D ResNet3d (layers (1, 1, 1, 1), 8x8 clip layout) with the clip classes."""
    from ..models import ResNet3d

    return ResNet3d(layers=(1, 1, 1, 1), arch="c2d", clip="8x8", width=width, num_classes=task.num_clip_classes)


def train_backbone(
    model: nn.Module,
    task: LongVideoTask,
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Trains ``model`` on the per-clip annotation (SGD, momentum 0.9, cosine schedule).

    Every epoch takes every event clip and as many event-free clips drawn at random, so the classes are balanced
    enough for the rare events to be learnt.

    Returns:
        The mean loss of every epoch.
    """
    rng = np.random.default_rng([seed, 7])
    events = [(v, c) for v in range(task.num_videos) for c in task.spec(v).event_clips]
    plain = [(v, c) for v in range(task.num_videos) for c in range(task.num_clips) if c not in task.spec(v).event_clips]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = (2 * len(events) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * steps_per_epoch))
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def clip(v: int, c: int) -> torch.Tensor:
        if (v, c) not in cache:
            cache[(v, c)] = frames_to_input(task.clip(v, c))
        return cache[(v, c)]

    losses = []
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="backbone", unit="step", disable=not progress)
    for _ in range(epochs):
        chosen = [plain[i] for i in rng.choice(len(plain), size=min(len(events), len(plain)), replace=False)]
        samples = events + chosen
        order = rng.permutation(len(samples))
        total = 0.0
        for start in range(0, len(samples), batch_size):
            batch = [samples[i] for i in order[start : start + batch_size]]
            x = torch.stack([clip(v, c) for v, c in batch])  # (B, 3, T, H, W)
            y = torch.tensor([task.clip_label(v, c) for v, c in batch])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
            bar.update(1)
        losses.append(total / len(samples))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def _videos(task: LongVideoTask):
    """(video id, normalised frames) of every video, sized for the progress bar."""

    class Videos:
        def __len__(self) -> int:
            return task.num_videos

        def __iter__(self):
            for v in range(task.num_videos):
                yield f"video{v:05d}", frames_to_input(task.video(v))

    return Videos()


def run_feature_bank_demo(
    config: DemoConfig = DemoConfig(),
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the whole demo and returns the table as a dict (also written to ``out_dir`` if given).

    Args:
        config: sizes and seed.
        out_dir: where to write the backbone weights, the two banks (safetensors), results.json and results.md.
        progress: show progress bars.
        log: where progress lines go.

    Returns:
        ``{"config", "rows": [{"key" ("clip_only", "bank_avg", "bank_fbo"), "head", "clip_accuracy",
        "video_accuracy", "parameters", "train_seconds"}], "chance", "backbone": {...}, "seconds"}``.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    shape = dict(num_clips=config.num_clips, clip_frames=config.clip_frames, size=config.size)
    train_task = LongVideoTask(config.train_videos, seed=config.seed, **shape)
    test_task = LongVideoTask(config.test_videos, seed=config.seed + 1, **shape)
    out = Path(out_dir) if out_dir is not None else None

    if not 0 < config.backbone_videos <= config.train_videos:
        raise ValueError(
            f"backbone_videos must be in 1..train_videos ({config.train_videos}); got {config.backbone_videos}"
        )
    backbone_task = LongVideoTask(config.backbone_videos, seed=config.seed, **shape)  # the first training videos
    log(f"[1/3] training the short-term backbone on the clips of {config.backbone_videos} videos")
    backbone = make_backbone(train_task, config.width)
    t0 = time.perf_counter()
    backbone_losses = train_backbone(
        backbone, backbone_task, epochs=config.backbone_epochs, seed=config.seed, progress=progress
    )
    backbone_seconds = time.perf_counter() - t0
    backbone_acc = _clip_annotation_accuracy(backbone, test_task)
    log(f"      backbone per-clip annotation accuracy on test clips: {backbone_acc:.3f}")

    log("[2/3] building the feature banks")
    meta = {
        "model": f"ResNet3d(layers=(1,1,1,1), arch='c2d', clip='8x8', width={config.width})",
        "task": json.dumps(asdict(config)),
    }
    banks = {}
    for split, task in (("train", train_task), ("test", test_task)):
        path = out / f"bank_{split}.safetensors" if out is not None else None
        banks[split] = build_feature_bank(
            backbone,
            _videos(task),
            clip_frames=config.clip_frames,
            batch_size=16,
            out=path,
            metadata=meta,
            progress=progress,
        )
        if path is not None:
            banks[split] = FeatureBank.load(path)  # train on what the file holds
    train = BankSamples.from_bank(
        banks["train"], {f"video{v:05d}": train_task.label(v) for v in range(train_task.num_videos)}
    )
    test = BankSamples.from_bank(
        banks["test"], {f"video{v:05d}": test_task.label(v) for v in range(test_task.num_videos)}
    )
    # standardise features with the training set's statistics (the same input for every head)
    mean = train.features.mean(dim=(0, 1))
    std = train.features.std(dim=(0, 1)).clamp_min(1e-6)
    train.features = (train.features - mean) / std
    test.features = (test.features - mean) / std

    log("[3/3] training the heads on frozen features")
    channels = train.features.shape[2]
    heads = {
        ("clip_only", "clip only (linear)"): ClipOnlyHead(channels, train_task.num_classes),
        ("bank_avg", "clip + bank, average pooled (linear)"): PooledBankHead(
            channels, channels, train_task.num_classes
        ),
        ("bank_fbo", "clip + bank, feature bank operator (2 NL layers)"): FeatureBankClassifier(
            channels, channels, train_task.num_classes, inter_channels=config.inter_channels
        ),
    }
    rows = []
    for i, ((key, name), head) in enumerate(heads.items()):
        torch.manual_seed(config.seed + i)
        t0 = time.perf_counter()
        train_head(head, train, epochs=config.head_epochs, seed=config.seed, progress=progress, desc=name[:28])
        seconds = time.perf_counter() - t0
        metrics = evaluate_head(head, test)
        rows.append(
            {
                "key": key,
                "head": name,
                **metrics,
                "parameters": sum(p.numel() for p in head.parameters()),
                "train_seconds": round(seconds, 1),
            }
        )
    result = {
        "config": asdict(config),
        "rows": rows,
        "chance": 1.0 / train_task.num_classes,
        "backbone": {
            "clip_annotation_accuracy": backbone_acc,
            "losses": backbone_losses,
            "train_seconds": round(backbone_seconds, 1),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from ..models import save_weights

        save_weights(backbone, out / "backbone.safetensors", metadata={"model": meta["model"]})
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "results.md").write_text(format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    """The demo's result as a markdown table."""
    lines = ["| head | clip accuracy | video accuracy | parameters | train time |", "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(
            f"| {row['head']} | {100 * row['clip_accuracy']:.1f}% | {100 * row['video_accuracy']:.1f}% | "
            f"{row['parameters']:,} | {row['train_seconds']:.1f} s |"
        )
    cfg = result["config"]
    lines.append("")
    lines.append(
        f"Chance: {100 * result['chance']:.1f}%. Test: {cfg['test_videos']} videos x {cfg['num_clips']} "
        f"clips of {cfg['clip_frames']} frames ({cfg['size']}x{cfg['size']}), seed {cfg['seed']}; "
        f"backbone per-clip annotation accuracy "
        f"{100 * result['backbone']['clip_annotation_accuracy']:.1f}%; total {result['seconds']:.0f} s."
    )
    return "\n".join(lines)


@torch.no_grad()
def _clip_annotation_accuracy(model: nn.Module, task: LongVideoTask, batch_size: int = 64) -> float:
    """Balanced accuracy of the backbone on the per-clip annotation (mean over classes)."""
    model.eval()
    pairs = [(v, c) for v in range(task.num_videos) for c in range(task.num_clips)]
    preds, labels = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        x = torch.stack([frames_to_input(task.clip(v, c)) for v, c in batch])
        preds.append(model(x).argmax(dim=1))
        labels.extend(task.clip_label(v, c) for v, c in batch)
    preds = torch.cat(preds)
    labels = torch.tensor(labels)
    per_class = [(preds[labels == k] == k).float().mean().item() for k in labels.unique()]
    return float(np.mean(per_class))
