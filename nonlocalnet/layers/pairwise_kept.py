"""The dense path as a layer runs it: the reference's products (:mod:`~nonlocalnet.layers.pairwise_dense`), the
N x M weights kept for the backward pass, with a backward pass written out instead of autograd's formulas.

Autograd's backward of the reference allocates every intermediate afresh and returns each gradient in the layout
its formula gives. Here:

- the softmax's gradient dS = P ⊙ (dP - Δ) is computed in place of dP, with Δ = rowsum(dY ⊙ Y), the output's
  (N x C') instead of a pass over the N x M product (flash attention's identity), so the backward pass holds two
  N x M matrices instead of three;
- the dot product's 1/M and scale ride in the products' alpha instead of two passes over N x M (forward and
  backward);
- y and the gradients of q, k and v are written in the layout of their inputs: channel-major where the block's
  projections are (B, C, *S) maps seen as positions, so W_z reads y without a copy and the gradients add to the
  map's other gradients without a strided pass.

Both functions are once differentiable. Under a compiler or a tracer (``torch.compile``, ``torch.export``, ONNX,
TorchScript) the layer runs the reference instead: a compiler fuses its operators itself, and torch 2.4's tracer
refuses a custom backward. So it does on problems below :data:`KEPT_MIN_WEIGHTS` weights, where a step is host
time and the Python backward here costs more of it than its passes save.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .capture import capturing
from .pairwise_dense import dot_product_dense, softmax_attention_dense
from .pairwise_softmax import _bmm_into, _positions_like, _strided_rows, no_autocast

# Problems (B x N x M weights) below this run the reference: on the tiny block of benchmarks.compare's overhead
# section (2 x 256 x 256 weights) this module's Python backward cost more host time than its passes saved
KEPT_MIN_WEIGHTS = 1 << 18


def runs_kept(q: Tensor, k: Tensor) -> bool:
    """Whether the dense path runs the functions below for these inputs: not under a compiler or a tracer, and
    from :data:`KEPT_MIN_WEIGHTS` weights (which also leaves empty problems to the reference)."""
    return not capturing() and max(1, KEPT_MIN_WEIGHTS) <= q.shape[0] * q.shape[1] * k.shape[1]


def softmax_attention_kept(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(s q kᵀ) v (B, N, Cv), as :func:`~nonlocalnet.layers.pairwise_dense.softmax_attention_dense`."""
    if not runs_kept(q, k):
        return softmax_attention_dense(q, k, v, scale)[0]
    return _KeptPairwise.apply(q, k, v, scale, True)


def dot_product_kept(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """(s/M) q kᵀ v (B, N, Cv), as :func:`~nonlocalnet.layers.pairwise_dense.dot_product_dense` (this order of
    products; :func:`~nonlocalnet.layers.pairwise_dot_product.dot_product_linear` is the other)."""
    if not runs_kept(q, k):
        return dot_product_dense(q, k, v, scale)[0]
    return _KeptPairwise.apply(q, k, v, scale / k.shape[1], False)


def _grad_buffers(needs: tuple[bool, ...], *inputs: Tensor) -> list[Tensor | None]:
    """An empty gradient per input that needs one, laid out as that input: channel-major where it is (also a
    channel slice of the stacked projections, which ``empty_like`` would hand back row-major)."""
    return [_positions_like(t, t.shape[-1]) if need else None for t, need in zip(inputs, needs)]


class _KeptPairwise(torch.autograd.Function):
    """y = W v with the weights W = softmax(a q kᵀ) (the softmax modes, a = s) or a q kᵀ (the dot product,
    a = s/M), W kept. Backward: dV = Wᵀ dY, dW = dY Vᵀ, dS = W ⊙ (dW - rowsum(dY ⊙ Y)) under the softmax and
    dS = dW without, dQ = a dS K, dK = a dSᵀ Q."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, alpha: float, softmax: bool) -> Tensor:
        # detached: the products write into buffers (out=), which refuse operands that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
        weights = q.new_empty((q.shape[0], q.shape[1], k.shape[1]))
        _bmm_into(weights, q, k.transpose(1, 2), alpha=None if alpha == 1.0 else alpha)
        if softmax:  # the logits are freed before y's product: two N x M matrices at most, for a moment
            weights = torch.softmax(weights, dim=-1)
        y = _positions_like(q, v.shape[-1])
        _bmm_into(y, weights, v)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(q, k, v, weights, *([y] if softmax else []))  # y for the softmax's row sums
        ctx.alpha = alpha
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        q, k, v, weights, *y = ctx.saved_tensors
        with no_autocast(q.device.type):  # a backward run inside autocast: the policy's dtype still holds
            grad_y = _strided_rows(grad_y.to(v.dtype))
            alpha = None if ctx.alpha == 1.0 else ctx.alpha
            grad_q, grad_k, grad_v = _grad_buffers(ctx.needs_input_grad[:3], q, k, v)
            if grad_v is not None:
                _bmm_into(grad_v, weights.transpose(1, 2), grad_y)  # Wᵀ dY
            if grad_q is not None or grad_k is not None:
                grad_s = torch.bmm(grad_y, v.transpose(1, 2))  # dW
                if y:  # dS = W ⊙ (dW - Δ), in place of dW; Δ = rowsum(dY ⊙ Y) = Σ_j W_ij dW_ij
                    grad_s.sub_((grad_y * y[0]).sum(dim=-1, keepdim=True)).mul_(weights)
                if grad_q is not None:
                    _bmm_into(grad_q, grad_s, k, alpha=alpha)  # a dS K
                if grad_k is not None:
                    _bmm_into(grad_k, grad_s.transpose(1, 2), q, alpha=alpha)  # a dSᵀ Q
        return grad_q, grad_k, grad_v, None, None
