"""The non-local block: fast paths against the dense reference, the reference against the paper's formula,
identity at init, gradients, errors, and precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nonlocalnet import NonLocal1d, NonLocal2d, NonLocal3d, NonLocalBlock
from nonlocalnet.layers import IMPLS_BY_MODE, MODES

from .helpers import make_active

SHAPES = {1: (2, 8, 11), 2: (2, 8, 5, 7), 3: (2, 8, 4, 5, 6)}


@pytest.fixture(autouse=True)
def _dense_path_own_backward_at_every_size(monkeypatch):
    # the tests' problems are tiny, which the dense path would leave to the reference (KEPT_MIN_WEIGHTS): here
    # every size runs its own backward, so that the tests below compare it with the reference
    from nonlocalnet.layers import pairwise_kept

    monkeypatch.setattr(pairwise_kept, "KEPT_MIN_WEIGHTS", 1)


def grads(block, x, memory=None, reference=False):
    """z, the inputs' gradients and the parameters' under a non-uniform upstream gradient; ``reference``: computed
    by the dense reference formula (what ``return_attention=True`` runs, whatever the block's impl)."""
    block.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    inputs = [x]
    if memory is not None:
        memory = memory.detach().clone().requires_grad_(True)
        inputs.append(memory)
    z = block(x, memory=memory, return_attention=True)[0] if reference else block(x, memory=memory)
    weight = torch.linspace(-1, 1, z.numel()).view_as(z)  # a non-uniform upstream gradient
    (z * weight).sum().backward()
    return z.detach(), [t.grad.clone() for t in inputs], {n: p.grad.clone() for n, p in block.named_parameters()}


def assert_same_function(block, x, impl, memory=None, atol=1e-5):
    z_ref, in_ref, p_ref = grads(block, x, memory, reference=True)
    block.impl = impl
    z, in_g, p_g = grads(block, x, memory)
    torch.testing.assert_close(z, z_ref, atol=atol, rtol=1e-4)
    for a, b in zip(in_g, in_ref):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    # Some parameter gradients are exactly zero in theory (φ's bias under a softmax: it shifts every logit of a
    # query alike) and float32 noise of the size of the others' rounding there: compare at the gradients' scale.
    scale = max(1.0, max(g.abs().max().item() for g in p_ref.values()))
    for name in p_ref:
        torch.testing.assert_close(p_g[name], p_ref[name], atol=atol * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# every path, the dense one too: it runs its own backward (layers/pairwise_kept.py), not the reference's autograd
FAST = [(mode, impl) for mode in MODES for impl in IMPLS_BY_MODE[mode]]


@pytest.mark.parametrize("mode,impl", FAST)
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("subsample,position", [(None, "input"), (2, "input"), (2, "projection")])
def test_fast_path_equals_dense_reference(mode, impl, dim, subsample, position):
    block = make_active(
        NonLocalBlock(8, dim=dim, mode=mode, subsample=subsample, subsample_position=position, scale="auto")
    )
    assert_same_function(block, torch.randn(SHAPES[dim]), impl)


@pytest.mark.parametrize("mode,impl", FAST)
@pytest.mark.parametrize(
    "extent,groups,subsample",
    [
        ("spacetime", 1, (1, 2, 2)),
        ("space", 1, (1, 2, 2)),
        ("time", 1, (2, 1, 1)),
        ("spacetime", 2, (1, 2, 2)),
        ("spacetime", 2, (2, 2, 2)),
    ],
)
def test_fast_path_equals_dense_with_extents_and_groups(mode, impl, extent, groups, subsample):
    block = make_active(NonLocal3d(8, mode=mode, extent=extent, temporal_groups=groups, subsample=subsample))
    assert_same_function(block, torch.randn(2, 8, 4, 6, 5), impl)


@pytest.mark.parametrize("mode,impl", FAST)
def test_fast_path_equals_dense_with_memory(mode, impl):
    channels = 8 if mode == "gaussian" else 6
    block = make_active(NonLocal3d(8, mode=mode, memory_channels=channels, subsample=(1, 2, 2)))
    memory = torch.randn(2, channels, 7, 4, 3)  # its own channels and length
    assert_same_function(block, torch.randn(2, 8, 3, 5, 5), impl, memory=memory)


def test_chunked_path_splits_queries_and_stays_exact(monkeypatch):
    from nonlocalnet.layers import pairwise_softmax

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 64)  # forces many chunks of a few queries
    rows = []
    original = pairwise_softmax._ChunkedSoftmaxAttention.apply
    monkeypatch.setattr(
        pairwise_softmax._ChunkedSoftmaxAttention, "apply", lambda *a: rows.append(a[-1]) or original(*a)
    )
    block = make_active(NonLocal2d(8, mode="embedded_gaussian"))
    assert_same_function(block, torch.randn(2, 8, 7, 9), "chunked")  # forward and every gradient
    assert rows and all(r == 1 for r in rows)  # 64 // (2 * 63) -> one query per chunk: 63 chunks


@pytest.mark.parametrize("cq,cv", [(12, 5), (5, 12), (8, 8)])
def test_chunked_path_keeps_no_weight_matrix_and_needs_no_padding(cq, cv, monkeypatch):
    from nonlocalnet.layers import pairwise_softmax
    from nonlocalnet.layers.pairwise_dense import softmax_attention_dense

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 40 * 7)  # 7 queries per chunk
    q, k, v = (torch.randn(2, n, c, dtype=torch.float64, requires_grad=True) for n, c in ((30, cq), (40, cq), (40, cv)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = pairwise_softmax.softmax_attention_chunked(q, k, v, 0.3)
    assert sorted(saved) == sorted([(2, 30, cq), (2, 40, cq), (2, 40, cv), (2, 30, cv)])  # q, k, v, y: no N x M
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (q, k, v), grad)
    reference = softmax_attention_dense(q, k, v, 0.3)[0]
    torch.testing.assert_close(y, reference)
    for a, b in zip(got, torch.autograd.grad(reference, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["positions", "channels"])
def test_chunked_path_writes_where_its_operands_lie(layout, monkeypatch):
    # q, k, v as (B, N, C) rows or as transposed (B, C, N) maps (what the block passes): the same values either
    # way, and y comes back in q's layout, so that W_z reads a channel-major y without a copy
    from nonlocalnet.layers import pairwise_softmax
    from nonlocalnet.layers.pairwise_dense import softmax_attention_dense

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 40 * 8)  # 8 rows a chunk: 29 = 8+7+7+7 rows

    def make(n, c):
        t = (
            torch.randn(2, c, n, dtype=torch.float64).transpose(1, 2)
            if layout == "channels"
            else torch.randn(2, n, c, dtype=torch.float64)
        )
        return t.requires_grad_()

    q, k, v = make(29, 6), make(40, 6), make(40, 5)
    y = pairwise_softmax.softmax_attention_chunked(q, k, v, 0.7)
    assert y.stride(-2 if layout == "channels" else -1) == 1
    assert pairwise_softmax._chunks(29, 8) == [slice(0, 8), slice(8, 15), slice(15, 22), slice(22, 29)]
    grad = torch.randn_like(y)
    reference = softmax_attention_dense(q, k, v, 0.7)[0]
    torch.testing.assert_close(y, reference)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


def test_chunked_and_symmetric_paths_take_empty_batches_and_sequences():
    from nonlocalnet.layers import pairwise_softmax

    for b, n in ((0, 5), (2, 0)):
        q, v = torch.randn(b, n, 3), torch.randn(b, n, 4)
        assert pairwise_softmax.softmax_attention_chunked(q, q, v, 1.0).shape == (b, n, 4)
        assert pairwise_softmax.softmax_attention_chunked(q, q.clone(), v, 1.0).shape == (b, n, 4)
    block = NonLocal2d(4, mode="gaussian", norm=None, impl="chunked").eval()
    assert block(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("n", [1, 7, 30])
def test_symmetric_path_equals_dense_and_keeps_no_weight_matrix(scale, n, monkeypatch):
    # keys that are the queries (k is q): tiles of 4 x 4 logits, each pair computed once for both of its uses
    from nonlocalnet.layers import pairwise_softmax
    from nonlocalnet.layers.pairwise_dense import softmax_attention_dense

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 4 * 4)
    x = (3 * torch.randn(2, 6, n, dtype=torch.float64)).transpose(1, 2).requires_grad_()  # peaky softmax
    v = torch.randn(2, n, 5, dtype=torch.float64, requires_grad=True)
    calls = []
    original = pairwise_softmax._SymmetricSoftmaxAttention.apply
    monkeypatch.setattr(
        pairwise_softmax._SymmetricSoftmaxAttention, "apply", lambda *a: calls.append(a[-1]) or original(*a)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = pairwise_softmax.softmax_attention_chunked(x, x, v, scale)
    assert calls == [min(n, 4)]  # the tile side
    assert sorted(saved) == sorted([(2, n, 6), (2, n, 5), (2, n, 5), (2, n, 1)])  # x, v, y, log-sum-exp
    grad = torch.randn_like(y)
    reference = softmax_attention_dense(x, x, v, scale)[0]
    torch.testing.assert_close(y, reference)
    for a, b in zip(torch.autograd.grad(y, (x, v), grad), torch.autograd.grad(reference, (x, v), grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["softmax", "dot_product"])
@pytest.mark.parametrize("layout", ["positions", "channels"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_dense_path_keeps_the_weights_alone_and_writes_where_its_operands_lie(mode, layout, scale):
    # the dense path's own backward (layers/pairwise_kept.py) against autograd through the reference formula:
    # the same values and gradients; the N x M weights are the one matrix kept (not the logits besides); y and
    # every gradient come back in their operand's layout (row-major positions or a transposed channel-major map)
    from nonlocalnet.layers import pairwise_dense, pairwise_kept

    kept, reference = {
        "softmax": (pairwise_kept.softmax_attention_kept, pairwise_dense.softmax_attention_dense),
        "dot_product": (pairwise_kept.dot_product_kept, pairwise_dense.dot_product_dense),
    }[mode]

    def make(n, c):
        t = torch.randn(2, c, n, dtype=torch.float64) if layout == "channels" else torch.randn(2, n, c).double()
        return (t.transpose(1, 2) if layout == "channels" else t).requires_grad_()

    q, k, v = make(29, 6), make(40, 6), make(40, 5)
    if layout == "channels":  # q a channel slice of a larger map, as the stacked projections give it
        q = torch.randn(2, 9, 29, dtype=torch.float64)[:, 2:8].transpose(1, 2).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = kept(q, k, v, scale)
    outputs = [(2, 29, 5)] if mode == "softmax" else []  # y, for rowsum(dY ⊙ Y)
    assert sorted(saved) == sorted([(2, 29, 6), (2, 40, 6), (2, 40, 5), (2, 29, 40), *outputs])
    assert y.stride(-2 if layout == "channels" else -1) == 1
    grad = torch.randn_like(y)
    expected = reference(q, k, v, scale)[0]
    torch.testing.assert_close(y, expected)
    got = torch.autograd.grad(y, (q, k, v), grad)
    for a, b, operand in zip(got, torch.autograd.grad(expected, (q, k, v), grad), (q, k, v)):
        torch.testing.assert_close(a, b)
        assert a.stride(-2 if layout == "channels" else -1) == 1 and a.is_contiguous() == operand.is_contiguous()
    # only the values need a gradient (keys and queries frozen): the others are neither computed nor returned
    v_only = v.detach().requires_grad_()
    (grad_v,) = torch.autograd.grad(kept(q.detach(), k.detach(), v_only, scale), (v_only,), grad)
    torch.testing.assert_close(grad_v, got[2])


def test_dense_path_takes_keys_that_are_the_queries_and_empty_problems():
    from nonlocalnet.layers import pairwise_dense, pairwise_kept

    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)  # the gaussian unsubsampled: k is q
    v = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    y = pairwise_kept.softmax_attention_kept(x, x, v, 1.0)
    expected = pairwise_dense.softmax_attention_dense(x, x, v, 1.0)[0]
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, v), grad), torch.autograd.grad(expected, (x, v), grad)):
        torch.testing.assert_close(a, b)  # both uses of x add up
    for b, n, m in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q, k, v = torch.randn(b, n, 3), torch.randn(b, m, 3), torch.randn(b, m, 4)
        if m:  # (the dot product's 1/M has no value without keys, which the block refuses)
            assert pairwise_kept.dot_product_kept(q, k, v, 1.0).shape == (b, n, 4)
        assert pairwise_kept.softmax_attention_kept(q, k, v, 1.0).shape == (b, n, 4)


def test_dense_path_leaves_tiny_problems_to_the_reference(monkeypatch):
    from nonlocalnet.layers import pairwise_kept

    monkeypatch.setattr(pairwise_kept, "KEPT_MIN_WEIGHTS", 2 * 29 * 40)
    for n, kept in ((29, True), (28, False)):  # 2 x 29 x 40 weights and one row fewer
        q, k, v = (torch.randn(2, length, 6, requires_grad=True) for length in (n, 40, 40))
        for fn in (pairwise_kept.softmax_attention_kept, pairwise_kept.dot_product_kept):
            node = type(fn(q, k, v, 1.0).grad_fn).__name__
            assert node.startswith("_Kept") == kept, (n, node)


@pytest.mark.parametrize("groups,memory", [(1, False), (2, False), (1, True)])
def test_block_uses_the_symmetric_path_exactly_when_keys_are_queries(groups, memory, monkeypatch):
    from nonlocalnet.layers import pairwise_softmax

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 5 * 5)
    calls = []
    original = pairwise_softmax._SymmetricSoftmaxAttention.apply
    monkeypatch.setattr(
        pairwise_softmax._SymmetricSoftmaxAttention, "apply", lambda *a: calls.append(a) or original(*a)
    )
    options = dict(memory_channels=8) if memory else {}
    block = make_active(NonLocal3d(8, mode="gaussian", temporal_groups=groups, **options))
    x = torch.randn(2, 8, 4, 3, 3)
    assert_same_function(block, x, "chunked", memory=torch.randn(2, 8, 4, 3, 3) if memory else None)
    assert bool(calls) == (not memory)  # with a memory x̂ the keys are not the queries
    calls.clear()
    subsampled = make_active(NonLocal3d(8, mode="gaussian", subsample=(1, 2, 2), impl="chunked"))
    subsampled(torch.randn(2, 8, 4, 4, 4))
    assert not calls


