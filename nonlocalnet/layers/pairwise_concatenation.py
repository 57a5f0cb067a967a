"""Exact fast path for the concatenation instantiation, by sorting.

    f(x_i, x̂_j) = ReLU(s * w_fᵀ [q_i, k_j]) = ReLU(a_i + b_j),   a_i = s * w_qᵀ q_i,  b_j = s * w_kᵀ k_j

(w_f = [w_q, w_k] splits over the concatenation, and s > 0 moves inside). So the pair (i, j) contributes
exactly when b_j > -a_i, and then

    y_i = 1/M * sum_{j: b_j > -a_i} (a_i + b_j) v_j = 1/M * (a_i * P(c_i) + Q(c_i))

where, with the keys sorted by b in descending order, P(c) and Q(c) are the prefix sums of v_j and b_j v_j over
the first c keys and c_i = #{j: b_j > -a_i} is found by binary search. Time O((N + M) log M + (N + M) Cv),
memory O((N + M) Cv): no N x M matrix, no N x M x 2Cq pair tensor. Gradients flow through the sort, the prefix
sums and the gathers, and equal ReLU's (sub)gradient everywhere except exactly on ties b_j = -a_i.

The counts c_i come from one joint sort of keys and queries rather than ``torch.searchsorted``, which ONNX
cannot express; a tie b_j = -a_i may count either way, since its term (a_i + b_j) v_j is zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def concatenation_sorted(q: Tensor, k: Tensor, v: Tensor, scale: float, w_q: Tensor, w_k: Tensor) -> Tensor:
    """y_i = 1/M Σ_j ReLU(s (w_qᵀ q_i + w_kᵀ k_j)) v_j.

    Args:
        q: queries (B, N, Cq).
        k: keys (B, M, Cq).
        v: values (B, M, Cv).
        scale: s > 0.
        w_q: the first half of w_f, (Cq,), applied to queries.
        w_k: the second half of w_f, (Cq,), applied to keys.

    Returns:
        y: (B, N, Cv), in the dtype of v.
    """
    out_dtype = v.dtype
    # prefix sums lose accuracy fast in half precision: this path always sums in float32 (or float64)
    dtype = torch.promote_types(v.dtype, torch.float32)
    b, m, cv = v.shape
    a = torch.matmul(q.to(dtype), w_q.to(dtype)) * scale  # (B, N, Cq) @ (Cq,) -> (B, N)
    key_term = torch.matmul(k.to(dtype), w_k.to(dtype)) * scale  # (B, M, Cq) @ (Cq,) -> (B, M)
    key_sorted, order = torch.sort(key_term, dim=1, descending=True)  # (B, M) both
    v_sorted = torch.gather(v.to(dtype), 1, order.unsqueeze(-1).expand(b, m, cv))  # (B, M, Cv)
    zeros = v_sorted.new_zeros(b, 1, cv)
    prefix_v = torch.cat([zeros, torch.cumsum(v_sorted, dim=1)], dim=1)  # (B, M+1, Cv): P(c)
    prefix_bv = torch.cat([zeros, torch.cumsum(key_sorted.unsqueeze(-1) * v_sorted, dim=1)], dim=1)  # Q(c)
    count = _count_keys_below(-key_sorted, a)  # (B, N): c_i = #{j: -b_j < a_i} = #{j: b_j > -a_i}
    index = count.unsqueeze(-1).expand(b, count.shape[1], cv)  # (B, N, Cv)
    y = a.unsqueeze(-1) * torch.gather(prefix_v, 1, index) + torch.gather(prefix_bv, 1, index)  # (B, N, Cv)
    return (y / m).to(out_dtype)


def _count_keys_below(keys: Tensor, queries: Tensor) -> Tensor:
    """For each query value, how many key values lie below it (ties either way).

    Args:
        keys: (B, M) key values.
        queries: (B, N) query values.

    Returns:
        (B, N) int64 counts.
    """
    b, m = keys.shape
    merged = torch.cat([keys, queries], dim=1)  # (B, M+N)
    order = torch.argsort(merged, dim=1)  # (B, M+N): sorted position -> element
    is_key = (order < m).to(torch.int64)  # (B, M+N): is the element at this sorted position a key?
    keys_so_far = torch.cumsum(is_key, dim=1)  # (B, M+N): keys at or before each sorted position
    positions = torch.arange(merged.shape[1], device=keys.device).expand(b, -1)
    rank = torch.zeros_like(order).scatter(1, order, positions)  # (B, M+N): element -> sorted position
    return torch.gather(keys_so_far, 1, rank[:, m:])  # (B, N): keys before each query (it is not a key)
