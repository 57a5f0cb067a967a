"""Which keys each query sees: the extents of Table 2(d) and temporal groups, as batch folding.

A non-local block on a video attends over all T*H*W positions ("spacetime"). The paper's ablations restrict
that to the same frame ("space") or the same spatial position across frames ("time"), and the official code
saves memory on long clips by attending only within groups of k consecutive frames. Each of these is exact
block-diagonal attention, so it is computed by folding the restricted axes into the batch: every folded batch
entry is one independent attention problem with its own queries and keys.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# Table 2(d): the keys a query sees, the ``extent=`` option of the block (the one definition; models import it)
EXTENTS = ("spacetime", "space", "time")


class Folding(NamedTuple):
    """How a (B, C, *spatial) map becomes a batch of (B', L, C) position sequences.

    Attributes:
        extent: "spacetime", "space" or "time".
        groups: number of temporal groups G for "spacetime" (1 = all frames together; the block's
            ``temporal_groups=k`` frames per group gives G = T / k); ignored otherwise.
    """

    extent: str = "spacetime"
    groups: int = 1


def fold_positions(p: Tensor, folding: Folding, spatial: tuple[int, ...]) -> Tensor:
    """Turns a sequence of positions into independent sequences, one per attention problem.

    Args:
        p: (B, N, C) positions of a map of spatial size ``spatial``, flattened in (t, h, w) order; for
            "space"/"time" or groups > 1 the map must be a video (T, H, W).
        folding: the extent and temporal groups.
        spatial: the map's spatial size (N = its product).

    Returns:
        (B * F, L, C) where F is the number of independent problems per batch element and L their length.
        Spacetime groups and "space" keep consecutive positions together: a view of a contiguous ``p``.
    """
    b, n, c = p.shape
    if folding.extent == "time":
        tt = spatial[0]
        # (B, T, H*W, C) -> (B, H*W, T, C) -> (B*H*W, T, C): one sequence per spatial position
        return p.reshape(b, tt, n // tt, c).transpose(1, 2).reshape(b * (n // tt), tt, c)
    groups = _temporal_groups(spatial, folding)
    if groups == 1:
        return p
    # (B, G * T/G*H*W, C) -> (B*G, T/G*H*W, C): frames are the slowest axis, so each group is consecutive
    return p.reshape(b * groups, n // groups, c)


def unfold_positions(y: Tensor, folding: Folding, batch: int, spatial: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`fold_positions` for the query side: (B * F, L, C) -> (B, N, C)."""
    c = y.shape[-1]
    n = math.prod(spatial)
    if folding.extent == "time":
        tt = spatial[0]
        # (B*H*W, T, C) -> (B, H*W, T, C) -> (B, T, H*W, C) -> (B, N, C)
        return y.reshape(batch, n // tt, tt, c).transpose(1, 2).reshape(batch, n, c)
    return y.reshape(batch, n, c)


def to_positions(t: Tensor) -> Tensor:
    """(B, C, *spatial) map -> (B, N, C) sequence of positions in (t, h, w) order, a view."""
    return t.flatten(2).transpose(1, 2)


def to_map(p: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_positions`: (B, N, C) -> (B, C, *spatial), a (channels-last strided) view."""
    return p.transpose(1, 2).unflatten(2, spatial)


def fold(t: Tensor, folding: Folding) -> Tensor:
    """:func:`fold_positions` of a (B, C, *spatial) feature map: (B * F, L, C)."""
    return fold_positions(to_positions(t), folding, tuple(t.shape[2:]))


def scatter_attention(
    attn: Tensor, folding: Folding, batch: int, query_spatial: tuple[int, ...], key_spatial: tuple[int, ...]
) -> Tensor:
    """Places folded attention blocks into the full (B, N, M) matrix, zeros outside the extent.

    Args:
        attn: (B * F, L, K) weights of the folded problems.
        folding: the folding used for queries and keys.
        batch: B.
        query_spatial: spatial size of the query map (N = product).
        key_spatial: spatial size of the key map (M = product).

    Returns:
        (B, N, M) weights in flattened (t, h, w) order of queries and keys.
    """
    n = math.prod(query_spatial)
    m = math.prod(key_spatial)
    if attn.shape[0] == batch and attn.shape[1] == n and attn.shape[2] == m:
        return attn
    # fold position indices exactly like the features: (1, 1, *S) -> (F, L, 1) -> (F, L)
    q_index = fold(torch.arange(n, device=attn.device).view(1, 1, *query_spatial), folding)[..., 0]
    k_index = fold(torch.arange(m, device=attn.device).view(1, 1, *key_spatial), folding)[..., 0]
    problems = q_index.shape[0]
    full = attn.new_zeros(batch, n, m)
    # (B*F, L, K) -> (B, F, L, K), written at rows q_index[f] and columns k_index[f] of each batch element
    full[:, q_index[:, :, None], k_index[:, None, :]] = attn.reshape(batch, problems, *attn.shape[1:])
    return full


def check_folding(folding: Folding, query_spatial: tuple[int, ...], key_spatial: tuple[int, ...]) -> None:
    """Raises ValueError if the queries and keys cannot be folded the same way."""
    if folding.extent == "spacetime" and folding.groups == 1:
        return
    if len(query_spatial) != 3 or len(key_spatial) != 3:
        raise ValueError(
            f"extent={folding.extent!r} with temporal_groups={folding.groups} needs video input "
            f"(B, C, T, H, W); got spatial size {tuple(query_spatial)}"
        )
    tq, tk = query_spatial[0], key_spatial[0]
    if folding.extent == "time":
        if tuple(query_spatial[1:]) != tuple(key_spatial[1:]):
            raise ValueError(
                f"extent='time' attends to the same spatial position across frames, so keys must keep the "
                f"query's spatial size; got queries {tuple(query_spatial)} and keys {tuple(key_spatial)} "
                f"(use no spatial subsampling with extent='time')"
            )
        return
    if folding.extent == "space":
        if tq != tk:
            raise ValueError(
                f"extent='space' attends within each frame, so keys must keep all {tq} frames; got "
                f"{tk} (use no temporal subsampling with extent='space')"
            )
        return
    g = folding.groups
    if tq % g or tk % g:
        raise ValueError(
            f"temporal groups: queries split into {g} groups of {tq // g} frames, but the keys' "
            f"{tk} frames cannot be split into {g} equal groups"
        )


def _temporal_groups(spatial: tuple[int, ...], folding: Folding) -> int:
    if folding.extent == "space":
        return spatial[0]
    return folding.groups