def test_concatenation_sorted_handles_ties_and_all_negative():
    block = make_active(NonLocal1d(4, mode="concatenation"))
    x = torch.randn(1, 4, 9)
    x[..., 5:] = x[..., :1]  # repeated keys: equal b_j
    block.impl = "sorted"
    z_sorted = block(x)
    block.impl = "dense"
    torch.testing.assert_close(z_sorted, block(x), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        block.concat_project[0].weight.fill_(0.0)  # f == 0 everywhere: y == 0, z == norm(W_z 0) + x
    block.impl = "sorted"
    torch.testing.assert_close(block(x), block.norm(block.out(torch.zeros(1, 2, 9))) + x)


@pytest.mark.parametrize("mode,impl", [(m, i) for m in MODES for i in IMPLS_BY_MODE[m]])
def test_gradcheck_float64(mode, impl):
    block = make_active(NonLocal2d(4, mode=mode, inter_channels=3, subsample=(1, 2), impl=impl)).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("position", ["input", "projection"])
def test_gradcheck_float64_parameters_in_training(mode, position):
    # training mode (batch statistics), both subsample positions, and the gradients of every parameter
    block = make_active(NonLocal2d(4, mode=mode, inter_channels=3, subsample=(1, 2), subsample_position=position))
    block = block.double().train()
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(t, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (t,))

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5)


