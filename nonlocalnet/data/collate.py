"""Batches of dataset items: the default collation, except that uint8 clips laid out frames-last stack as such."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, except for uint8 ``clip`` tensors whose memory runs (T, H, W, C)
    (``VideoListDataset(normalize=False)``): they are stacked in that order, one plain copy each (into shared memory
    in a DataLoader worker, as ``default_collate`` does), and the batch is the (B, C, T, H, W) view of it. Stacking
    them as (C, T, H, W) would transpose every pixel on the CPU, which costs about as much as normalising.
    """
    if not items or not all(isinstance(item, dict) and isinstance(item.get("clip"), torch.Tensor) for item in items):
        return default_collate(items)
    clips = [item["clip"] for item in items]
    if not all(c.dtype == torch.uint8 and c.permute(1, 2, 3, 0).is_contiguous() for c in clips):
        return default_collate(items)
    stacked = default_collate([c.permute(1, 2, 3, 0) for c in clips]).permute(0, 4, 1, 2, 3)
    return {"clip": stacked, **default_collate([{k: v for k, v in item.items() if k != "clip"} for item in items])}
