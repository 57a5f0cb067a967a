"""Does a non-local block look at the other object? Hit rates and pictures for clips with two known objects.

A clip holds two objects A and B, each given as a box ``(frame, y0, x0, y1, x1)`` in input pixels (integers,
end-exclusive: the box covers rows y0 .. y1 - 1 and columns x0 .. x1 - 1 of that one frame). For one block:

- the query is the block's query cell that contains A's centre (the point ((y0 + y1) / 2, (x0 + x1) / 2) of
  A's frame, in continuous pixel coordinates where pixel p spans [p, p + 1));
- the top-attended key is the key cell with the largest weight f/C(x) in that query's row (the raw weight, so
  for dot product the most positive one), among the keys the block can reach (its ``extent`` and
  ``temporal_groups``);
- the key cell covers input frames [kt * st, (kt + 1) * st) and pixels [ky * sy, (ky + 1) * sy) x
  [kx * sx, (kx + 1) * sx), where (st, sy, sx) is the key stride (network stride times the block's max-pool
  kernel: subsampled keys are coarser); it is a *hit* if that region overlaps B's box (any overlap);
- the same is done from B to A. The hit rate is the fraction of hits over all (clip, direction) trials.

With coarse keys a random key can overlap B often, so :func:`attention_hits` also returns the *chance* rate:
the fraction of reachable key cells that overlap the target, i.e. the hit rate of a block attending at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .capture import BlockAttention, capture_attention, resolve_block_names
from .render import render_attention

__all__ = ["ObjectHits", "attention_hits", "attention_hit_rate", "hits_from_attention", "render_object_attention"]


@dataclass(frozen=True)
class ObjectHits:
    """Per clip and direction results of :func:`attention_hits`.

    Attributes:
        block: module name of the block.
        hits: (B, 2) bool; [:, 0] is A -> B (query at A, top key on B), [:, 1] is B -> A.
        chance: (B, 2) fraction of the query's reachable key cells that overlap the target box.
        queries: (B, 2) index of the query cell (at A for [:, 0], at B for [:, 1]).
        top_keys: (B, 2) index of the top-attended key cell.
        top_weights: (B, 2) its weight.
    """

    block: str
    hits: Tensor
    chance: Tensor
    queries: Tensor
    top_keys: Tensor
    top_weights: Tensor

    @property
    def rate(self) -> float:
        """Fraction of (clip, direction) trials whose top key falls on the other object."""
        return float(self.hits.float().mean())

    @property
    def chance_rate(self) -> float:
        """The rate a block attending to a uniformly random reachable key would get on the same clips."""
        return float(self.chance.mean())


def attention_hit_rate(
    model: nn.Module, clips: Tensor, object_boxes: Tensor, block_name: str | None = None, *, batch_size: int = 32
) -> float:
    """How often a non-local block's top-attended key from one object falls on the other object.

    See the module docstring for the exact rule; :func:`attention_hits` gives the per-clip details and the
    chance rate to compare with.

    Args:
        model: a model containing the block; run in eval mode under no_grad (its flags are restored).
        clips: (B, C, T, H, W) network inputs (normalised as the model expects), or one clip (C, T, H, W).
        object_boxes: (B, 2, 5) integer boxes (frame, y0, x0, y1, x1) of objects A and B of each clip, in
            input pixels of the clip, end-exclusive (the built-in dataset's ``objects``); (2, 5) for one clip.
        block_name: the block, as a module name ("res4.nl5"), the paper's "stage.index" ("res4.5"), or None
            for the model's last non-local block.
        batch_size: clips per forward pass.

    Returns:
        The fraction in [0, 1] over 2 * B trials (A -> B and B -> A for every clip).
    """
    return attention_hits(model, clips, object_boxes, block_name, batch_size=batch_size).rate


def attention_hits(
    model: nn.Module, clips: Tensor, object_boxes: Tensor, block_name: str | None = None, *, batch_size: int = 32
) -> ObjectHits:
    """Like :func:`attention_hit_rate` but returns every trial, with the chance rate (see :class:`ObjectHits`).

    Raises:
        ValueError: the boxes do not fit the clips, the model has no such block, or the block attends over a
            memory rather than the clip.
    """
    if clips.dim() == 4:
        clips = clips.unsqueeze(0)  # (C, T, H, W) -> (1, C, T, H, W)
    if object_boxes.dim() == 2:
        object_boxes = object_boxes.unsqueeze(0)  # (2, 5) -> (1, 2, 5)
    if clips.dim() != 5:
        raise ValueError(f"clips must be (B, C, T, H, W); got {tuple(clips.shape)}")
    if object_boxes.shape != (clips.shape[0], 2, 5):
        raise ValueError(
            f"object_boxes must be (B={clips.shape[0]}, 2, 5) = (frame, y0, x0, y1, x1) of objects "
            f"A and B; got {tuple(object_boxes.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    _check_boxes(object_boxes, tuple(clips.shape[2:]))
    if block_name == "all":
        raise ValueError("attention_hits takes one block, not 'all'")
    (name,) = resolve_block_names(model, block_name)
    device = next((p.device for p in model.parameters()), clips.device)
    parts = []
    for start in range(0, clips.shape[0], batch_size):
        attention = capture_attention(model, clips[start : start + batch_size].to(device), blocks=name)[name]
        parts.append(hits_from_attention(attention, object_boxes[start : start + batch_size]))
    return ObjectHits(
        name,
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("hits", "chance", "queries", "top_keys", "top_weights")),
    )


def hits_from_attention(attention: BlockAttention, object_boxes: Tensor) -> ObjectHits:
    """The hit test of :func:`attention_hits` on weights already captured (one batch, same order as the boxes).

    Args:
        attention: one block's capture on B clips.
        object_boxes: (B, 2, 5) boxes (frame, y0, x0, y1, x1) of objects A and B, input pixels, end-exclusive.
    """
    if attention.from_memory:
        raise ValueError(
            f"block {attention.name} attended over a memory tensor, not the clip: its keys are not places in the clip"
        )
    batch = attention.weights.shape[0]
    if object_boxes.shape != (batch, 2, 5):
        raise ValueError(f"object_boxes must be (B={batch}, 2, 5); got {tuple(object_boxes.shape)}")
    _check_boxes(object_boxes, attention.input_size)
    boxes = object_boxes.long().cpu()
    overlap = _key_overlaps(attention, boxes)  # (B, 2, M): key cell j overlaps object o of clip b
    hits = torch.zeros(batch, 2, dtype=torch.bool)
    chance = torch.zeros(batch, 2)
    queries = torch.zeros(batch, 2, dtype=torch.long)
    top_keys = torch.zeros(batch, 2, dtype=torch.long)
    top_weights = torch.zeros(batch, 2)
    for b in range(batch):
        for direction, (source, target) in enumerate(((0, 1), (1, 0))):
            frame, y0, x0, y1, x1 = boxes[b, source].tolist()
            # the cell containing the box's continuous centre: pixel coordinate (y0 + y1) / 2 - 0.5
            q = attention.query_index(frame, (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2)
            row = attention.weights[b, q]  # (M,)
            reach = attention.reach[q] if attention.reach is not None else torch.ones_like(row, dtype=torch.bool)
            k = int(row.masked_fill(~reach, float("-inf")).argmax())
            queries[b, direction] = q
            top_keys[b, direction] = k
            top_weights[b, direction] = row[k]
            hits[b, direction] = bool(overlap[b, target, k])
            chance[b, direction] = (overlap[b, target] & reach).float().sum() / reach.float().sum()
    return ObjectHits(attention.name, hits, chance, queries, top_keys, top_weights)


def render_object_attention(
    model: nn.Module,
    clip: Tensor,
    objects: Tensor,
    out: str | Path,
    *,
    block_name: str | None = None,
    source: int = 0,
    frames: Tensor | None = None,
    top_k: int = 5,
    max_panels: int = 8,
    title: str | None = None,
) -> dict:
    """Writes a PNG of what a block attends to from one object of a clip, with both objects outlined.

    Args:
        model: the model (run once in eval mode, see :func:`~nonlocalnet.viz.capture_attention`).
        clip: one network input (C, T, H, W) (or (1, C, T, H, W)).
        objects: (2, 5) boxes (frame, y0, x0, y1, x1) of objects A and B, input pixels, end-exclusive.
        out: the PNG to write.
        block_name: the block (see :func:`attention_hit_rate`); None = the last one.
        source: 0 to query from A (the picture of A -> B), 1 from B.
        frames: what to draw, if not the clip itself rescaled (e.g. the uint8 frames (T, H, W, 3)).
        top_k: arrows from the query to its strongest keys.
        max_panels: at most this many frames in the row (the objects' frames always among them).
        title: the figure title; default names the block, the direction and whether the top key hit.

    Returns:
        :func:`~nonlocalnet.viz.render_attention`'s summary plus "hit" (bool), "chance" and "block".
    """
    if clip.dim() == 5:
        if clip.shape[0] != 1:
            raise ValueError(f"render_object_attention draws one clip; got a batch of {clip.shape[0]}")
        clip = clip[0]
    if objects.shape != (2, 5):
        raise ValueError(f"objects must be (2, 5) = (frame, y0, x0, y1, x1) of A and B; got {tuple(objects.shape)}")
    if source not in (0, 1):
        raise ValueError(f"source must be 0 (query at A) or 1 (query at B); got {source!r}")
    if block_name == "all":
        raise ValueError("render_object_attention draws one block, not 'all'")
    (name,) = resolve_block_names(model, block_name)
    device = next((p.device for p in model.parameters()), clip.device)
    attention = capture_attention(model, clip.unsqueeze(0).to(device), blocks=name)[name]
    result = hits_from_attention(attention, objects.unsqueeze(0))
    frame, y0, x0, y1, x1 = objects[source].tolist()
    query = (frame, (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2)
    hit = bool(result.hits[0, source])
    labels = ["A", "B"]
    if title is None:
        title = (
            f"{name} ({attention.mode}): query at {labels[source]}, top key "
            f"{'on' if hit else 'not on'} {labels[1 - source]} (chance {float(result.chance[0, source]):.2f})"
        )
    summary = render_attention(
        clip if frames is None else frames,
        attention,
        out,
        query=query,
        top_k=top_k,
        max_panels=max_panels,
        title=title,
        boxes=objects,
        box_labels=labels,
    )
    return {**summary, "hit": hit, "chance": float(result.chance[0, source]), "block": name}


def _key_overlaps(attention: BlockAttention, boxes: Tensor) -> Tensor:
    """(B, 2, M) bool: does key cell j's input region overlap box o of clip b (positive-area overlap)."""
    tk, hk, wk = attention.key_grid
    st, sy, sx = attention.key_stride
    axes = []
    for n, s, lo_col, hi_col in ((tk, st, 0, None), (hk, sy, 1, 3), (wk, sx, 2, 4)):
        lo = torch.arange(n, dtype=torch.float64) * s  # (n,) cell starts in input pixels
        hi = lo + s
        box_lo = boxes[:, :, lo_col].double()[..., None]  # (B, 2, 1)
        box_hi = box_lo + 1 if hi_col is None else boxes[:, :, hi_col].double()[..., None]
        axes.append(torch.maximum(lo, box_lo) < torch.minimum(hi, box_hi))  # (B, 2, n)
    t, y, x = axes
    # (B, 2, Tk, 1, 1) & (B, 2, 1, Hk, 1) & (B, 2, 1, 1, Wk) -> (B, 2, Tk, Hk, Wk) -> (B, 2, M)
    return (t[..., :, None, None] & y[..., None, :, None] & x[..., None, None, :]).flatten(2)


def _check_boxes(boxes: Tensor, input_size: Sequence[int]) -> None:
    if boxes.dtype.is_floating_point and not torch.equal(boxes, boxes.round()):
        raise ValueError("object boxes must hold integer pixel coordinates (frame, y0, x0, y1, x1)")
    t, h, w = (int(s) for s in input_size)
    b = boxes.long()
    frame, y0, x0, y1, x1 = b.unbind(-1)
    bad = (frame < 0) | (frame >= t) | (y0 < 0) | (y1 > h) | (y0 >= y1) | (x0 < 0) | (x1 > w) | (x0 >= x1)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"object box {b[index].tolist()} at (clip, object) {index} does not lie in a clip of {t} "
            f"frames of {h}x{w} pixels (boxes are (frame, y0, x0, y1, x1), end-exclusive)"
        )