def paper_formula(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """z_i = BN(W_z y_i) + x_i with y_i = 1/C(x) Σ_j f(x_i, x_j) g(x_j), a Python loop over positions (dim 1)."""
    b, c, n = x.shape

    def conv(layer, v):  # a 1x1 conv applied to one position vector
        return layer.weight[:, :, 0] @ v + layer.bias

    z = torch.empty_like(x)
    for batch in range(b):
        cols = [x[batch, :, i] for i in range(n)]
        for i in range(n):
            terms, f_values = [], []
            for j in range(n):
                if block.mode == "gaussian":
                    f = torch.exp(block.scale * cols[i] @ cols[j])
                elif block.mode == "embedded_gaussian":
                    f = torch.exp(block.scale * conv(block.theta, cols[i]) @ conv(block.phi, cols[j]))
                elif block.mode == "dot_product":
                    f = block.scale * conv(block.theta, cols[i]) @ conv(block.phi, cols[j])
                else:
                    w = block.concat_project[0].weight.flatten()
                    pair = torch.cat([conv(block.theta, cols[i]), conv(block.phi, cols[j])])
                    f = torch.relu(block.scale * w @ pair)
                f_values.append(f)
                terms.append(f * conv(block.g, cols[j]))
            normaliser = sum(f_values) if block.mode in ("gaussian", "embedded_gaussian") else n
            y = sum(terms) / normaliser
            w_y = conv(block.out, y)
            bn = block.norm
            z[batch, :, i] = (
                (w_y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias + cols[i]
            )
    return z


@pytest.mark.parametrize("mode", MODES)
def test_dense_reference_equals_paper_formula(mode):
    block = make_active(NonLocal1d(4, mode=mode, impl="dense", scale=0.7), std=0.3).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), paper_formula(block, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["batch", "layer", None])
def test_identity_at_init(mode, norm):
    block = NonLocal3d(8, mode=mode, norm=norm, subsample=(1, 2, 2))
    x = torch.randn(2, 8, 2, 4, 4)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    block.eval()
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["batch", "layer", None])
def test_every_parameter_gets_a_gradient_after_one_step(mode, norm):
    block = NonLocal2d(8, mode=mode, norm=norm)
    optimizer = torch.optim.SGD(block.parameters(), lr=1.0)
    x = torch.randn(2, 8, 5, 5)
    target = torch.randn(2, 8, 5, 5)
    for _ in range(2):
        optimizer.zero_grad()
        ((block(x) - target) ** 2).mean().backward()
        optimizer.step()
    # three biases have a gradient of zero by construction, reached up to rounding: φ's under a softmax over the
    # keys (it shifts a query's logits alike), W_z's before a training-mode BN (the batch mean takes it out), and
    # g's there too under a softmax (the weights of a query sum to 1, so it adds one vector at every position)
    softmax = mode in ("gaussian", "embedded_gaussian")
    zero = {"phi.bias"} if softmax else set()
    if norm == "batch":
        zero |= {"out.bias", "g.bias"} if softmax else {"out.bias"}
    largest = max(p.grad.abs().max().item() for p in block.parameters())
    for name, p in block.named_parameters():
        assert p.grad is not None, f"{name} is outside the graph"
        if name in zero:
            assert p.grad.abs().max() <= 1e-4 * largest, f"{name}: {p.grad}"
        else:
            assert p.grad.abs().sum() > 1e-3 * largest, f"{name} got no gradient"


