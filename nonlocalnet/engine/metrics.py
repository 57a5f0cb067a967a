"""Video classification metrics over multi-view aggregated scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def aggregate_views(scores: Tensor, videos: Tensor, num_videos: int | None = None) -> tuple[Tensor, Tensor]:
    """Averages the scores of all views (clips x crops) of each video.

    Args:
        scores: (V, K) per-view scores (softmax or sigmoid).
        videos: (V,) the video index of each view.
        num_videos: size of the index space (default: max index + 1).

    Returns:
        (scores (U, K), video ids (U,)) for the U videos that have at least one view, in increasing id order.
    """
    n = int(videos.max()) + 1 if num_videos is None else num_videos
    total = scores.new_zeros(n, scores.shape[1]).index_add_(0, videos, scores)
    count = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(
        0, videos, torch.ones_like(videos, dtype=scores.dtype)
    )
    seen = count > 0
    return total[seen] / count[seen, None], torch.nonzero(seen).flatten()


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at the class count)."""
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[k] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(K, K) counts; row = true class, column = predicted class."""
    index = labels * num_classes + predictions
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class (NaN for a class with no videos)."""
    total = confusion.sum(dim=1).double()
    return confusion.diagonal().double() / total.where(total > 0, torch.full_like(total, float("nan")))


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-class average precision (the Charades mAP definition: mean of precision at every positive).

    Args:
        scores: (U, K) scores.
        targets: (U, K) multi-hot labels.

    Returns:
        (K,) AP of each class; NaN for a class without positives.
    """
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()  # (U, K) 1 where the i-th ranked video is positive
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)[:, None]
    positives = hits.sum(0)
    ap = (precision * hits).sum(0) / positives.where(positives > 0, torch.ones_like(positives))
    return ap.where(positives > 0, torch.full_like(ap, float("nan")))


def classification_report(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-5, per-class accuracy and confusion matrix (single-label) for aggregated scores."""
    confusion = confusion_matrix(scores.argmax(1), labels, num_classes)
    per_class = per_class_accuracy(confusion)
    top = topk_accuracy(scores, labels)
    return {
        "videos": int(len(labels)),
        "top1": top[1],
        "top5": top[5],
        "mean_class_accuracy": float(per_class.nanmean()),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": confusion.tolist(),
    }


def multilabel_report(scores: Tensor, targets: Tensor) -> dict[str, Any]:
    """mAP over classes with positives, and per-class AP (multi-label)."""
    ap = average_precision(scores, targets)
    return {"videos": int(len(targets)), "mAP": float(ap.nanmean()), "per_class_ap": ap.tolist()}


def views_report(
    scores: Tensor, videos: Tensor, labels: Tensor, num_classes: int, multi_label: bool = False
) -> dict[str, Any]:
    """The test report: video-level metrics (each video's views averaged) and clip-level ones (every view alone).

    The paper's and the other codebases' Kinetics numbers are video-level; clip-level top-1 is what a single
    view scores, lower, and what a training log's accuracy compares with.

    Args:
        scores: (V, K) per-view scores; videos: (V,) each view's video index; labels: (V,) or (V, K) each view's
            label (its video's).
        num_classes: K.
        multi_label: mAP instead of top-k.

    Returns:
        The video-level report (``top1``, ``top5``, ... or ``mAP``, ...), plus ``clip_top1`` / ``clip_top5`` (or
        ``clip_mAP``), ``views``, and ``views_per_video`` as {"mean", "min", "max"}.
    """
    video_scores, video_ids = aggregate_views(scores, videos)
    per_video = labels.new_zeros((int(videos.max()) + 1, *labels.shape[1:]))
    per_video[videos] = labels  # every view of a video carries the video's label
    video_labels = per_video[video_ids]
    if multi_label:
        report = multilabel_report(video_scores, video_labels)
        report["clip_mAP"] = float(average_precision(scores, labels).nanmean())
    else:
        report = classification_report(video_scores, video_labels, num_classes)
        clip = topk_accuracy(scores, labels)
        report.update(clip_top1=clip[1], clip_top5=clip[5])
    counts = torch.bincount(videos)[video_ids]
    report.update(
        views=int(len(videos)),
        views_per_video={
            "mean": round(len(videos) / max(len(video_ids), 1), 3),
            "min": int(counts.min()),
            "max": int(counts.max()),
        },
    )
    return report
