"""One definition of the non-local maths, several execution paths: which path runs for which mode.

| mode              | exact paths          | "auto" picks (:func:`resolve_impl`)                            |
|-------------------|----------------------|-----------------------------------------------------------------|
| gaussian          | dense, sdpa, chunked | dense where it fits the memory budget (on a CPU up to 2^26      |
|                   |                      | weights); else chunked                                          |
| embedded_gaussian | dense, sdpa, chunked | GPU: dense (float32) where it fits, else sdpa; CPU: dense where |
|                   |                      | it fits up to 2^25 weights, else chunked, sdpa on large ones    |
| dot_product       | dense, linear        | the one doing fewer multiply-adds (dense only where it fits)    |
| concatenation     | dense, sorted        | sorted                                                          |
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .pairwise_concatenation import concatenation_sorted
from .pairwise_dense import concatenation_dense, dot_product_dense, softmax_attention_dense
from .pairwise_dot_product import dot_product_linear, dot_product_linear_is_cheaper
from .pairwise_kept import dot_product_kept, softmax_attention_kept
from .pairwise_softmax import no_autocast, softmax_attention_chunked, softmax_attention_sdpa

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
IMPLS = ("auto", "dense", "sdpa", "chunked", "linear", "sorted")
HALF = (torch.float16, torch.bfloat16)
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


# --- the planner: which exact path "auto" runs ----------------------------------------------------------------
# The constants below follow benchmarks/block.py's measurements (docs/benchmarks.md has the tables, with the
# command, machine and torch version; docs/block.md the reasons). On a CPU in float32 the embedded gaussian's
# chunked path, which with a single chunk is the dense computation with its weights recomputed instead of kept,
# keeps up with the dense one until SDPA's flash kernel overtakes both on large problems; the gaussian's chunked
# path recomputes C-channel logits, so its dense path is the faster until the matrix grows large. On a GPU in
# float32 one large GEMM on the whole N x M matrix is the fastest (the lean paths measured slower than mmcv's
# dense block there), so "auto" keeps the matrix wherever it fits the memory budget.

# softmax modes on a CPU: the dense path up to this many weights (B x N x M) per call where it fits the budget
# (its own backward, layers/pairwise_kept.py, outran the chunked path's recompute at res3 and res4); beyond, or
# where it does not fit, the embedded gaussian on the chunked path up to CPU_CHUNKED_MAX_WEIGHTS, on SDPA beyond
# (whose flash kernel is the fastest at res3 of a 128-frame clip, 3.9e7 weights)
CPU_DENSE_MAX_WEIGHTS = 1 << 25
CPU_CHUNKED_MAX_WEIGHTS = 1 << 25
# the gaussian on a CPU: the dense path up to this many weights where it fits the budget (its raw C-channel logits
# cost the chunked path a C-channel recompute in the backward pass), the chunked path beyond
CPU_GAUSSIAN_DENSE_MAX_WEIGHTS = 1 << 26
# the dense path's memory: the weights kept for the backward pass plus the logits they are computed from
DENSE_BYTES_PER_WEIGHT = 2 * 4
# the default memory budget of the dense path: this share of the device's total memory
MEMORY_BUDGET_SHARE = 1 / 8

_memory_budget: int | None = None


def set_memory_budget(nbytes: int | None) -> None:
    """Sets the memory the dense path's N x M matrices may take, for every block without a ``memory_budget`` of its
    own; None restores the default, :data:`MEMORY_BUDGET_SHARE` of the device's total memory (total, not free:
    the choice must not change with what else runs, or a resumed run could take another path)."""
    global _memory_budget
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        raise ValueError(f"the memory budget is a number of bytes (an int >= 0) or None; got {nbytes!r}")
    _memory_budget = nbytes


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume a 16 GB machine
        return 16 << 30


# total memory per device, the CPU's read once here: torch.compile's tracer cannot follow os.sysconf
_TOTAL_MEMORY: dict[tuple[str, int | None], int] = {("cpu", None): _physical_memory()}


def _total_memory(device_type: str, index: int | None) -> int:
    key = (device_type, index)
    if key not in _TOTAL_MEMORY:
        _TOTAL_MEMORY[key] = torch.cuda.get_device_properties(index or 0).total_memory
    return _TOTAL_MEMORY[key]


def memory_budget(device: torch.device | str = "cpu", block_budget: int | None = None) -> int:
    """Bytes the dense path's matrices may take on ``device``: ``block_budget`` if given, else the global setting
    (:func:`set_memory_budget`), else :data:`MEMORY_BUDGET_SHARE` of the device's total memory."""
    if block_budget is not None:
        return block_budget
    if _memory_budget is not None:
        return _memory_budget
    device = torch.device(device)
    if device.type != "cuda":  # the CPU's, also for the meta tensors the cost model plans on
        return int(_total_memory("cpu", None) * MEMORY_BUDGET_SHARE)
    return int(_total_memory("cuda", device.index) * MEMORY_BUDGET_SHARE)