def test_submodule_names_and_parameter_counts():
    res4 = NonLocal3d(1024, subsample=(1, 2, 2))
    assert sum(p.numel() for p in res4.parameters()) == 2_101_760
    assert sum(p.numel() for p in NonLocal3d(512).parameters()) == 526_592
    assert isinstance(res4.theta, nn.Conv3d) and isinstance(res4.norm, nn.BatchNorm3d)
    assert {n for n, _ in res4.named_children()} == {"theta", "phi", "g", "out", "norm", "pool"}
    gaussian = NonLocal3d(16, mode="gaussian")
    assert not hasattr(gaussian, "theta") and not hasattr(gaussian, "phi")
    concat = NonLocal3d(16, mode="concatenation")
    assert concat.concat_project[0].weight.shape == (1, 16, 1, 1)
    assert isinstance(concat.concat_project[1], nn.ReLU)
    assert concat.theta.bias is not None and concat.g.bias is not None


def test_scale_options():
    assert NonLocal2d(64).scale == 1.0
    assert NonLocal2d(64, scale="auto").scale == pytest.approx(32**-0.5)
    assert NonLocal2d(64, inter_channels=16, scale="auto").scale == pytest.approx(0.25)
    assert NonLocal2d(64, scale=0.3).scale == 0.3


def test_subsample_position_orders_pool_and_projection():
    x = torch.randn(1, 8, 6, 6)
    for position in ("input", "projection"):
        block = make_active(NonLocal2d(8, subsample=2, subsample_position=position))
        _, attn = block(x, return_attention=True)
        assert attn.shape == (1, 36, 9)
        pool = nn.MaxPool2d(2)
        value = block.g(pool(x)) if position == "input" else pool(block.g(x))
        key = block.phi(pool(x)) if position == "input" else pool(block.phi(x))
        query = block.theta(x).flatten(2).transpose(1, 2)  # (1, 36, 4)
        expected_attn = torch.softmax(query @ key.flatten(2), dim=-1)  # (1, 36, 9)
        torch.testing.assert_close(attn, expected_attn)
        y = (expected_attn @ value.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, 4, 6, 6)
        torch.testing.assert_close(block(x), block.norm(block.out(y)) + x, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_return_attention_is_normalised_f(mode):
    block = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2)))
    x = torch.randn(2, 8, 2, 4, 4)
    z, attn = block(x, return_attention=True)
    assert attn.shape == (2, 32, 8)
    torch.testing.assert_close(z, block(x), atol=1e-5, rtol=1e-4)
    if mode in ("gaussian", "embedded_gaussian"):
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 32))
    if mode == "concatenation":
        assert (attn >= 0).all()
    if mode == "dot_product":
        assert (attn < 0).any()


def test_attention_is_zero_outside_extent_and_groups():
    x = torch.randn(1, 8, 4, 3, 3)
    space = make_active(NonLocal3d(8, extent="space"))
    _, attn = space(x, return_attention=True)  # (1, 36, 36)
    frame = torch.arange(36) // 9
    same_frame = frame[:, None] == frame[None, :]
    assert (attn[0][~same_frame] == 0).all() and (attn[0][same_frame] > 0).all()
    time = make_active(NonLocal3d(8, extent="time"))
    _, attn = time(x, return_attention=True)
    pixel = torch.arange(36) % 9
    assert (attn[0][pixel[:, None] != pixel[None, :]] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 36))
    grouped = make_active(NonLocal3d(8, temporal_groups=2, subsample=(1, 3, 3)))
    _, attn = grouped(x, return_attention=True)  # keys: 4 frames x 1 x 1
    assert attn.shape == (1, 36, 4)
    group_q, group_k = frame // 2, torch.arange(4) // 2
    assert (attn[0][group_q[:, None] != group_k[None, :]] == 0).all()


def test_temporal_groups_count_frames_per_group():
    # 6 frames in groups of k=3 frames: two groups {0,1,2} and {3,4,5} (not three groups of two)
    block = make_active(NonLocal3d(8, temporal_groups=3))
    _, attn = block(torch.randn(1, 8, 6, 2, 2), return_attention=True)
    group = torch.arange(24) // 4 // 3
    assert (attn[0][group[:, None] != group[None, :]] == 0).all()
    assert (attn[0][group[:, None] == group[None, :]] > 0).all()


