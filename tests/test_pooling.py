"""The block's window max-pool against torch's max_pool: values on tie-heavy inputs, remainders, dims and
dtypes without gradients; torch's own max-pool where a gradient is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nonlocalnet.layers.pooling import WindowMaxPool

POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def tied(shape, seed=0):
    """Values on a coarse grid with a third of them zero (and some NaN): most windows hold ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).double()
    x[torch.rand(shape, generator=g) < 0.33] = 0.0
    x.view(-1)[::37] = float("nan")
    return x


@pytest.mark.parametrize(
    "shape,kernel",
    [
        ((2, 3, 4, 8, 8), (1, 2, 2)),
        ((1, 2, 5, 7, 9), (2, 2, 2)),  # remainders on every axis: dropped, as max-pool drops them
        ((2, 3, 6, 6), (2, 2)),
        ((2, 3, 7, 10), (3, 2)),
        ((2, 4, 9), (2,)),
        ((1, 2, 3, 4, 4), (1, 1, 1)),
    ],
)
def test_values_equal_max_pool(shape, kernel):
    x = tied(shape)
    with torch.no_grad():
        got = WindowMaxPool(kernel)(x)
    expected = POOLS[len(kernel)](x, kernel, kernel)
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0)) and got.is_contiguous()
    assert torch.equal(got.isnan(), expected.isnan())
    xb = tied(shape).bfloat16()
    with torch.no_grad():
        assert torch.equal(
            WindowMaxPool(kernel)(xb).nan_to_num(7.0), POOLS[len(kernel)](xb, kernel, kernel).nan_to_num(7.0)
        )


def test_training_runs_torch_max_pool():
    x = torch.randn(2, 4, 3, 6, 6, requires_grad=True)
    out = WindowMaxPool((1, 2, 2))(x)
    assert "MaxPool3D" in type(out.grad_fn).__name__  # its gradient, ties and NaN windows as max-pool's
    out.sum().backward()
    assert x.grad.sum().item() == out.numel()


def test_a_kernel_larger_than_the_map_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"subsample kernel \(1, 4, 4\) is larger than the map's spatial size "
        r"\(2, 3, 3\)",
    ):
        with torch.no_grad():
            WindowMaxPool((1, 4, 4))(torch.randn(1, 2, 2, 3, 3))
    with pytest.raises(ValueError, match="2 spatial axes"):
        WindowMaxPool((2, 2))(torch.randn(1, 2, 2, 3, 3))
