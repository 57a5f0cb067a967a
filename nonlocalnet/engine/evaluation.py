"""Testing video classifiers: every test view scored, the views of each video averaged, the metrics computed.

report = evaluate(model, cfg)                                       # a model in hand
report = test(cfg, checkpoint="runs/x/model_final.safetensors")    # a saved one, report written beside it
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import ShardedSampler, build_dataset, collate, is_multi_label
from ..data.transforms import normalize
from ..layers import NonLocalBlock
from ..models.batchnorm import freeze_batchnorm
from ..models.checkpoints.weights import load_model
from . import metrics
from .checkpoint import CheckpointError
from .classes import resolve_num_classes
from .distributed import DistInfo, all_gather_cat, init_distributed, resolve_device, unwrap_model
from .loop import union, write_json
from .precision import autocast, inference_layout


def model_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's model options, its classifier sized to ``data.num_classes`` unless they say otherwise."""
    return {"num_classes": cfg["data"]["num_classes"], **cfg["model"]["options"]}


def make_loader(
    dataset: Dataset, sampler: ShardedSampler, batch_size: int, workers: int, drop_last: bool, seed: int
) -> DataLoader:
    """A loader of ``dataset`` in ``sampler``'s order with at most ``workers`` worker processes, never more than
    the cores this process may run on (more only queue for them)."""
    # the loader's own generator keeps worker seeding from consuming the global RNG (dropout's), so a resumed
    # run draws the same dropout masks as an uninterrupted one
    workers = min(workers, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        collate_fn=collate,
    )


def device_clips(batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch's clips on ``device``, normalised there when the dataset left them uint8.

    Real videos' training and test items hold uint8 clips (``build_dataset(..., normalize=False)``): a quarter
    of the bytes to pass from DataLoader workers and to copy to a GPU, and no float pass over every pixel in the
    loader; ``normalize`` on the device gives the values the dataset would have given (on a CPU exactly; CUDA
    divides by a number through its reciprocal, so there within one unit in the last place).
    """
    clips = batch["clip"].to(device, non_blocking=True)
    return normalize(clips) if clips.dtype == torch.uint8 else clips


def skipped_ids(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The corrupt videos a batch's items passed over (datasets without ``skipped_ids`` have none)."""
    ids = batch.get("skipped_ids")
    return [] if ids is None else ids[ids >= 0].tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    cfg: Mapping[str, Any],
    *,
    device: torch.device | None = None,
    info: DistInfo | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Scores every test view, averages the views of each video and computes the metrics.

    Single-label: softmax scores, top-1 / top-5, per-class accuracy, confusion matrix. Multi-label (Charades):
    sigmoid scores and mAP. With ``test.fully_convolutional`` the network's classifier runs at every res5 position
    and the position scores are averaged (the paper's test).
    """
    device = device or next(model.parameters()).device
    info = info or DistInfo()
    dataset = dataset or build_dataset(cfg["data"], "test", cfg["seed"], normalize=False)
    multi_label = is_multi_label(cfg["data"])
    net = unwrap_model(model)
    fully_conv = bool(cfg["test"]["fully_convolutional"])
    previous = getattr(net, "fully_convolutional", None)
    previous_activation = getattr(net, "score_activation", None)
    if fully_conv:
        if previous is None:
            raise ValueError(f"test.fully_convolutional: {type(net).__name__} has no fully-convolutional mode")
        net.fully_convolutional = True
        net.score_activation = "sigmoid" if multi_label else "softmax"
    was_training = net.training
    net.eval()
    sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=False, pad=False)
    loader = make_loader(dataset, sampler, cfg["test"]["batch_size"], cfg["data"]["workers"], False, cfg["seed"])
    all_scores, all_videos, all_labels, skipped = [], [], [], set()
    with inference_layout(net, device, cfg["train"]["memory_format"]):
        for batch in tqdm(
            loader,
            desc="test",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not (info.is_main and cfg["progress"]),
        ):
            with autocast(device, cfg["train"]["amp"]):
                out = net(device_clips(batch, device))
            out = out.float()
            # logits in either mode (fully-convolutional: those of the positions' averaged scores)
            out = out.sigmoid() if multi_label else out.softmax(dim=1)
            all_scores.append(out.cpu())
            all_videos.append(batch["video"])
            all_labels.append(batch["label"])
            skipped.update(skipped_ids(batch))
    net.train(was_training)
    if fully_conv:
        net.fully_convolutional = previous
        net.score_activation = previous_activation
    scores = all_gather_cat(torch.cat(all_scores).to(device)).cpu()
    videos = all_gather_cat(torch.cat(all_videos).to(device)).cpu()
    labels = all_gather_cat(torch.cat(all_labels).to(device)).cpu()
    report = metrics.views_report(scores, videos, labels, cfg["data"]["num_classes"], multi_label)
    report["skipped_videos"] = len(union(skipped, device))
    return report


def test(
    cfg: Mapping[str, Any], checkpoint: str | os.PathLike | None = None, output: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Evaluates the config's model with weights from ``checkpoint`` (default: the run's model_final).

    The report goes to ``output``, by default ``test_metrics_<checkpoint's stem>.json`` in ``output_dir``: beside
    the ``test_metrics.json`` of the training run's own final test, which it never replaces.
    """
    cfg = resolve_num_classes(cfg)
    device = resolve_device(cfg["device"])
    info = init_distributed(device)
    path = Path(checkpoint or cfg["test"]["checkpoint"] or Path(cfg["output_dir"]) / "model_final.safetensors")
    try:  # the file's recorded options (a converted zoo network's, say), the config's on top
        model = load_model(
            path,
            cfg["model"]["name"],
            context=f" with data.num_classes={cfg['data']['num_classes']}",
            **model_options(cfg),
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if cfg["train"]["freeze_bn"]:
        model = freeze_batchnorm(model, exclude=(NonLocalBlock,))
    model.to(device)
    report = evaluate(model, cfg, device=device, info=info)
    report["checkpoint"] = os.fspath(path)
    if info.is_main:
        write_json(report, Path(output) if output else Path(cfg["output_dir"]) / f"test_metrics_{path.stem}.json")
    return report