def test_block_runs_on_meta_device():
    block = NonLocal3d(16, subsample=(1, 2, 2)).to("meta")
    z = block(torch.empty(2, 16, 4, 6, 6, device="meta"))
    assert z.shape == (2, 16, 4, 6, 6) and z.device.type == "meta"


def test_space_extent_equals_per_frame_block():
    block = make_active(NonLocal3d(8, extent="space", subsample=(1, 2, 2), norm=None))
    frames = make_active(NonLocal2d(8, subsample=2, norm=None))
    frames.load_state_dict({k: v.squeeze(-1) for k, v in block.state_dict().items()})
    x = torch.randn(2, 8, 3, 4, 4)
    per_frame = torch.stack([frames(x[:, :, t]) for t in range(3)], dim=2)
    torch.testing.assert_close(block(x), per_frame, atol=1e-5, rtol=1e-4)


def test_memory_supplies_keys_and_values():
    block = make_active(NonLocal1d(8, memory_channels=5))
    x, bank = torch.randn(3, 8, 4), torch.randn(3, 5, 10)
    z, attn = block(x, memory=bank, return_attention=True)
    assert z.shape == x.shape and attn.shape == (3, 4, 10)
    bank2 = bank.clone()
    bank2[..., -1] += 3.0
    assert not torch.allclose(block(x, memory=bank2), z)  # the last memory entry is attended to


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_norm_options(norm):
    block = NonLocal3d(8, norm=norm)
    expected = nn.BatchNorm3d if norm == "batch" else nn.Module
    assert isinstance(block.norm, expected)
    assert (block.norm.weight == 0).all()
    if norm == "batch":
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(NonLocal3d(8))
        assert isinstance(synced.norm, nn.SyncBatchNorm)
    none = NonLocal3d(8, norm=None)
    assert isinstance(none.norm, nn.Identity) and (none.out.weight == 0).all()


@pytest.mark.parametrize(
    "build,x,match",
    [
        (lambda: NonLocal3d(8), torch.randn(2, 8, 4, 4), r"\(B, C, T, H, W\)"),
        (lambda: NonLocal2d(8), torch.randn(2, 6, 4, 4), "8 input channels; x has 6"),
        (lambda: NonLocal2d(8, subsample=4), torch.randn(2, 8, 3, 8), "larger than"),
        (lambda: NonLocal3d(8, extent="time", subsample=(1, 2, 2)), torch.randn(1, 8, 2, 4, 4), "extent='time'"),
        (lambda: NonLocal3d(8, temporal_groups=3), torch.randn(1, 8, 4, 2, 2), "temporal_groups=3 frames"),
        (lambda: NonLocal3d(8, memory_channels=4), torch.randn(1, 8, 4, 2, 2), "pass memory="),
        (lambda: NonLocal3d(8), torch.randn(1, 8, 0, 2, 2), r"no positions to attend over \(shape \(1, 8, 0, 2, 2\)\)"),
    ],
)
def test_bad_input_is_named(build, x, match):
    with pytest.raises(ValueError, match=match):
        build()(x)


def test_bad_memory_is_named():
    block = NonLocal1d(8, memory_channels=4)
    with pytest.raises(ValueError, match="memory has 3 channels"):
        block(torch.randn(1, 8, 5), memory=torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="batch size"):
        block(torch.randn(2, 8, 5), memory=torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"memory has no positions to attend to \(shape \(1, 4, 0\)\)"):
        block(torch.randn(1, 8, 5), memory=torch.randn(1, 4, 0))  # M = 0: a raw torch error before


def test_return_attention_refuses_a_matrix_above_its_budget_naming_the_size():
    block = NonLocal2d(4)
    x = torch.randn(1, 4, 256, 256)  # N = M = 65,536: a 17.2 GB weight matrix
    with pytest.raises(
        ValueError,
        match=r"\(1, 65536, 65536\) float32 weight matrix of 17.2 GB, above this "
        r"block's attention_budget_bytes \(2.1 GB\)",
    ):
        block(x, return_attention=True)
    small = torch.randn(2, 4, 6, 6)
    block.attention_budget_bytes = 2 * 36 * 36 * 4  # exactly the (2, 36, 36) matrix: allowed
    assert block(small, return_attention=True)[1].shape == (2, 36, 36)
    block.attention_budget_bytes -= 1
    with pytest.raises(ValueError, match="attention_budget_bytes"):
        block(small, return_attention=True)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(mode="softmax"), "unknown non-local mode 'softmax'"),
        (dict(impl="flash"), "unknown non-local impl 'flash'"),
        (dict(mode="dot_product", impl="sdpa"), "does not compute mode 'dot_product'"),
        (dict(mode="concatenation", impl="linear"), "does not compute mode 'concatenation'"),
        (dict(norm="group"), "unknown norm 'group'"),
        (dict(subsample_position="after"), "unknown subsample_position"),
        (dict(extent="frame"), "unknown extent 'frame'"),
        (dict(scale=-1.0), "scale must be"),
        (dict(scale="sqrt"), "scale must be"),
        (dict(scale=float("inf")), "positive finite number; got inf"),  # accepted before, gave NaN
        (dict(subsample=2.0), "subsample must be a positive int"),  # a raw TypeError before
        (dict(subsample=(1, 2)), "subsample must be"),
        (dict(dim=4), "dim must be 1, 2 or 3"),
        (dict(dim=2, extent="time"), "needs video input"),
        (dict(mode="gaussian", memory_channels=3), "memory_channels"),
    ],
)
def test_unknown_options_are_named(options, match):
    options = {"dim": 3, **options}
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(8, **options)


def test_keyword_only_constructor():
    with pytest.raises(TypeError):
        NonLocalBlock(8, 3)


