"""Layers: the non-local operation and what is built from it. Nothing here imports from models or above."""
from .nonlocal_block import ChannelLayerNorm, NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock, find_nonlocal_blocks
from .pairwise import IMPLS, IMPLS_BY_MODE, MODES

__all__ = ["NonLocalBlock", "NonLocal1d", "NonLocal2d", "NonLocal3d", "ChannelLayerNorm", "MODES", "IMPLS",
           "IMPLS_BY_MODE", "find_nonlocal_blocks"]
