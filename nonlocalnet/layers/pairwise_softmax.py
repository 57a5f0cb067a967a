"""Exact fast paths for the softmax instantiations (gaussian and embedded gaussian).

Both compute softmax(s * q kᵀ) v without keeping the N x M matrix for the backward pass:
- ``sdpa``: torch's fused ``scaled_dot_product_attention`` (flash kernels on CPU and GPU), memory O(N).
- ``chunked``: queries in chunks; only the inputs and y are kept for the backward pass, where each
  chunk's weights are recomputed (flash attention's scheme, in plain matmuls), so at most one chunk's (n x M)
  weights exist at a time, in buffers reused from chunk to chunk. Exact; needs no padding when the value
  channels differ from the query/key channels. When the keys are the queries (the gaussian without
  subsampling), each pair of tiles of the symmetric logits is computed once for both of its uses.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from .pairwise_dense import softmax_attention_dense

# Largest number of attention weights one chunk may hold (per folded batch, all of it), on CPU: 4 M floats =
# 16 MB, near the caches. On a GPU each chunk costs kernel launches and the GPU needs large products to be busy:
# 64 M floats = 256 MB per buffer (the forward pass holds two such buffers, the symmetric backward three; where
# the whole N x M fits in one chunk it exists for a moment, but is never kept for the backward pass).
# benchmarks/block.py --chunk-elements measures the choice.
CHUNK_ELEMENTS = 1 << 22
GPU_CHUNK_ELEMENTS = 1 << 26


def default_chunk_elements(device_type: str) -> int:
    """The chunked path's chunk size on this kind of device: :data:`CHUNK_ELEMENTS` on CPU, else
    :data:`GPU_CHUNK_ELEMENTS` (read when called, so that a benchmark may set them)."""
    return CHUNK_ELEMENTS if device_type == "cpu" else GPU_CHUNK_ELEMENTS


def _sdpa_training_backends(device_type: str) -> list | None:
    """The SDPA backends to allow for a call whose backward will run, when they differ from torch's own choice.

    On CUDA, torch may dispatch half-precision SDPA to cuDNN's attention kernel, whose backward has returned NaN
    in dx for a float16 non-local block whose forward was finite (tests/test_cuda.py checks it); the flash and
    memory-efficient kernels are exact there. So a training call allows what the user left enabled
    less cuDNN; when cuDNN is all that is enabled (the user's own choice), it is left alone.
    """
    if device_type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return None
    allowed = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
        )
        if enabled()
    ]
    return allowed or None


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
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backends = _sdpa_training_backends(q.device.type) if training else None
    if backends is None:
        y = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        with sdpa_kernel(backends):
            y = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return y.squeeze(1)[..., :cv]  # (B, 1, N, C) -> (B, N, Cv)


def softmax_attention_chunked(
    q: Tensor, k: Tensor, v: Tensor, scale: float, chunk_elements: int | None = None
) -> Tensor:
    """softmax(s * q kᵀ) v in query chunks of at most ``chunk_elements`` weights (default
    :data:`CHUNK_ELEMENTS` on CPU, :data:`GPU_CHUNK_ELEMENTS` elsewhere); for the backward pass only q, k, v and
    y are kept, and each chunk's weights are recomputed, as flash attention does. No padding: the value channels
    Cv may differ from the query/key channels Cq (the gaussian's raw C-channel features against C' values).

    When ``k is q`` (the gaussian without subsampling: f(x_i, x_j) = exp(x_iᵀx_j)), the logits are symmetric and
    :class:`_SymmetricSoftmaxAttention` computes each pair of tiles' logits once for both.
    """
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(q.device.type)
    b, n, _ = q.shape
    if b == 0 or n == 0 or k.shape[1] == 0:  # nothing to chunk: the reference handles the empty cases
        return softmax_attention_dense(q, k, v, scale)[0]
    if k is q:
        side = max(1, min(n, math.isqrt(max(1, chunk_elements // b))))
        return _SymmetricSoftmaxAttention.apply(q, v, scale, side)
    rows = max(1, min(n, chunk_elements // max(1, b * k.shape[1])))
    return _ChunkedSoftmaxAttention.apply(q, k, v, scale, rows)


def _chunks(n: int, rows: int) -> list[slice]:
    """``range(n)`` in consecutive slices of at most ``rows`` whose lengths differ by one at most, the longest
    first (a short last chunk would run a slow GEMM; the first sizes the buffers)."""
    count = max(1, -(-n // max(1, rows)))
    sizes = [n // count + (i < n % count) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [slice(start, start + size) for start, size in zip(starts, sizes)]


def _positions_like(t: Tensor, channels: int) -> Tensor:
    """An empty (B, L, channels) sequence laid out as ``t``: channel-major (a transposed (B, channels, L)) where t
    is, so that the conv that reads it as a map (B, channels, *S) needs no copy."""
    b, length, _ = t.shape
    if t.stride(-1) != 1 and t.stride(-2) == 1:
        return t.new_empty((b, channels, length)).transpose(1, 2)
    return t.new_empty((b, length, channels))


def _bmm_into(out: Tensor, a: Tensor, b: Tensor, alpha: float | None = None, accumulate: bool = False) -> None:
    """out (+)= alpha a @ b, written where ``out`` lies (row- or column-major per batch entry): BLAS computes
    the transposed product into a column-major ``out`` instead of a temporary and a copy."""
    if out.stride(-1) != 1:
        out, a, b = out.transpose(1, 2), b.transpose(1, 2), a.transpose(1, 2)
    if accumulate:
        out.baddbmm_(a, b, alpha=1.0 if alpha is None else alpha)
    elif alpha is None:
        torch.bmm(a, b, out=out)
    else:
        torch.baddbmm(out, a, b, beta=0.0, alpha=alpha, out=out)


class _Workspace:
    """Reused buffers for one pass over the chunks: a fresh N x M-sized allocation per chunk costs as much as a
    GEMM where the allocator returns memory to the system (page faults on first touch)."""

    def __init__(self, like: Tensor, count: int, elements: int) -> None:
        self.buffers = [like.new_empty(elements) for _ in range(count)]

    def views(self, *shape: int) -> list[Tensor]:
        numel = math.prod(shape)
        return [buffer[:numel].view(shape) for buffer in self.buffers]


def _softmax_into(out: Tensor, logits: Tensor) -> Tensor:
    """softmax over the last axis, written into ``out``."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """y = softmax(s q kᵀ) v by query chunks; backward from (q, k, v, y), recomputing each chunk's weights P:
    dV = Pᵀ dY, dS = P ⊙ (dY Vᵀ - rowsum(dY ⊙ Y)), dQ = s dS K, dK = s dSᵀ Q."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, rows: int) -> Tensor:
        # detached: the products below write into buffers (out=), which torch 2.4's compile tracer refuses for
        # operands it sees as requiring grad (eager runs forward without grad anyway)
        q, k, v = q.detach(), k.detach(), v.detach()
        b, n, _ = q.shape
        m = k.shape[1]
        y = _positions_like(q, v.shape[-1])
        kt = k.transpose(1, 2)  # (B, Cq, M)
        chunks = _chunks(n, rows)
        work = _Workspace(q, 2, b * (chunks[0].stop - chunks[0].start) * m)
        for chunk in chunks:
            logits, weights = work.views(b, chunk.stop - chunk.start, m)
            _bmm_into(logits, q[:, chunk], kt, alpha=None if scale == 1.0 else scale)
            _bmm_into(y[:, chunk], _softmax_into(weights, logits), v)
        ctx.save_for_backward(q, k, v, y)
        ctx.scale, ctx.rows = scale, rows
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        q, k, v, y = ctx.saved_tensors
        with no_autocast(q.device.type):  # a backward run inside autocast: the policy's dtype still holds
            return _chunked_backward(
                q, k, v, y, _strided_rows(grad_y.to(y.dtype)), ctx.scale, ctx.rows, ctx.needs_input_grad
            )


def _strided_rows(t: Tensor) -> Tensor:
    """t itself where BLAS can read each batch entry as a matrix (row- or column-major), else a copy."""
    return t if t.stride(-1) == 1 or t.stride(-2) == 1 else t.contiguous()


def no_autocast(device_type: str):
    """Disables autocast around the pairwise step; a no-op on devices autocast does not know (meta)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _chunked_backward(
    q: Tensor, k: Tensor, v: Tensor, y: Tensor, grad_y: Tensor, scale: float, rows: int, needs: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    b, n, _ = q.shape
    m = k.shape[1]
    grad_q = torch.empty_like(q) if needs[0] else None
    grad_k = torch.empty_like(k) if needs[1] else None
    grad_v = torch.empty_like(v) if needs[2] else None
    alpha = None if scale == 1.0 else scale
    delta = (grad_y * y).sum(dim=-1, keepdim=True)  # (B, N, 1): rowsum(dY ⊙ Y) = Σ_j P_ij dP_ij
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    chunks = _chunks(n, rows)
    work = _Workspace(q, 2, b * (chunks[0].stop - chunks[0].start) * m)
    for index, chunk in enumerate(chunks):
        logits, weights = work.views(b, chunk.stop - chunk.start, m)
        _bmm_into(logits, q[:, chunk], kt, alpha=alpha)
        _softmax_into(weights, logits)  # P (B, n, M), recomputed
        grad_s = logits  # the logits' buffer, free once P is computed
        first = index == 0  # the first chunk writes the key and value gradients, later ones add to them
        if grad_v is not None:
            _bmm_into(grad_v, weights.transpose(1, 2), grad_y[:, chunk], accumulate=not first)  # Pᵀ dY
        # dS = P ⊙ (dP - Δ); Δ subtracted in place (as baddbmm's input it would first be expanded to n x M)
        torch.bmm(grad_y[:, chunk], vt, out=grad_s)
        grad_s.sub_(delta[:, chunk]).mul_(weights)
        if grad_q is not None:
            _bmm_into(grad_q[:, chunk], grad_s, k, alpha=alpha)  # s dS K
        if grad_k is not None:
            _bmm_into(grad_k, grad_s.transpose(1, 2), q[:, chunk], alpha=alpha, accumulate=not first)
    return grad_q, grad_k, grad_v, None, None


class _SymmetricSoftmaxAttention(torch.autograd.Function):
    """y = softmax(s x xᵀ) v, the keys being the queries themselves (the gaussian without subsampling).

    The logits S = s x xᵀ are symmetric, so the positions are cut into tiles and each pair of tiles (I, J), I <= J,
    computes its block of logits S_IJ once, serving the queries of I (keys J) and, transposed, those of J (keys I):
    the forward pass is flash attention's online softmax (running row maxima and sums) over the upper triangle. The
    backward pass keeps (x, v, y, the rows' log-sum-exp) only, recomputes each S_IJ once, and adds both uses of x
    up before multiplying: with E = dS_IJ + dS_JIᵀ, dx_I += s E x_J and dx_J += s Eᵀ x_I. That is N² (2C + 3C')
    multiply-adds for the whole step, against the dense path's N² (3C + 3C') and N² (4C + 3C') for recomputing
    without the symmetry."""

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, scale: float, side: int) -> Tensor:
        x, v = x.detach(), v.detach()  # as _ChunkedSoftmaxAttention.forward
        b, n, _ = x.shape
        tiles = _chunks(n, side)
        alpha = None if scale == 1.0 else scale
        xt = x.transpose(1, 2)
        y = _positions_like(x, v.shape[-1]).zero_()
        row_max = x.new_full((b, n, 1), -math.inf)
        row_sum = x.new_zeros((b, n, 1))
        length = tiles[0].stop - tiles[0].start
        work = _Workspace(x, 2, b * length * length)
        for i, rows in enumerate(tiles):
            for cols in tiles[i:]:
                logits, weights = work.views(b, rows.stop - rows.start, cols.stop - cols.start)
                _bmm_into(logits, x[:, rows], xt[:, :, cols], alpha=alpha)  # S_IJ
                _online_update(logits, v[:, cols], y[:, rows], row_max[:, rows], row_sum[:, rows], weights)
                if cols != rows:  # S_JI = S_IJᵀ: the queries of J against the keys of I
                    weights = weights.view(b, cols.stop - cols.start, rows.stop - rows.start)
                    _online_update(
                        logits.transpose(1, 2), v[:, rows], y[:, cols], row_max[:, cols], row_sum[:, cols], weights
                    )
        y.div_(row_sum)
        log_sum_exp = row_sum.log_().add_(row_max)  # (B, N, 1)
        ctx.save_for_backward(x, v, y, log_sum_exp)
        ctx.scale, ctx.side = scale, side
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, v, y, log_sum_exp = ctx.saved_tensors
        with no_autocast(x.device.type):
            return _symmetric_backward(
                x, v, y, log_sum_exp, _strided_rows(grad_y.to(y.dtype)), ctx.scale, ctx.side, ctx.needs_input_grad
            )


def _exp_(t: Tensor) -> Tensor:
    """e^t in place for t <= 0 (logits less their row's maximum or log-sum-exp), with the arguments clamped two
    units above where e^t leaves the normal range (t >= -85.3 in float32): subnormal results cost the CPU ten
    times a normal exp, and what the clamp changes, a weight below 1e-37 in a row summing to 1, is far below
    rounding."""
    tiny = torch.finfo(t.dtype).tiny
    if tiny < 1e-30:  # float32, bfloat16, float64; not float16, whose normal range ends at 6e-5
        t.clamp_min_(math.log(tiny) + 2.0)
    return t.exp_()


def _online_update(
    logits: Tensor, values: Tensor, y: Tensor, row_max: Tensor, row_sum: Tensor, weights: Tensor
) -> None:
    """One block of keys into the running softmax of some queries (flash attention's update, in place): with m
    the new row maximum, y <- y e^(m_old - m) + e^(S - m) V and the row sums likewise."""
    new_max = torch.maximum(row_max, logits.amax(dim=-1, keepdim=True))
    _exp_(torch.sub(logits, new_max, out=weights))
    rescale = row_max.sub_(new_max).exp_()  # e^(m_old - m); row_max is set to m below
    row_sum.mul_(rescale).add_(weights.sum(dim=-1, keepdim=True))
    y.mul_(rescale)
    _bmm_into(y, weights, values, accumulate=True)
    row_max.copy_(new_max)


def _symmetric_backward(
    x: Tensor,
    v: Tensor,
    y: Tensor,
    log_sum_exp: Tensor,
    grad_y: Tensor,
    scale: float,
    side: int,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    b, n, _ = x.shape
    tiles = _chunks(n, side)
    alpha = None if scale == 1.0 else scale
    grad_x = torch.zeros_like(x) if needs[0] else None
    grad_v = torch.zeros_like(v) if needs[1] else None
    delta = (grad_y * y).sum(dim=-1, keepdim=True)  # (B, N, 1): rowsum(dY ⊙ Y)
    xt, vt = x.transpose(1, 2), v.transpose(1, 2)
    length = tiles[0].stop - tiles[0].start
    work = _Workspace(x, 3, b * length * length)
    for i, rows in enumerate(tiles):
        for cols in tiles[i:]:
            shape = (b, rows.stop - rows.start, cols.stop - cols.start)
            logits, weights, grad_s = work.views(*shape)
            _bmm_into(logits, x[:, rows], xt[:, :, cols], alpha=alpha)  # S_IJ, recomputed
            # the queries of I against the keys of J: P_IJ, dS_IJ = P_IJ ⊙ (dY_I V_Jᵀ - Δ_I)
            _exp_(torch.sub(logits, log_sum_exp[:, rows], out=weights))
            if grad_v is not None:
                _bmm_into(grad_v[:, cols], weights.transpose(1, 2), grad_y[:, rows], accumulate=True)
            torch.bmm(grad_y[:, rows], vt[:, :, cols], out=grad_s)
            grad_s.sub_(delta[:, rows]).mul_(weights)
            if cols == rows:  # a diagonal tile: S_II is its own transpose
                grad_s.add_(grad_s.transpose(1, 2).clone())
            else:  # the queries of J against the keys of I, kept transposed (I x J): P_JIᵀ, dS_JIᵀ
                _exp_(torch.sub(logits, log_sum_exp[:, cols].transpose(1, 2), out=weights))
                if grad_v is not None:
                    _bmm_into(grad_v[:, rows], weights, grad_y[:, cols], accumulate=True)
                scratch = logits  # free once both uses' weights are computed
                torch.bmm(v[:, rows], grad_y[:, cols].transpose(1, 2), out=scratch)  # dP_JIᵀ = V_I dY_Jᵀ
                scratch.sub_(delta[:, cols].transpose(1, 2)).mul_(weights)
                grad_s.add_(scratch)  # E = dS_IJ + dS_JIᵀ
            if grad_x is not None:
                _bmm_into(grad_x[:, rows], grad_s, x[:, cols], alpha=scale, accumulate=True)  # s E x_J
                if cols != rows:
                    _bmm_into(grad_x[:, cols], grad_s.transpose(1, 2), x[:, rows], alpha=scale, accumulate=True)
    return grad_x, grad_v, None, None