@pytest.mark.parametrize("mode,impl", [(m, i) for m in MODES for i in IMPLS_BY_MODE[m]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_has_no_overflow(mode, impl, dtype):
    """Raw-feature gaussian with C=1024 is exp(xᵀx) with xᵀx in the thousands: finite, and close to float32.

    The error is measured on the non-local term z - x = W_z·y (z itself is mostly the float32 residual x, which
    hides any error in y), as max |Δ| over max |W_z·y|. Bounds: bfloat16 keeps 8 significant bits (a rounding
    is 2^-9 = 0.2% relative), float16 11 (0.02%); the projections, the pairwise step and W_z round several
    times, measured at most 1.2% (bfloat16) and 0.11% (float16) on these inputs; the bounds are 3% and 0.4%.
    """
    channels = 1024 if mode == "gaussian" else 64
    block = make_active(NonLocal3d(channels, mode=mode, subsample=(1, 2, 2), impl=impl), std=0.05)
    x = 3.0 * torch.randn(1, channels, 2, 4, 4)
    with torch.no_grad():
        reference = block(x)
        with torch.autocast("cpu", dtype=dtype):
            z = block(x)
    assert torch.isfinite(reference).all()
    assert torch.isfinite(z).all(), f"{mode}/{impl} under {dtype} autocast produced inf/NaN"
    term, reference_term = z.float() - x, reference - x
    error = (term - reference_term).abs().max() / reference_term.abs().max()
    assert error < {torch.bfloat16: 0.03, torch.float16: 0.004}[dtype], f"{mode}/{impl}/{dtype}: {error:.4f}"


@pytest.mark.parametrize("mode", MODES)
def test_traced_block_equals_eager(mode):
    block = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2)))
    x = torch.randn(2, 8, 2, 4, 4)
    with torch.no_grad():
        traced = torch.jit.trace(block, (x,), check_trace=False)
    other = torch.randn(2, 8, 2, 4, 4)
    torch.testing.assert_close(traced(other), block(other), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_sdpa_path_runs_on_the_flash_kernel(mode):
    """Strided inputs or unequal head sizes would silently drop SDPA to its O(N·M) math fallback; with only the
    flash backend allowed, such a fallback raises instead."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = make_active(NonLocal3d(16, mode=mode, subsample=(1, 2, 2), impl="sdpa")).train()
    x = torch.randn(2, 16, 2, 4, 4, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        block(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["batch", None])
def test_pytorch_init_keeps_identity_at_init_but_larger_projections(mode, norm):
    official = NonLocal3d(16, mode=mode, norm=norm, init="official")
    block = NonLocal3d(16, mode=mode, norm=norm, init="pytorch")
    x = torch.randn(2, 16, 2, 3, 3)
    torch.testing.assert_close(block.eval()(x), x)
    assert block.g.weight.std() > 5 * official.g.weight.std()


def test_a_new_block_starts_with_pytorchs_init_and_the_official_one_once_placed_in_a_pretrained_network():
    from nonlocalnet.layers import init_inserted_blocks

    torch.manual_seed(0)
    pytorch = NonLocal3d(16, init="pytorch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(NonLocal3d(16), NonLocal3d(16, init="pytorch"))  # "auto": PyTorch's init when built
    assert torch.equal(net[0].theta.weight, pytorch.theta.weight)
    assert init_inserted_blocks(net) == ["0"]  # the explicit "pytorch" is kept
    assert net[0].theta.weight.std().item() == pytest.approx(0.01, rel=0.2) and net[0].init == "auto"
    assert net[1].theta.weight.std().item() > 5 * 0.01


def test_unknown_init_is_named():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        NonLocal3d(8, init="xavier")


@pytest.mark.parametrize("mode", MODES)
def test_output_is_contiguous_like_the_input(mode):
    # a strided output changes the kernels later convs pick and breaks .view() in heads that follow
    z = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2)))(torch.randn(2, 8, 3, 4, 4))
    assert z.is_contiguous()


def test_auto_path_choice():
    from nonlocalnet.layers.pairwise import (
        CPU_CHUNKED_MAX_WEIGHTS,
        CPU_DENSE_MAX_WEIGHTS,
        CPU_GAUSSIAN_DENSE_MAX_WEIGHTS,
        DENSE_BYTES_PER_WEIGHT,
        resolve_impl,
    )

    eg = dict(mode="embedded_gaussian", impl="auto", n=3136, m=784, cq=256, cv=256)
    need = 2 * 3136 * 784 * DENSE_BYTES_PER_WEIGHT
    # CPU: the dense path where it fits, up to CPU_DENSE_MAX_WEIGHTS weights per call; the chunked path where it
    # does not fit, up to CPU_CHUNKED_MAX_WEIGHTS; SDPA beyond
    assert resolve_impl(**eg, batch=2) == "dense"
    assert resolve_impl(**eg, batch=2, budget=need - 1) == "chunked"
    big = max(CPU_CHUNKED_MAX_WEIGHTS, CPU_DENSE_MAX_WEIGHTS) // (3136 * 784) + 1
    assert resolve_impl(**eg, batch=big) == "sdpa"
    assert resolve_impl(**eg, batch=big, budget=0) == "sdpa"
    # half precision (autocast): SDPA's fused kernels on every device
    assert resolve_impl(**eg, batch=2, dtype=torch.bfloat16) == "sdpa"
    assert resolve_impl(**eg, batch=2, device_type="cuda", dtype=torch.float16) == "sdpa"
    # GPU, float32: dense where the matrices fit the budget, else the lean paths
    assert resolve_impl(**eg, batch=2, device_type="cuda", budget=need) == "dense"
    assert resolve_impl(**eg, batch=2, device_type="cuda", budget=need - 1) == "sdpa"
    gaussian = dict(mode="gaussian", impl="auto", n=3136, m=784, cq=512, cv=256, batch=2)
    assert resolve_impl(**gaussian, device_type="cuda", budget=need) == "dense"
    assert resolve_impl(**gaussian, device_type="cuda", budget=need - 1) == "chunked"
    # tiny problems on a CPU: the dense path too
    tiny = dict(impl="auto", n=64, m=16, cq=32, cv=32, batch=2)
    assert resolve_impl("embedded_gaussian", **tiny) == resolve_impl("gaussian", **tiny) == "dense"
    assert resolve_impl("embedded_gaussian", **tiny, budget=0) == "chunked"
    # gaussian on a CPU (raw C-channel queries vs C/2 values): dense while it fits, up to 2^26 weights (the
    # chunked path would recompute the C-channel logits); beyond, the chunked path, which needs no padding (SDPA's
    # fused kernels want one head size, so the values would be zero-padded to C channels)
    assert resolve_impl(**gaussian) == resolve_impl(**gaussian, dtype=torch.bfloat16) == "dense"
    assert resolve_impl(**gaussian, budget=need - 1) == "chunked"
    many = CPU_GAUSSIAN_DENSE_MAX_WEIGHTS // (3136 * 784) + 1
    assert resolve_impl(**{**gaussian, "batch": many}) == "chunked"
    # dot product: the dense path only where it does fewer multiply-adds and fits
    assert resolve_impl("dot_product", "auto", 4, 4, 16, 16) == "dense"
    assert resolve_impl("dot_product", "auto", 4, 4, 16, 16, budget=4 * 4 * DENSE_BYTES_PER_WEIGHT - 1) == "linear"
    assert resolve_impl("dot_product", "auto", 3136, 784, 256, 256) == "linear"
    assert resolve_impl("concatenation", "auto", 10, 10, 4, 4) == "sorted"
    assert resolve_impl("dot_product", "dense", 10, 10, 4, 4, budget=0) == "dense"  # a path asked for runs


def test_the_block_plans_once_per_shape_and_follows_its_budget(monkeypatch):
    from nonlocalnet.layers import pairwise, set_memory_budget

    calls = []
    real = pairwise.resolve_impl
    monkeypatch.setattr(pairwise, "resolve_impl", lambda *a, **k: calls.append(k["budget"]) or real(*a, **k))
    block = make_active(NonLocal3d(64, mode="dot_product"))
    x = torch.randn(2, 64, 2, 3, 3)
    for _ in range(3):
        block(x)
    assert len(calls) == 1  # planned on the first call, reused after
    block(torch.randn(1, 64, 2, 3, 3))
    assert len(calls) == 2  # a new shape: planned again
    assert next(iter(block._plans.values())) == "dense"  # 18 x 18 weights, C' = 32: dense does fewer multiply-adds
    try:
        set_memory_budget(0)  # the global setting: no dense matrix anywhere
        block(x)
        assert calls[-1] == 0 and list(block._plans.values())[-1] == "linear"
        own = make_active(NonLocal3d(64, mode="dot_product", memory_budget=1 << 20))
        own(x)
        assert calls[-1] == 1 << 20 and list(own._plans.values())[-1] == "dense"  # the block's own budget wins
    finally:
        set_memory_budget(None)
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes"):
        NonLocal3d(8, memory_budget=-1)


@pytest.mark.parametrize("dim,layout", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_input_keeps_its_layout_and_values(dim, layout, mode):
    block = make_active(NonLocalBlock(8, dim=dim, mode=mode, subsample=2))
    x = torch.randn(SHAPES[dim])
    z_ref, (grad_ref,), p_ref = grads(block, x)
    z, (grad,), p = grads(block, x.contiguous(memory_format=layout))
    assert z.is_contiguous(memory_format=layout)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    for name in p_ref:
        torch.testing.assert_close(p[name], p_ref[name], atol=1e-4, rtol=1e-4)


def test_hooks_on_submodules_run_and_see_their_own_outputs():
    # the norm's output a hook captured is not overwritten by the in-place residual addition
    block = make_active(NonLocal3d(8, subsample=(1, 2, 2)))
    x = torch.randn(2, 8, 3, 4, 4)
    z_plain = block(x)
    seen = {}
    for name in ("theta", "phi", "g", "out", "norm"):
        getattr(block, name).register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
    z = block(x)
    assert set(seen) == {"theta", "phi", "g", "out", "norm"}
    torch.testing.assert_close(z, z_plain)
    torch.testing.assert_close(seen["norm"] + x, z)
    torch.testing.assert_close(block.norm(seen["out"]), seen["norm"])


@pytest.mark.parametrize("norm", [None, "batch"])
def test_hooks_see_wz_y_not_the_residual_sum(norm):
    # the residual is added in place only into a tensor no hook has seen: with norm=None, W_z's own output is
    # what a hook on `out` (or a global module hook) receives, and it must stay W_z·y
    block = NonLocalBlock(8, dim=3, mode="embedded_gaussian", inter_channels=4, norm=norm).eval()
    with torch.no_grad():
        if norm is None:
            block.out.weight.normal_()  # W_z starts at 0 without a norm: make its output visible
        else:
            block.norm.weight.fill_(1.0)
    x = torch.randn(2, 8, 2, 4, 4)
    seen = {}

    def remember(name):
        def hook(module, inputs, output):
            seen[name] = (output, output.clone())  # the tensor itself, and its value when the hook ran

        return hook

    handle = block.out.register_forward_hook(remember("out"))
    z = block(x)
    handle.remove()
    tensor, value = seen["out"]
    assert torch.equal(tensor, value)  # not mutated afterwards by the residual add
    glob = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: (
            seen.__setitem__(type(m).__name__, (o, o.clone())) if m is block.norm or m is block.out else None
        )
    )
    try:
        z2 = block(x)
    finally:
        glob.remove()
    for name in ("Conv3d", type(block.norm).__name__):
        tensor, value = seen[name]
        assert torch.equal(tensor, value), name
    torch.testing.assert_close(z2, z)
    assert not torch.equal(z, x)  # the block is not the identity here, so the checks above can fail


# --- the precision policy under autocast (layers/pairwise.py) -----------------------------------------------------

# written out here, not read from the code: what each path must run in under each autocast dtype
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
POLICY = {
    ("embedded_gaussian", "sdpa"): {BF16: BF16, F16: F16},
    ("embedded_gaussian", "dense"): {BF16: F32, F16: F32},
    ("embedded_gaussian", "chunked"): {BF16: F32, F16: F32},
    ("gaussian", "sdpa"): {BF16: F32, F16: F32},
    ("gaussian", "dense"): {BF16: F32, F16: F32},
    ("gaussian", "chunked"): {BF16: F32, F16: F32},
    ("dot_product", "dense"): {BF16: BF16, F16: F32},
    ("dot_product", "linear"): {BF16: BF16, F16: F32},
    ("concatenation", "dense"): {BF16: BF16, F16: F32},
    ("concatenation", "sorted"): {BF16: BF16, F16: F32},
}


class _SeenBySdpa(torch.overrides.TorchFunctionMode):
    """Records the dtypes of the tensors F.scaled_dot_product_attention is called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen.append(tuple(t.dtype for t in args[:3]))
        return func(*args, **(kwargs or {}))


def test_the_policy_covers_every_path():
    assert set(POLICY) == {(m, i) for m in MODES for i in IMPLS_BY_MODE[m]}


@pytest.mark.parametrize("mode,impl", sorted(POLICY))
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_under_autocast_each_path_runs_in_the_policys_dtype(mode, impl, dtype, monkeypatch):
    from nonlocalnet.layers import pairwise as pairwise_module

    ran = []
    real = pairwise_module.pairwise
    monkeypatch.setattr(
        pairwise_module, "pairwise", lambda q, k, v, *a, **kw: ran.append(q.dtype) or real(q, k, v, *a, **kw)
    )
    block = make_active(NonLocal3d(16, mode=mode, subsample=(1, 2, 2), impl=impl))
    x = torch.randn(2, 16, 2, 4, 4)
    with torch.no_grad(), _SeenBySdpa() as sdpa, torch.autocast("cpu", dtype=dtype):
        z = block(x)
    assert ran == [POLICY[mode, impl][dtype]] and torch.isfinite(z).all()
    # the fused kernels get half precision only where the policy says so: SDPA sees what the step runs in
    assert sdpa.seen == ([(ran[0],) * 3] if impl == "sdpa" else [])


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_the_feature_bank_follows_the_same_policy(dtype):
    from nonlocalnet.layers.feature_bank import FeatureBankLayer

    layer = FeatureBankLayer(16, 12, inter_channels=8).eval()
    x, bank = torch.randn(2, 16, 3), torch.randn(2, 12, 20)
    with torch.no_grad():
        reference = layer(x, bank)
        with _SeenBySdpa() as sdpa, torch.autocast("cpu", dtype=dtype):
            z = layer(x, bank)
    assert sdpa.seen == [(dtype,) * 3]  # "auto" is SDPA here, in half precision, as the block's
    assert (z.float() - reference).abs().max() <= 0.03 * (reference - x).abs().max()


def test_training_calls_of_sdpa_on_cuda_leave_out_cudnn_and_keep_the_users_choices():
    """The backends a training SDPA call allows on CUDA (pairwise_softmax._sdpa_training_backends): the enabled
    ones less cuDNN (whose backward gave NaN on an H200); torch's own choice where cuDNN is off anyway, or is all
    the user left on; the CPU untouched. Backend flags are plain settings: this runs without a GPU."""
    from torch.nn.attention import SDPBackend

    from nonlocalnet.layers.pairwise_softmax import _sdpa_training_backends

    flags = {
        name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
        for name in ("flash", "mem_efficient", "math", "cudnn")
    }

    def enable(**on):
        for name in flags:
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on.get(name, False))

    try:
        enable(flash=True, mem_efficient=True, math=True, cudnn=True)
        assert _sdpa_training_backends("cpu") is None
        assert _sdpa_training_backends("cuda") == [
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
        enable(mem_efficient=True, cudnn=True)  # the user turned flash and math off: they stay off
        assert _sdpa_training_backends("cuda") == [SDPBackend.EFFICIENT_ATTENTION]
        enable(flash=True, math=True)  # cuDNN off: nothing to change
        assert _sdpa_training_backends("cuda") is None
        enable(cudnn=True)  # cuDNN alone: the user's explicit choice
        assert _sdpa_training_backends("cuda") is None
    finally:
        for name, on in flags.items():
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product", "concatenation"])
@pytest.mark.parametrize("position", ["input", "projection"])
def test_stacked_projections_compute_what_the_separate_convs_compute(mode, position, monkeypatch):
    from nonlocalnet.layers import nonlocal_block

    stacked = []
    real = nonlocal_block._conv_stacked
    monkeypatch.setattr(nonlocal_block, "_conv_stacked", lambda convs, t: stacked.append(len(convs)) or real(convs, t))
    block = make_active(NonLocal3d(16, mode=mode, subsample=(1, 2, 2), subsample_position=position))
    x = torch.randn(2, 16, 2, 4, 4, requires_grad=True)
    params = [x, *block.parameters()]

    def run():
        z = block(x)
        return z, torch.autograd.grad((z * torch.linspace(-1, 1, z.numel()).view_as(z)).sum(), params)

    pooled = []
    block.pool.register_forward_hook(lambda *args: pooled.append(1))
    z, grads = run()
    assert stacked == [2 if position == "input" else 3]  # φ, g of the pooled map; or θ, φ, g of x
    assert len(pooled) == 1  # x before the projections; or φ(x) and g(x) side by side in one call
    block.theta.register_forward_hook(lambda *args: None)  # watched: each projection runs as its own module
    z_separate, grads_separate = run()
    assert stacked == [2 if position == "input" else 3]
    torch.testing.assert_close(z, z_separate, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
