"""Pictures of what a non-local block attends to, as the paper's Figures 1 and 3.

The clip's frames are drawn in a row, one panel per temporal key cell (the weights are constant within one).
For one query position the block's weights over all keys are laid over the frames as a heat map, and the
strongest query -> key pairs are drawn as arrows across the panels. Softmax weights (gaussian, embedded
gaussian) and concatenation weights are non-negative and use a sequential colour map from 0; dot-product
weights can be negative and use a diverging map centred on 0 (red positive, blue negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from .capture import BlockAttention

__all__ = ["render_attention", "frames_for_display"]

SEQUENTIAL_CMAP = "inferno"
DIVERGING_CMAP = "RdBu_r"
BOX_COLOURS = ("cyan", "yellow", "magenta", "white")  # object boxes, in turn
QUERY_COLOUR = "lime"  # the ring around the query
KEY_COLOUR = "deepskyblue"  # the dashed outline of the query's strongest key cell
PANEL_HEIGHT = 2.6  # inches


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


def render_attention(
    clip: Tensor | np.ndarray,
    attention: BlockAttention,
    out: str | Path,
    *,
    query: Sequence[float] | None = None,
    batch: int = 0,
    top_k: int = 10,
    max_panels: int = 8,
    title: str | None = None,
    dpi: int = 100,
    boxes: Sequence[Sequence[int]] | Tensor | None = None,
    box_labels: Sequence[str] | None = None,
) -> dict:
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
        "panels": [frame index, ...], "cmap": the colour map's name, "boxes": the boxes drawn,
        "strongest_key": the (t, y, x) centre of the query's strongest key cell if its panel is drawn (outlined
        dashed, so a weight on one key cell, a spot the heat map alone can hide, shows), else None}``.
    """
    frames = _frames_to_draw(clip, attention)
    q, pairs = _query_and_pairs(attention, query, batch, top_k)
    q_coords = attention.query_coords[q].tolist()
    heat = attention.weights[batch].reshape(-1, *attention.key_grid)[q].numpy()  # (N, M) -> (N, Tk, Hk, Wk) -> row q
    box_list = _check_boxes(boxes, frames.shape[:3])
    labels = _box_labels(box_labels, len(box_list))
    panel_frame = _layout_panels(attention, pairs, q_coords, box_list, max_panels, frames.shape[0])
    signed = attention.signed
    norm, cmap = _colour_scale(heat, signed)

    plt = _pyplot()
    fig, ax_of, image = _draw_heat_maps(plt, frames, heat, panel_frame, attention, norm, cmap)
    drawn = _outline_boxes(ax_of, panel_frame, box_list, labels, attention)
    strongest = _outline_strongest_key(ax_of, heat, attention)
    _draw_arrows(fig, ax_of, attention, pairs, signed)
    _mark_query(ax_of[_key_cell(attention, q_coords[0])], q_coords)
    fig.suptitle(_default_title(attention, query, q_coords, pairs) if title is None else title, fontsize=10)
    fig.colorbar(
        image,
        ax=list(ax_of.values()),
        fraction=0.025,
        pad=0.02,
        label="weight f/C(x)" + (" (signed)" if signed else ""),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return {
        "path": str(out),
        "query": q,
        "query_coords": tuple(q_coords),
        "pairs": pairs,
        "panels": list(panel_frame.values()),
        "cmap": cmap,
        "boxes": drawn,
        "strongest_key": strongest,
    }


# --- what to draw ---------------------------------------------------------------------------------------------


def _frames_to_draw(clip: Tensor | np.ndarray, attention: BlockAttention) -> np.ndarray:
    """The clip's frames (T, H, W, 3) in [0, 1], checked to be the input the attention was captured on."""
    if attention.from_memory:
        raise ValueError(
            f"block {attention.name} attended over a memory tensor, not the clip: its keys have no place in the frames"
        )
    frames = frames_for_display(clip)
    if tuple(frames.shape[:3]) != _frames_shape(attention):
        raise ValueError(
            f"the clip has frames of shape {tuple(frames.shape[:3])} (T, H, W) but the attention was "
            f"captured on an input of {attention.input_size}"
        )
    return frames


def _query_and_pairs(
    attention: BlockAttention, query: Sequence[float] | None, batch: int, top_k: int
) -> tuple[int, list[tuple[int, int, float]]]:
    """The query to show and the (query, key, weight) pairs to draw as arrows (see :func:`render_attention`)."""
    if query is not None:
        if len(query) != 3:
            raise ValueError(f"query must be (t, y, x) in input pixels; got {tuple(query)}")
        q = attention.query_index(*query)
        return q, attention.top_pairs(top_k, batch=batch, query=q)
    key_cell = max(attention.key_stride[1], attention.key_stride[2])
    pairs = attention.top_pairs(top_k, batch=batch, min_distance=key_cell) or attention.top_pairs(top_k, batch=batch)
    return pairs[0][0], pairs


def _box_labels(box_labels: Sequence[str] | None, count: int) -> list[str]:
    labels = list(box_labels) if box_labels is not None else [chr(ord("A") + i) for i in range(count)]
    if len(labels) != count:
        raise ValueError(f"{len(labels)} box labels for {count} boxes")
    return labels


# --- layout: one panel per temporal key cell ------------------------------------------------------------------


def _key_cell(attention: BlockAttention, t: float) -> int:
    """The temporal key cell (a panel) that input frame ``t`` falls in."""
    return min(int((t + 0.5) // attention.key_stride[0]), attention.key_grid[0] - 1)


def _layout_panels(
    attention: BlockAttention,
    pairs: Sequence[tuple[int, int, float]],
    q_coords: Sequence[float],
    box_list: Sequence[tuple[int, ...]],
    max_panels: int,
    num_frames: int,
) -> dict[int, int]:
    """Temporal key cell -> the frame its panel shows, left to right.

    The weights are constant within a key cell, so a frame from its middle stands for it; a cell holding a box
    shows the box's own frame (the first box's, if several share the cell).
    """
    needed = (
        [_key_cell(attention, attention.query_coords[i][0].item()) for i, _, _ in pairs]
        + [_key_cell(attention, attention.key_coords[j][0].item()) for _, j, _ in pairs]
        + [_key_cell(attention, q_coords[0])]
    )
    box_cells = [_key_cell(attention, b[0]) for b in box_list]
    panels = _choose_panels(attention.key_grid[0], needed, max_panels, first=box_cells)
    kt = attention.key_stride[0]
    panel_frame = {c: min(int(round((c + 0.5) * kt - 0.5)), num_frames - 1) for c in panels}
    for cell, box in zip(reversed(box_cells), reversed(box_list)):
        if cell in panel_frame:
            panel_frame[cell] = box[0]
    return panel_frame


# --- drawing --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour_scale(heat: np.ndarray, signed: bool):
    """(norm, colour map name): diverging and centred on 0 for signed weights, sequential from 0 otherwise."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if signed:
        bound = float(np.abs(heat).max()) or 1.0
        return TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound), DIVERGING_CMAP
    return Normalize(vmin=0.0, vmax=float(heat.max()) or 1.0), SEQUENTIAL_CMAP


def _draw_heat_maps(
    plt, frames: np.ndarray, heat: np.ndarray, panel_frame: dict[int, int], attention: BlockAttention, norm, cmap: str
):
    """A row of panels, each a frame under the heat map of its key cell: (figure, cell -> axes, last image)."""
    h, w = frames.shape[1:3]
    hk, wk = attention.key_grid[1:]
    sy, sx = attention.key_stride[1:]
    extent = (-0.5, wk * sx - 0.5, hk * sy - 0.5, -0.5)  # key cells placed over the pixels they cover
    count = len(panel_frame)
    # panels keep the frames' aspect at a readable height: wide footage gets wide panels, not thin strips
    panel_width = PANEL_HEIGHT * min(max(w / h, 0.5), 4.0)
    fig, axes = plt.subplots(1, count, figsize=(panel_width * count + 0.8, PANEL_HEIGHT + 0.3), squeeze=False)
    ax_of = {}
    image = None
    for ax, (cell, frame) in zip(axes[0], panel_frame.items()):
        ax.imshow(frames[frame], interpolation="nearest")
        image = ax.imshow(heat[cell], cmap=cmap, norm=norm, alpha=0.55, extent=extent, interpolation="nearest")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(f"frame {frame}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax_of[cell] = ax
    return fig, ax_of, image


def _outline_boxes(
    ax_of: dict,
    panel_frame: dict[int, int],
    box_list: Sequence[tuple[int, ...]],
    labels: Sequence[str],
    attention: BlockAttention,
) -> list[tuple[int, ...]]:
    """Outlines and names each box on the panel that shows its frame; returns the boxes drawn."""
    from matplotlib.patches import Rectangle

    drawn = []
    for i, (box, label) in enumerate(zip(box_list, labels)):
        frame, y0, x0, y1, x1 = box
        cell = _key_cell(attention, frame)
        ax = ax_of.get(cell)
        if ax is None or panel_frame[cell] != frame:
            continue
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
        ax.text(x0 - 0.5, y0 - 1.0, label, color=colour, fontsize=8, va="bottom")
        drawn.append(box)
    return drawn


def _outline_strongest_key(ax_of: dict, heat: np.ndarray, attention: BlockAttention) -> tuple[float, ...] | None:
    """A dashed outline around the query's strongest key cell (largest |weight|) on its panel; its centre, or None
    when that panel is not drawn."""
    from matplotlib.patches import Rectangle

    t, y, x = np.unravel_index(int(np.abs(heat).argmax()), heat.shape)  # heat: (Tk, Hk, Wk)
    ax = ax_of.get(int(t))
    if ax is None:
        return None
    sy, sx = attention.key_stride[1:]
    ax.add_patch(
        Rectangle((x * sx - 0.5, y * sy - 0.5), sx, sy, fill=False, edgecolor=KEY_COLOUR, linewidth=1.5, linestyle="--")
    )
    index = (int(t) * heat.shape[1] + int(y)) * heat.shape[2] + int(x)
    return tuple(attention.key_coords[index].tolist())


def _draw_arrows(
    fig, ax_of: dict, attention: BlockAttention, pairs: Sequence[tuple[int, int, float]], signed: bool
) -> None:
    """An arrow from each pair's query to its key, across panels, as thick as its weight is strong."""
    from matplotlib.patches import ConnectionPatch

    strongest = max(abs(p[2]) for p in pairs) or 1.0
    for qi, kj, weight in pairs:
        qc = attention.query_coords[qi].tolist()
        kc = attention.key_coords[kj].tolist()
        q_ax, k_ax = ax_of.get(_key_cell(attention, qc[0])), ax_of.get(_key_cell(attention, kc[0]))
        if q_ax is None or k_ax is None:
            continue
        colour = "tab:red" if (not signed or weight >= 0) else "tab:blue"
        arrow = ConnectionPatch(
            xyA=(qc[2], qc[1]),
            coordsA=q_ax.transData,
            xyB=(kc[2], kc[1]),
            coordsB=k_ax.transData,
            arrowstyle="-|>",
            color=colour,
            linewidth=0.6 + 2.0 * abs(weight) / strongest,
            alpha=0.85,
            mutation_scale=10,
        )
        fig.add_artist(arrow)


def _mark_query(ax, q_coords: Sequence[float]) -> None:
    """A ring around the query's cell centre."""
    ax.plot(
        [q_coords[2]],
        [q_coords[1]],
        marker="o",
        markersize=7,
        markerfacecolor="none",
        markeredgecolor=QUERY_COLOUR,
        markeredgewidth=2,
    )


def _default_title(
    attention: BlockAttention,
    query: Sequence[float] | None,
    q_coords: Sequence[float],
    pairs: Sequence[tuple[int, int, float]],
) -> str:
    where = "query" if query is not None else "strongest query"
    return (
        f"{attention.name} ({attention.mode}): {where} at t={q_coords[0]:.1f}, y={q_coords[1]:.1f}, "
        f"x={q_coords[2]:.1f}; top {len(pairs)} pairs"
    )


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
            raise ValueError(
                f"box {tuple(row)} (frame, y0, x0, y1, x1; end-exclusive) does not lie in a clip of "
                f"{t} frames of {h}x{w} pixels"
            )
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
