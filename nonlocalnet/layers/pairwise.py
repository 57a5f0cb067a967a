"""One definition of the non-local maths, several execution paths: which path runs for which mode.

| mode              | exact paths                        | "auto" picks                                   |
|-------------------|------------------------------------|------------------------------------------------|
| gaussian          | dense, sdpa, chunked               | chunked (no padding, fewer multiply-adds)       |
| embedded_gaussian | dense, sdpa, chunked               | sdpa                                           |
| dot_product       | dense, linear                      | whichever does fewer multiply-adds             |
| concatenation     | dense, sorted                      | sorted                                         |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .pairwise_concatenation import concatenation_sorted
from .pairwise_dense import concatenation_dense, dot_product_dense, softmax_attention_dense
from .pairwise_dot_product import dot_product_linear, dot_product_linear_is_cheaper
from .pairwise_softmax import no_autocast, softmax_attention_chunked, softmax_attention_sdpa

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
IMPLS = ("auto", "dense", "sdpa", "chunked", "linear", "sorted")
IMPLS_BY_MODE = {
    "gaussian": ("dense", "sdpa", "chunked"),
    "embedded_gaussian": ("dense", "sdpa", "chunked"),
    "dot_product": ("dense", "linear"),
    "concatenation": ("dense", "sorted"),
}


def check_mode_impl(mode: str, impl: str) -> None:
    """Raises ValueError naming the problem if ``mode`` or ``impl`` is unknown or they do not go together."""
    if mode not in MODES:
        raise ValueError(f"unknown non-local mode {mode!r}; expected one of {', '.join(MODES)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown non-local impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl != "auto" and impl not in IMPLS_BY_MODE[mode]:
        raise ValueError(
            f"impl {impl!r} does not compute mode {mode!r}; its paths are {', '.join(IMPLS_BY_MODE[mode])} (or 'auto')"
        )


def resolve_impl(mode: str, impl: str, n: int, m: int, cq: int, cv: int) -> str:
    """The path that runs: ``impl`` itself, or the choice of "auto" for these sizes (the same on every device:
    what differs per device is the chunked path's chunk size, see pairwise_softmax).

    Softmax modes use SDPA, except when the query/key channels exceed the value channels (the gaussian mode: raw
    C-channel features against C' = C/2 values): SDPA's fused kernels want one head size, so the values would be
    zero-padded to C channels, and the chunked path, which pads nothing and keeps no N x M matrix for the backward
    pass either, does fewer multiply-adds. Those raw features also keep the pairwise step in float32 (see the
    precision table below), where SDPA has no fused kernel to gain from; benchmarks/block.py compares the paths.
    """
    if impl != "auto":
        return impl
    if mode == "dot_product":
        return "linear" if dot_product_linear_is_cheaper(n, m, cq, cv) else "dense"
    if mode == "concatenation":
        return "sorted"
    if cq > cv:
        return "chunked"
    return "sdpa"


def dense_pairwise(
    q: Tensor, k: Tensor, v: Tensor, mode: str, scale: float, concat_project: nn.Sequential | None = None
) -> tuple[Tensor, Tensor]:
    """The reference: y (B, N, Cv) and the normalised weights f/C(x) (B, N, M)."""
    if mode == "dot_product":
        return dot_product_dense(q, k, v, scale)
    if mode == "concatenation":
        assert concat_project is not None
        return concatenation_dense(q, k, v, scale, concat_project)
    return softmax_attention_dense(q, k, v, scale)


def pairwise_macs(mode: str, batch: int, n: int, m: int, cq: int, cv: int) -> int:
    """Multiply-adds of the pairwise step by the paper's definition, whichever exact path computes it.

    Every pair (i, j) costs f(q_i, k_j) (a Cq-channel dot product; w_fᵀ[q_i, k_j] over 2Cq channels for the
    concatenation) plus its share of Σ_j f v_j (Cv): B·N·M·(Cq + Cv), or B·N·M·(2Cq + Cv). This is what the
    dense reference computes and what the paper's FLOP figures count; the fast paths compute the same function.
    """
    return batch * n * m * ((2 * cq if mode == "concatenation" else cq) + cv)


class PairwiseCount:
    """Multiply-adds reported by the pairwise steps run inside :func:`counting_pairwise`."""

    def __init__(self) -> None:
        self.macs = 0


_counting: PairwiseCount | None = None


@contextlib.contextmanager
def counting_pairwise(count: PairwiseCount | None = None) -> Iterator[PairwiseCount]:
    """Within this context :func:`pairwise` adds :func:`pairwise_macs` to ``count`` instead of computing (y is
    zeros).

    The cost counter uses it so that a network's multiply-adds do not depend on which attention kernels a torch
    version's FLOP counter happens to know (SDPA's variants are counted by some versions and not by others).
    """
    global _counting
    previous, _counting = _counting, count or PairwiseCount()
    try:
        yield _counting
    finally:
        _counting = previous


def pairwise(
    q: Tensor, k: Tensor, v: Tensor, mode: str, scale: float, impl: str, concat_project: nn.Sequential | None = None
) -> Tensor:
    """y_i = 1/C(x) Σ_j f(q_i, k_j) v_j over folded sequences, by the path ``impl`` (already resolved).

    Args:
        q: queries (B, N, Cq); k: keys (B, M, Cq); v: values (B, M, Cv).
        mode: one of :data:`MODES`.
        scale: s multiplying the pairwise term before f's non-linearity (1.0 = the paper).
        impl: a concrete path from :data:`IMPLS_BY_MODE` (not "auto").
        concat_project: the block's w_f module, for the concatenation mode.

    Returns:
        (B, N, Cv).
    """
    if _counting is not None:
        _counting.macs += pairwise_macs(mode, q.shape[0], q.shape[1], k.shape[1], q.shape[2], v.shape[2])
        return v.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    if impl == "dense":
        return dense_pairwise(q, k, v, mode, scale, concat_project)[0]
    if impl == "sdpa":
        return softmax_attention_sdpa(q, k, v, scale)
    if impl == "chunked":
        return softmax_attention_chunked(q, k, v, scale)
    if impl == "linear":
        return dot_product_linear(q, k, v, scale)
    if impl == "sorted":
        assert concat_project is not None
        weight = concat_project[0].weight.flatten()  # (1, 2Cq, 1, 1) -> (2Cq,)
        cq = q.shape[-1]
        return concatenation_sorted(q, k, v, scale, weight[:cq], weight[cq:])
    raise ValueError(f"impl {impl!r} is not a concrete path")


# --- precision -------------------------------------------------------------------------------------------------
# Under autocast the projections run in half precision; what the pairwise step runs in is decided here, per path:
#
# | mode / path                        | float16 inputs | bfloat16 inputs | why                                        |
# |------------------------------------|----------------|-----------------|--------------------------------------------|
# | embedded gaussian, sdpa            | float16        | bfloat16        | the fused kernels keep qᵀk and the running |
# |                                    |                |                 | softmax max / sum in float32 (online       |
# |                                    |                |                 | softmax): nothing overflows, and the flash |
# |                                    |                |                 | / memory-efficient kernels need half       |
# | embedded gaussian, dense / chunked | float32        | float32         | qᵀk is materialised: in float16 it         |
# |                                    |                |                 | overflows (65504), in bfloat16 a logit of  |
# |                                    |                |                 | 40 is rounded by 0.125, a 12% weight error |
# | gaussian, every path               | float32        | float32         | raw C-channel features: logits of hundreds |
# | dot product, concatenation         | float32        | bfloat16        | sums over M keys overflow float16; matmuls |
# |                                    |                |                 | accumulate in float32, bfloat16's range is |
# |                                    |                |                 | float32's                                  |
HALF_PRECISION_PATHS = {("embedded_gaussian", "sdpa")}
HALF = (torch.float16, torch.bfloat16)


def pairwise_dtype(mode: str, impl: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the pairwise step runs in on the path ``impl`` (resolved) for inputs of ``dtype`` (see the table
    above): half precision stays where the path is exact enough in it, else float32."""
    if dtype not in HALF or (mode, impl) in HALF_PRECISION_PATHS:
        return dtype
    if dtype == torch.bfloat16 and mode in ("dot_product", "concatenation"):
        return dtype
    return torch.float32


def lowest_precision(*tensors: Tensor) -> torch.dtype:
    """The smallest floating dtype among ``tensors`` (what autocast handed the pairwise step)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.element_size() < torch.empty((), dtype=dtype).element_size():
            dtype = t.dtype
    return dtype


def pairwise_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: str,
    scale: float,
    impl: str = "auto",
    concat_project: nn.Sequential | None = None,
    return_attention: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The pairwise step as a layer runs it: the path chosen for these sizes and this device, autocast off and
    the inputs in :func:`pairwise_dtype`'s dtype; y is returned in the values' dtype.

    Args:
        q, k, v: (B, N, Cq), (B, M, Cq), (B, M, Cv), as the projections returned them (half under autocast).
        mode, scale, concat_project: as :func:`pairwise`.
        impl: a path or "auto" (resolved with :func:`resolve_impl`).
        return_attention: compute densely and also return the weights (B, N, M).

    Returns:
        (y (B, N, Cv), weights or None).
    """
    impl = "dense" if return_attention else resolve_impl(mode, impl, q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    dtype = pairwise_dtype(mode, impl, lowest_precision(q, k, v))
    out_dtype = v.dtype
    with no_autocast(q.device.type):
        keys_are_queries = k is q  # and stay so: the chunked path uses the symmetry of q qᵀ
        q, v = q.to(dtype), v.to(dtype)
        k = q if keys_are_queries else k.to(dtype)
        if return_attention:
            y, weights = dense_pairwise(q, k, v, mode, scale, concat_project)
            return y.to(out_dtype), weights
        return pairwise(q, k, v, mode, scale, impl, concat_project).to(out_dtype), None
