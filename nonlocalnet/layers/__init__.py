"""Layers: the non-local operation and what is built from it. Nothing here imports from models or above."""

from __future__ import annotations

from .nonlocal_block import (
    BLOCK_DEFAULTS,
    PAPER_VIDEO_OPTIONS,
    ChannelLayerNorm,
    NonLocal1d,
    NonLocal2d,
    NonLocal3d,
    NonLocalBlock,
    find_nonlocal_blocks,
    init_inserted_blocks,
)
from .pairwise import IMPLS, IMPLS_BY_MODE, MODES, set_memory_budget

__all__ = [
    "NonLocalBlock",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "ChannelLayerNorm",
    "MODES",
    "IMPLS",
    "IMPLS_BY_MODE",
    "find_nonlocal_blocks",
    "init_inserted_blocks",
    "BLOCK_DEFAULTS",
    "PAPER_VIDEO_OPTIONS",
    "set_memory_budget",
]