def resolve_impl(
    mode: str,
    impl: str,
    n: int,
    m: int,
    cq: int,
    cv: int,
    *,
    batch: int = 1,
    device_type: str = "cpu",
    dtype: torch.dtype = torch.float32,
    budget: int | None = None,
) -> str:
    """The path that runs: ``impl`` itself, or the choice of "auto" for a call on ``batch`` (folded) problems of N
    queries and M keys on this kind of device in this dtype, the dense N x M path allowed only where its matrices
    fit ``budget`` bytes (None: unlimited). The same sizes always get the same path, so a resumed run computes
    what the uninterrupted one did.

    - dot product: the dense path where it fits and does fewer multiply-adds than ``linear``'s associative order,
      else ``linear``;
    - concatenation: ``sorted`` (the dense path builds an N x M x 2C' tensor);
    - the embedded gaussian in half precision (under autocast): SDPA, whose fused kernels take it;
    - softmax modes on a GPU: the dense path where it fits the budget (one large GEMM is the fastest there); on a
      CPU the same up to :data:`CPU_DENSE_MAX_WEIGHTS` weights (its own backward outruns the lean paths' recompute
      there); else the lean paths below;
    - the gaussian (raw C-channel queries against C' = C/2 values) on a CPU: the dense path up to
      :data:`CPU_GAUSSIAN_DENSE_MAX_WEIGHTS` weights where it fits, else the chunked path, which pads nothing
      (SDPA's fused kernels want one head size, so the values would be zero-padded to C channels) and does fewer
      multiply-adds than SDPA; the same on a GPU where the dense matrix does not fit;
    - the embedded gaussian on a CPU beyond that or where the dense matrix does not fit, and on a GPU where it
      does not fit: the chunked path up to :data:`CPU_CHUNKED_MAX_WEIGHTS` weights on a CPU, SDPA beyond (and on
      a GPU).
    """
    if impl != "auto":
        return impl
    weights = batch * n * m
    dense_fits = budget is None or weights * DENSE_BYTES_PER_WEIGHT <= budget
    if mode == "dot_product":
        return "dense" if dense_fits and not dot_product_linear_is_cheaper(n, m, cq, cv) else "linear"
    if mode == "concatenation":
        return "sorted"
    if dtype in HALF and cq <= cv:
        return "sdpa"  # the fused kernels take half precision (the precision table below)
    if dense_fits and (device_type == "cuda" or weights <= CPU_DENSE_MAX_WEIGHTS):
        return "dense"
    if cq > cv:
        return "dense" if dense_fits and weights <= CPU_GAUSSIAN_DENSE_MAX_WEIGHTS else "chunked"
    if device_type == "cpu" and weights <= CPU_CHUNKED_MAX_WEIGHTS:
        return "chunked"
    return "sdpa"


def plan_impl(mode: str, q: Tensor, k: Tensor, v: Tensor, budget: int | None = None) -> str:
    """:func:`resolve_impl`'s "auto" choice for these inputs (B, N, Cq), (B, M, Cq), (B, M, Cv), on their device and
    in the dtype the pairwise step will run in, the dense path within :func:`memory_budget` (``budget`` if given)."""
    return resolve_impl(
        mode,
        "auto",
        q.shape[1],
        k.shape[1],
        q.shape[2],
        v.shape[2],
        batch=q.shape[0],
        device_type="cuda" if q.device.type == "cuda" else "cpu",
        dtype=lowest_precision(q, k, v),
        budget=memory_budget(q.device, budget),
    )


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
        if mode == "dot_product":
            return dot_product_kept(q, k, v, scale)
        if mode != "concatenation":
            return softmax_attention_kept(q, k, v, scale)
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
        impl: a path or "auto" (resolved with :func:`plan_impl`).
        return_attention: compute densely and also return the weights (B, N, M).

    Returns:
        (y (B, N, Cv), weights or None).
    """
    if return_attention:
        impl = "dense"
    elif impl == "auto":
        impl = plan_impl(mode, q, k, v)
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
