"""Pictures of what a non-local block attends to, as the paper's Figures 1 and 3.

The clip's frames are drawn in a row, one panel per temporal key cell (the weights are constant within one).
For one query position the block's weights over all keys are laid over the frames as a heat map, and the
strongest query -> key pairs are drawn as arrows across the panels. Softmax weights (gaussian, embedded
gaussian) and concatenation weights are non-negative and use a sequential colour map from 0; dot-product
weights can be negative and use a diverging map centred on 0 (red positive, blue negative).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .capture import BlockAttention

__all__ = ["render_attention", "frames_for_display"]

SEQUENTIAL_CMAP = "inferno"
DIVERGING_CMAP = "RdBu_r"


def frames_for_display(clip: Tensor | np.ndarray) -> np.ndarray:
    """Frames as (T, H, W, 3) floats in [0, 1] for drawing.

    Args:
        clip: (C, T, H, W) or (1, C, T, H, W) tensor in any value range (a normalised network input is
            rescaled to [0, 1] over the whole clip), or (T, H, W, C) uint8 frames as decoded; an image is
            (C, H, W) or (H, W, C) uint8, shown as one frame. One channel is shown as grey.
    """
    if isinstance(clip, np.ndarray) and clip.dtype == np.uint8:
        frames = clip.astype(np.float32) / 255.0  # (T, H, W, C)
        if frames.ndim == 3:
            frames = frames[None]  # (H, W, C) -> (1, H, W, C)
    else:
        array = clip.detach().float().cpu().numpy() if isinstance(clip, Tensor) else np.asarray(clip, np.float32)
        if array.ndim == 3:
            array = array[:, None]  # an image (C, H, W) -> (C, 1, H, W)
        if array.ndim == 5:
            if array.shape[0] != 1:
                raise ValueError(f"frames_for_display takes one clip; got a batch of {array.shape[0]}")
            array = array[0]
        if array.ndim != 4:
            raise ValueError(f"expected a clip (C, T, H, W) or frames (T, H, W, C); got shape {array.shape}")
        frames = array.transpose(1, 2, 3, 0)  # (C, T, H, W) -> (T, H, W, C)
        low, high = float(frames.min()), float(frames.max())
        frames = (frames - low) / (high - low) if high > low else np.zeros_like(frames)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.shape[-1] != 3:
        raise ValueError(f"frames need 1 or 3 channels; got {frames.shape[-1]}")
    return np.clip(frames, 0.0, 1.0)


def render_attention(clip: Tensor | np.ndarray, attention: BlockAttention, out: str | Path, *,
                     query: Sequence[float] | None = None, batch: int = 0, top_k: int = 10,
                     max_panels: int = 8, title: str | None = None, dpi: int = 100,
                     boxes: Sequence[Sequence[int]] | Tensor | None = None,
                     box_labels: Sequence[str] | None = None) -> dict:
    """Draws one block's attention over the clip and writes a PNG.

    Args:
        clip: the clip the attention was captured on (see :func:`frames_for_display`); its frames must match
            ``attention.input_size``.
        attention: one entry of :func:`~nonlocalnet.viz.capture_attention`'s result (keys from the clip,
            not from a memory).
        out: path of the PNG to write (folders are created).
        query: (t, y, x) in input pixels: show this query's weights and its top_k keys. None: find the
            strongest pairs over all queries (leaving out keys within one key cell of their query), show them
            as arrows and the heat map of the query of the strongest one.
        batch: which batch element of the weights.
        top_k: how many arrows.
        max_panels: at most this many frames are drawn (the panels of the query and its arrows come first).
        title: figure title; default names the block, mode and query.
        dpi: resolution of the PNG.
        boxes: objects to outline, each (frame, y0, x0, y1, x1) in input pixels (end-exclusive); the panel of
            the box's temporal key cell shows that very frame, and these panels are drawn first.
        box_labels: a name per box written beside it (default "A", "B", ...).

    Returns:
        A summary: ``{"path", "query" (index), "query_coords" (t, y, x), "pairs": [(query, key, weight), ...],
        "panels": [frame index, ...], "cmap": the colour map's name, "boxes": the boxes drawn}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import ConnectionPatch

    if attention.from_memory:
        raise ValueError(f"block {attention.name} attended over a memory tensor, not the clip: its keys have no "
                         "place in the frames")
    frames = frames_for_display(clip)
    if tuple(frames.shape[:3]) != _frames_shape(attention):
        raise ValueError(f"the clip has frames of shape {tuple(frames.shape[:3])} (T, H, W) but the attention was "
                         f"captured on an input of {attention.input_size}")
    if query is not None:
        if len(query) != 3:
            raise ValueError(f"query must be (t, y, x) in input pixels; got {tuple(query)}")
        q = attention.query_index(*query)
        pairs = attention.top_pairs(top_k, batch=batch, query=q)
    else:
        key_cell = max(attention.key_stride[1], attention.key_stride[2])
        pairs = attention.top_pairs(top_k, batch=batch, min_distance=key_cell) or \
            attention.top_pairs(top_k, batch=batch)
        q = pairs[0][0]
    q_coords = attention.query_coords[q].tolist()
    key_maps = attention.weights[batch].reshape(-1, *attention.key_grid)  # (N, M) -> (N, Tk, Hk, Wk)
    heat = key_maps[q].numpy()  # (Tk, Hk, Wk)

    # one panel per temporal key cell; a frame from its middle stands for it
    kt = attention.key_stride[0]
    cell_of = lambda t: min(int((t + 0.5) // kt), attention.key_grid[0] - 1)  # noqa: E731
    needed = [cell_of(attention.query_coords[i][0].item()) for i, _, _ in pairs] + \
        [cell_of(attention.key_coords[j][0].item()) for _, j, _ in pairs] + [cell_of(q_coords[0])]
    box_list = _check_boxes(boxes, frames.shape[:3])
    labels = list(box_labels) if box_labels is not None else [chr(ord("A") + i) for i in range(len(box_list))]
    if len(labels) != len(box_list):
        raise ValueError(f"{len(labels)} box labels for {len(box_list)} boxes")
    box_cells = [cell_of(b[0]) for b in box_list]
    panels = _choose_panels(attention.key_grid[0], needed, max_panels, first=box_cells)
    panel_frame = {c: min(int(round((c + 0.5) * kt - 0.5)), frames.shape[0] - 1) for c in panels}
    for cell, box in zip(reversed(box_cells), reversed(box_list)):  # the first box's frame wins a shared cell
        if cell in panel_frame:
            panel_frame[cell] = box[0]

    signed = attention.signed
    if signed:
        bound = float(np.abs(heat).max()) or 1.0
        norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
        cmap = DIVERGING_CMAP
    else:
        norm = Normalize(vmin=0.0, vmax=float(heat.max()) or 1.0)
        cmap = SEQUENTIAL_CMAP
    h, w = frames.shape[1:3]
    hk, wk = attention.key_grid[1:]
    sy, sx = attention.key_stride[1:]
    extent = (-0.5, wk * sx - 0.5, hk * sy - 0.5, -0.5)  # key cells placed over the pixels they cover

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 0.8, 2.9), squeeze=False)
    axes = axes[0]
    ax_of = {}
    image = None
    for ax, cell in zip(axes, panels):
        ax.imshow(frames[panel_frame[cell]], interpolation="nearest")
        image = ax.imshow(heat[cell], cmap=cmap, norm=norm, alpha=0.55, extent=extent, interpolation="nearest")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(f"frame {panel_frame[cell]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax_of[cell] = ax
    from matplotlib.patches import Rectangle

    box_colours = ["cyan", "yellow", "magenta", "white"]
    drawn = []
    for i, (box, label, cell) in enumerate(zip(box_list, labels, box_cells)):
        ax = ax_of.get(cell)
        if ax is None or panel_frame[cell] != box[0]:
            continue
        frame, y0, x0, y1, x1 = box
        colour = box_colours[i % len(box_colours)]
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.5))
        ax.text(x0 - 0.5, y0 - 1.0, label, color=colour, fontsize=8, va="bottom")
        drawn.append(box)
    strongest = max(abs(p[2]) for p in pairs) or 1.0
    for qi, kj, weight in pairs:
        qc = attention.query_coords[qi].tolist()
        kc = attention.key_coords[kj].tolist()
        q_ax, k_ax = ax_of.get(cell_of(qc[0])), ax_of.get(cell_of(kc[0]))
        if q_ax is None or k_ax is None:
            continue
        colour = "tab:red" if (not signed or weight >= 0) else "tab:blue"
        arrow = ConnectionPatch(xyA=(qc[2], qc[1]), coordsA=q_ax.transData, xyB=(kc[2], kc[1]),
                                coordsB=k_ax.transData, arrowstyle="-|>", color=colour,
                                linewidth=0.6 + 2.0 * abs(weight) / strongest, alpha=0.85, mutation_scale=10)
        fig.add_artist(arrow)
    q_ax = ax_of[cell_of(q_coords[0])]
    q_ax.plot([q_coords[2]], [q_coords[1]], marker="o", markersize=7, markerfacecolor="none",
              markeredgecolor="lime", markeredgewidth=2)
    if title is None:
        where = "query" if query is not None else "strongest query"
        title = (f"{attention.name} ({attention.mode}): {where} at t={q_coords[0]:.1f}, y={q_coords[1]:.1f}, "
                 f"x={q_coords[2]:.1f}; top {len(pairs)} pairs")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes), fraction=0.025, pad=0.02,
                 label="weight f/C(x)" + (" (signed)" if signed else ""))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {"path": str(out), "query": q, "query_coords": tuple(q_coords), "pairs": pairs,
            "panels": [panel_frame[c] for c in panels], "cmap": cmap, "boxes": drawn}


