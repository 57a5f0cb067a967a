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
        0, videos, torch.ones_like(videos, dtype=scores.dtype))
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
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


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
    return {"videos": int(len(labels)), "top1": top[1], "top5": top[5],
            "mean_class_accuracy": float(per_class.nanmean()), "per_class_accuracy": per_class.tolist(),
            "confusion_matrix": confusion.tolist()}


def multilabel_report(scores: Tensor, targets: Tensor) -> dict[str, Any]:
    """mAP over classes with positives, and per-class AP (multi-label)."""
    ap = average_precision(scores, targets)
    return {"videos": int(len(targets)), "mAP": float(ap.nanmean()), "per_class_ap": ap.tolist()}
