"""Seeing what non-local blocks attend to: capture their weights in input coordinates, draw them, and test
whether a block looks from one known object to another."""

from __future__ import annotations

from .capture import BlockAttention, capture_attention, cell_centres, find_nonlocal_blocks, resolve_block_names
from .objects import ObjectHits, attention_hit_rate, attention_hits, hits_from_attention, render_object_attention
from .render import frames_for_display, render_attention

__all__ = [
    "BlockAttention",
    "capture_attention",
    "cell_centres",
    "find_nonlocal_blocks",
    "frames_for_display",
    "render_attention",
    "resolve_block_names",
    "ObjectHits",
    "attention_hit_rate",
    "attention_hits",
    "hits_from_attention",
    "render_object_attention",
]
