"""The region of its frames a clip keeps, as every decoder takes it: a function of the frame size giving the rows
and columns to keep (a column step of -1 mirrors), and the helpers that check it and cut frames by it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Region = Callable[[int, int], "tuple[slice, slice]"]


def region_slices(region: Region, height: int, width: int) -> tuple[slice, slice]:
    """What ``region`` gives for frames of ``height`` x ``width``, checked: columns step 1 or -1."""
    rows, columns = region(height, width)
    if columns.step not in (None, 1, -1):
        raise ValueError(f"a region's columns must have step 1 or -1; got {columns}")
    return rows, columns


def forwards(columns: slice, width: int) -> tuple[slice, bool]:
    """``columns`` (as :func:`region_slices` checked it) as a forward slice, and whether it mirrors (step -1)."""
    if columns.step != -1:
        return columns, False
    start, stop, _ = columns.indices(width)
    return slice(stop + 1, start + 1), True


def mirrored(frames: np.ndarray) -> np.ndarray:
    """(..., h, w, 3) frames mirrored left to right, a contiguous copy, by torch: NumPy's copy of packed RGB
    pixels through a negative stride takes ten times as long."""
    return torch.from_numpy(frames).flip(-2).numpy()


def take(frames: np.ndarray, rows: slice, columns: slice) -> np.ndarray:
    """``frames[..., rows, columns, :]`` of (..., H, W, 3) frames as a contiguous copy (``columns`` as
    :func:`region_slices` checked it)."""
    columns, mirror = forwards(columns, frames.shape[-2])
    part = np.ascontiguousarray(frames[..., rows, columns, :])
    return mirrored(part) if mirror else part