def _check_boxes(boxes: Sequence[Sequence[int]] | Tensor | None, shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Boxes as a list of (frame, y0, x0, y1, x1) ints, each checked to lie in a clip of shape (T, H, W)."""
    if boxes is None:
        return []
    rows = boxes.tolist() if isinstance(boxes, Tensor) else [list(b) for b in boxes]
    out = []
    t, h, w = (int(s) for s in shape)
    for row in rows:
        if len(row) != 5:
            raise ValueError(f"a box is (frame, y0, x0, y1, x1); got {row}")
        frame, y0, x0, y1, x1 = (int(v) for v in row)
        if not (0 <= frame < t and 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise ValueError(f"box {tuple(row)} (frame, y0, x0, y1, x1; end-exclusive) does not lie in a clip of "
                             f"{t} frames of {h}x{w} pixels")
        out.append((frame, y0, x0, y1, x1))
    return out


def _frames_shape(attention: BlockAttention) -> tuple[int, int, int]:
    return tuple(int(s) for s in attention.input_size)


def _choose_panels(cells: int, needed: Sequence[int], max_panels: int, first: Sequence[int] = ()) -> list[int]:
    """Temporal key cells to draw: ``first`` ones, the needed ones (most frequent first), then evenly spaced others."""
    if max_panels < 1:
        raise ValueError(f"max_panels must be at least 1; got {max_panels}")
    if cells <= max_panels:
        return list(range(cells))
    chosen: list[int] = []
    for cell in first:
        if len(chosen) < max_panels and cell not in chosen:
            chosen.append(cell)
    for cell in sorted(set(needed), key=lambda c: (-list(needed).count(c), c)):
        if len(chosen) < max_panels and cell not in chosen:
            chosen.append(cell)
    for cell in np.linspace(0, cells - 1, max_panels).round().astype(int).tolist():
        if len(chosen) < max_panels and cell not in chosen:
            chosen.append(cell)
    return sorted(chosen)
