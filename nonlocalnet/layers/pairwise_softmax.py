"""Exact fast paths for the softmax instantiations (gaussian and embedded gaussian).

Both compute softmax(s * q kᵀ) v without keeping the N x M matrix for the backward pass:
- ``sdpa``: torch's fused ``scaled_dot_product_attention`` (flash kernels on CPU and GPU), memory O(N).
- ``chunked``: queries in chunks; only the inputs and y are kept for the backward pass, where each
  chunk's weights are recomputed (flash attention's scheme, in plain matmuls), so at most one chunk's (n x M)
  weights exist at a time. Exact; needs no padding when the value channels differ from the query/key channels.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


# Largest number of attention weights one chunk may hold (per folded batch, all of it): 4 M floats = 16 MB.
CHUNK_ELEMENTS = 1 << 22


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
    :data:`CHUNK_ELEMENTS`); for the backward pass only q, k, v and y are kept, and each chunk's weights are
    recomputed, as flash attention does. No padding: the value channels Cv may
    differ from the query/key channels Cq (the gaussian's raw C-channel features against C' values)."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    b, n, _ = q.shape
    rows = max(1, min(n, chunk_elements // max(1, b * k.shape[1])))
    return _ChunkedSoftmaxAttention.apply(q, k, v, scale, rows)


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """y = softmax(s q kᵀ) v by query chunks; backward from (q, k, v, y), recomputing each chunk's weights P: dV = Pᵀ dY, dS = P ⊙ (dY Vᵀ - rowsum(dY ⊙ Y)), dQ = s dS K, dK = s dSᵀ Q."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, rows: int) -> Tensor:
        b, n, _ = q.shape
        y = v.new_empty((b, n, v.shape[-1]))
        kt = k.transpose(1, 2) * scale  # (B, Cq, M): s kᵀ, so that each chunk's logits are one matmul
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            weights = torch.bmm(q[:, chunk], kt).softmax(dim=-1)  # (B, n, M)
            torch.bmm(weights, v, out=y[:, chunk])
        ctx.save_for_backward(q, k, v, y)
        ctx.scale, ctx.rows = scale, rows
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, k, v, y = ctx.saved_tensors
        with no_autocast(q.device.type):  # a backward run inside autocast: the policy's dtype still holds
            return _chunked_backward(q, k, v, y, grad_y.to(y.dtype).contiguous(), ctx.scale, ctx.rows,
                                     ctx.needs_input_grad)


def no_autocast(device_type: str):
    """Disables autocast around the pairwise step; a no-op on devices autocast does not know (meta)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _chunked_backward(q: Tensor, k: Tensor, v: Tensor, y: Tensor, grad_y: Tensor, scale: float, rows: int,
                      needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    grad_q = torch.empty_like(q) if needs[0] else None
    grad_k = torch.zeros_like(k) if needs[1] else None
    grad_v = torch.zeros_like(v) if needs[2] else None
    delta = (grad_y * y).sum(dim=-1, keepdim=True)  # (B, N, 1): rowsum(dY ⊙ Y) = Σ_j P_ij dP_ij
    kt, vt = k.transpose(1, 2) * scale, v.transpose(1, 2)
    for start in range(0, q.shape[1], rows):
        chunk = slice(start, start + rows)
        weights = torch.bmm(q[:, chunk], kt).softmax(dim=-1)  # P (B, n, M), recomputed
        if grad_v is not None:
            grad_v.baddbmm_(weights.transpose(1, 2), grad_y[:, chunk])  # += Pᵀ dY
        # dS = P ⊙ (dP - Δ); Δ subtracted in place (as baddbmm's input it would first be expanded to n x M)
        grad_s = torch.bmm(grad_y[:, chunk], vt).sub_(delta[:, chunk]).mul_(weights)
        del weights
        if grad_q is not None:
            torch.bmm(grad_s, kt.transpose(1, 2), out=grad_q[:, chunk])  # s dS K
        if grad_k is not None:
            grad_k.baddbmm_(grad_s.transpose(1, 2), q[:, chunk], alpha=scale)
    return grad_q, grad_k, grad_v, None, None
