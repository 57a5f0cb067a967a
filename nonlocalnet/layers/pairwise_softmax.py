"""Exact fast paths for the softmax instantiations (gaussian and embedded gaussian).

Both compute softmax(s * q kᵀ) v without keeping the N x M matrix for the backward pass:
- ``sdpa``: torch's fused ``scaled_dot_product_attention`` (flash kernels on CPU and GPU), memory O(N).
- ``chunked``: queries in chunks, each chunk recomputed in the backward pass (activation checkpointing), so at
  most one chunk's (n x M) weights exist at a time. Exact, and runs where the fused kernels cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .pairwise_dense import softmax_attention_dense

# Largest number of attention weights one chunk may hold (per folded batch, all of it): 16 M floats = 64 MB.
CHUNK_ELEMENTS = 1 << 24


def softmax_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(s * q kᵀ) v via ``F.scaled_dot_product_attention``; q, k: (B, N|M, Cq), v: (B, M, Cv)."""
    # (B, L, C) -> (B, 1, L, C): one head. The fused kernels need the channel axis contiguous; folded
    # (B, C, *S) maps are channel-strided, and given those SDPA silently takes its O(N M) math fallback.
    cq, cv = q.shape[-1], v.shape[-1]
    if cv < cq:  # the fused kernels want one head size: zero value channels add nothing to y
        v = F.pad(v, (0, cq - cv))  # (B, M, Cq)
    elif cq < cv:  # zero query/key channels add nothing to qᵀk
        q, k = F.pad(q, (0, cv - cq)), F.pad(k, (0, cv - cq))
    q, k, v = (t.contiguous().unsqueeze(1) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return y.squeeze(1)[..., :cv]  # (B, 1, N, C) -> (B, N, Cv)


def softmax_attention_chunked(q: Tensor, k: Tensor, v: Tensor, scale: float,
                              chunk_elements: int | None = None) -> Tensor:
    """softmax(s * q kᵀ) v in query chunks of at most ``chunk_elements`` weights (default
    :data:`CHUNK_ELEMENTS`), each recomputed in the backward pass."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    b, n, _ = q.shape
    m = k.shape[1]
    rows = max(1, min(n, chunk_elements // max(1, b * m)))
    if rows >= n:
        return softmax_attention_dense(q, k, v, scale)[0]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outputs = []
    for start in range(0, n, rows):
        q_chunk = q[:, start:start + rows]  # (B, n, Cq)
        if needs_grad:
            outputs.append(checkpoint(_softmax_chunk, q_chunk, k, v, scale, use_reentrant=False))
        else:
            outputs.append(_softmax_chunk(q_chunk, k, v, scale))
    return torch.cat(outputs, dim=1)  # (B, N, Cv)


def _softmax_chunk(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return softmax_attention_dense(q, k, v, scale)[0]
