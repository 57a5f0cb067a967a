"""The dense reference of the non-local operation: the paper's formula, with the full N x M pairwise matrix.

    y_i = 1/C(x) * sum_j f(x_i, x̂_j) g(x̂_j)

Every fast path in this package is tested against these functions. They are also what ``return_attention``
uses, since it needs the N x M weights anyway.

All functions take already-projected, folded sequences:
    q: (B, N, Cq) queries (θ(x_i), or x_i itself for the gaussian),
    k: (B, M, Cq) keys    (φ(x̂_j), or x̂_j itself for the gaussian),
    v: (B, M, Cv) values  (g(x̂_j)),
and return y: (B, N, Cv) together with the normalised weights f/C(x): (B, N, M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def softmax_attention_dense(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(Embedded) gaussian: f = exp(s * q_iᵀ k_j), C(x) = Σ_j f, i.e. a softmax over the keys."""
    logits = torch.matmul(q, k.transpose(1, 2))  # (B, N, Cq) @ (B, Cq, M) -> (B, N, M)
    if scale != 1.0:  # the paper's s = 1 costs no pass over the N x M logits (and none in the backward pass)
        logits = logits * scale
    weights = torch.softmax(logits, dim=-1)  # (B, N, M)
    return torch.matmul(weights, v), weights  # (B, N, M) @ (B, M, Cv) -> (B, N, Cv)


def dot_product_dense(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dot product: f = s * q_iᵀ k_j, C(x) = M (the number of key positions)."""
    weights = torch.matmul(q, k.transpose(1, 2)) * (scale / k.shape[1])  # (B, N, M)
    return torch.matmul(weights, v), weights  # (B, N, Cv)


def concatenation_dense(
    q: Tensor, k: Tensor, v: Tensor, scale: float, concat_project: nn.Sequential
) -> tuple[Tensor, Tensor]:
    """Concatenation: f = ReLU(s * w_fᵀ [q_i, k_j]), C(x) = M.

    Builds every pair [q_i, k_j] literally and applies the block's ``concat_project`` (a 1x1 conv 2Cq -> 1 then
    ReLU), as the paper writes it. Memory O(N * M * Cq): a reference, not a path for large inputs.
    """
    b, n, c = q.shape
    m = k.shape[1]
    pairs = torch.cat(
        [
            q.unsqueeze(2).expand(b, n, m, c),  # (B, N, M, Cq): q_i repeated over j
            k.unsqueeze(1).expand(b, n, m, c),
        ],  # (B, N, M, Cq): k_j repeated over i
        dim=-1,
    )  # (B, N, M, 2Cq)
    conv, relu = concat_project[0], concat_project[1]
    w_f = conv.weight.to(pairs.dtype)  # (1, 2Cq, 1, 1), in the pairwise step's dtype
    logits = F.conv2d(pairs.permute(0, 3, 1, 2), w_f).squeeze(1)  # (B, 2Cq, N, M) -> (B, 1, N, M) -> (B, N, M)
    weights = relu(logits * scale) / m  # (B, N, M)
    return torch.matmul(weights, v), weights  # (B, N, Cv)
