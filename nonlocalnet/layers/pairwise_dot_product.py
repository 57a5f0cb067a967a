"""Exact fast path for the dot-product instantiation, by associativity.

    y = (s/M) (q kᵀ) v = q ((s/M) kᵀ v)

(kᵀ v) is a Cq x Cv matrix, so the time is O((N + M) Cq Cv) instead of O(N M (Cq + Cv)), and no N x M matrix
is ever formed. It wins whenever the number of positions exceeds the channel width (long clips, large maps).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dot_product_linear(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """(s/M) q (kᵀ v); q: (B, N, Cq), k: (B, M, Cq), v: (B, M, Cv) -> (B, N, Cv)."""
    m = k.shape[1]
    # scaling k by s/M first keeps the Cq x Cv sum a mean: no growth with M (matters in low precision)
    context = torch.matmul((k * (scale / m)).transpose(1, 2), v)  # (B, Cq, M) @ (B, M, Cv) -> (B, Cq, Cv)
    return torch.matmul(q, context)  # (B, N, Cq) @ (B, Cq, Cv) -> (B, N, Cv)


def dot_product_linear_is_cheaper(n: int, m: int, cq: int, cv: int) -> bool:
    """Whether the associative order does fewer multiply-adds than the dense one."""
    return (n + m) * cq * cv < n * m * (cq + cv)
