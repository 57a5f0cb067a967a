"""The block's window max-pool against torch's max_pool: values, gradients (ties to the first maximum, in scan
order, as max-pool breaks them), remainders, dims, dtypes, and what it keeps for the backward pass."""
import pytest
import torch
import torch.nn.functional as F

from nonlocalnet.layers.pooling import WindowMaxPool

POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def tied(shape, seed=0):
    """Values on a coarse grid with a third of them zero: most windows hold ties, as post-ReLU features do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).double()
    x[torch.rand(shape, generator=g) < 0.33] = 0.0
    return x


@pytest.mark.parametrize("shape,kernel", [
    ((2, 3, 4, 8, 8), (1, 2, 2)),
    ((1, 2, 5, 7, 9), (2, 2, 2)),  # remainders on every axis: dropped, zero gradient
    ((2, 3, 6, 6), (2, 2)),
    ((2, 3, 7, 10), (3, 2)),
    ((2, 4, 9), (2,)),
    ((1, 2, 3, 4, 4), (1, 1, 1)),
])
def test_values_and_gradients_equal_max_pool(shape, kernel):
    x = tied(shape)
    grad = torch.randn(x.shape[:2] + tuple(s // k for s, k in zip(shape[2:], kernel)), dtype=x.dtype)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    expected = POOLS[len(kernel)](a, kernel, kernel)
    got = WindowMaxPool(kernel)(b)
    assert torch.equal(got, expected) and got.is_contiguous()
    expected.backward(grad)
    got.backward(grad)
    assert torch.equal(b.grad, a.grad)  # every window's gradient on the same (first) maximal element


def test_without_grad_and_in_bfloat16():
    x = torch.randn(2, 4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(WindowMaxPool((1, 2, 2))(x), F.max_pool3d(x, (1, 2, 2)))
    xb = tied((2, 4, 3, 6, 6)).bfloat16().requires_grad_()
    xr = xb.detach().clone().requires_grad_()
    WindowMaxPool((1, 2, 2))(xb).sum().backward()
    F.max_pool3d(xr, (1, 2, 2)).sum().backward()
    assert torch.equal(xb.grad, xr.grad)


def test_keeps_no_argmax():
    x = torch.randn(2, 4, 3, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = WindowMaxPool((1, 2, 2))(x)
    assert not any(t.dtype == torch.int64 for t in saved)
    assert [tuple(t.shape) for t in saved] == [tuple(x.shape)]  # x only, as max-pool keeps its input
    assert out.shape == (2, 4, 3, 3, 3)


def test_a_kernel_larger_than_the_map_is_a_clear_error():
    with pytest.raises(ValueError, match=r"subsample kernel \(1, 4, 4\) is larger than the map's spatial size "
                                         r"\(2, 3, 3\)"):
        WindowMaxPool((1, 4, 4))(torch.randn(1, 2, 2, 3, 3))
    with pytest.raises(ValueError, match="2 spatial axes"):
        WindowMaxPool((2, 2))(torch.randn(1, 2, 2, 3, 3))


def test_nan_windows_send_the_gradient_where_max_pool_does():
    x = torch.tensor([[[1.0, float("nan"), 3.0, float("nan"), 2.0, 5.0, float("nan"), float("nan"), 0.0]]])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.max_pool1d(a, 3, 3).sum().backward()
    WindowMaxPool((3,))(b).sum().backward()
    assert torch.equal(b.grad, a.grad)  # the last NaN of each NaN window: [0, 1, 0, 1, 0, 0, 0, 1, 0]


def test_double_backward_vmap_and_in_place_use_of_the_output():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    pool = WindowMaxPool((2, 2))
    for f in (pool, lambda t: F.max_pool2d(t, 2, 2)):  # the same second derivatives as max-pool's
        (g,) = torch.autograd.grad((f(x) ** 2).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        if f is pool:
            got = gg
    torch.testing.assert_close(got, gg)
    per_sample = torch.func.vmap(torch.func.grad(lambda t: (pool(t[None]) ** 3).sum()))(x.detach())
    expected = torch.autograd.grad((F.max_pool2d(x, 2, 2) ** 3).sum(), x)[0]
    torch.testing.assert_close(per_sample, expected)
    out = pool(x)
    out.relu_()  # the output is not kept for the backward pass: in-place use is allowed, as with max-pool
    out.sum().backward()
