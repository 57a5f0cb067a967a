"""``nonlocalnet.swap_nonlocal``: other frameworks' non-local blocks, built by their own packages with random
weights, replaced by ours: the same outputs (eval and train mode), input gradients and BN statistic updates.

Tolerances: float64 rtol 1e-9 / atol 1e-10 (the order of summation differs); float32 rtol 1e-4 / atol 1e-5 (1e-4 on
gradients); atol is relative to the largest value where that exceeds one. The peers (mmcv-lite, pytorchvideo, timm,
mmaction2, slowfast) are installed in CI's environment with peers; elsewhere these tests skip.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nonlocalnet
from nonlocalnet.layers import NonLocalBlock
from nonlocalnet.models.swap import SwapReport

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}
GRAD_TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Every parameter and BN statistic random (γ and W_z nonzero: the block is far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.add_(1.0)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: dict[str, float]) -> None:
    """Close within ``tolerance``, its atol scaled by the largest value where that exceeds one (deep networks at
    random weights grow their activations)."""
    scale = max(1.0, theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale)


def _holder(block: nn.Module, channels: int, dim: int) -> nn.Sequential:
    """A model holding the block after a conv, as a network would."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return nn.Sequential(conv(3, channels, 1), block)


def _check_same_function(
    model: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    gradients: bool = True,
    tolerance: dict[str, float] | None = None,
) -> SwapReport:
    """Swaps ``model`` and compares it with a copy of the original in eval and train mode (outputs, the gradient
    with respect to the input unless ``gradients`` is False, BN statistics)."""
    model = model.to(dtype)
    original = copy.deepcopy(model)
    report = nonlocalnet.swap_nonlocal(model)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for training in (False, True):
        model.train(training), original.train(training)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((model, original), xs)]
        _assert_close(outs[0], outs[1], tolerance or TOLERANCE[dtype])
        if not gradients:
            continue
        weight = torch.randn(outs[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
        for out in outs:
            (out * weight).sum().backward()
        _assert_close(xs[0].grad, xs[1].grad, tolerance or GRAD_TOLERANCE[dtype])
    for path in report.swapped:  # the train-mode steps moved the same BN statistics
        ours = model.get_submodule(path).norm
        theirs = [m for m in original.get_submodule(path).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if theirs:
            torch.testing.assert_close(ours.running_mean, theirs[0].running_mean, **TOLERANCE[dtype])
            torch.testing.assert_close(ours.running_var, theirs[0].running_var, **TOLERANCE[dtype])
    return report


# --- mmcv -------------------------------------------------------------------------------------------------------

MMCV_CASES = [  # (dim, options): every mode, with and without sub_sample, scale and norm
    (2, dict(mode="embedded_gaussian")),
    (2, dict(mode="embedded_gaussian", use_scale=False, sub_sample=True, norm_cfg=dict(type="BN"))),
    (3, dict(mode="embedded_gaussian", use_scale=False, sub_sample=True, norm_cfg=dict(type="BN3d"))),
    (3, dict(mode="dot_product", sub_sample=True, norm_cfg=dict(type="BN3d"))),
    (3, dict(mode="gaussian", sub_sample=True)),
    (2, dict(mode="gaussian", norm_cfg=dict(type="BN", eps=1e-3, momentum=0.3))),
    (2, dict(mode="concatenation", sub_sample=True, norm_cfg=dict(type="BN"))),
    (1, dict(mode="dot_product", sub_sample=True, reduction=4)),
]
SHAPES = {1: (2, 3, 12), 2: (2, 3, 6, 8), 3: (2, 3, 4, 6, 4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "dim,options", MMCV_CASES, ids=[f"{d}d-{o['mode']}-{i}" for i, (d, o) in enumerate(MMCV_CASES)]
)
def test_mmcv_blocks_swap_to_the_same_function(dim, options, dtype):
    bricks = pytest.importorskip("mmcv.cnn.bricks.non_local")
    block = getattr(bricks, f"NonLocal{dim}d")(16, **options)
    _randomise(block)
    # mmcv's concatenation divides its in-place ReLU's output in place, so its own backward pass fails: outputs only
    report = _check_same_function(
        _holder(block, 16, dim), SHAPES[dim], dtype, gradients=options["mode"] != "concatenation"
    )
    assert report.swapped == ["1"] and not report.left
    ours = report.model[1]
    assert isinstance(ours, NonLocalBlock) and ours.mode == options["mode"]
    assert ours.inter_channels == 16 // options.get("reduction", 2)
    use_scale = options.get("use_scale", True) and options["mode"] == "embedded_gaussian"
    assert ours.scale == (ours.inter_channels**-0.5 if use_scale else 1.0)
    assert (ours.subsample is not None) == options.get("sub_sample", False)
    assert ours.norm_type == ("batch" if "norm_cfg" in options else None)
    # the same parameters train: W_z has a bias exactly where mmcv's conv_out has one (none before a norm)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in block.parameters())


def test_mmcv_blocks_with_norms_ours_lacks_are_left_with_the_reason():
    bricks = pytest.importorskip("mmcv.cnn.bricks.non_local")
    model = nn.Sequential(
        bricks.NonLocal2d(16, norm_cfg=dict(type="GN", num_groups=4)),
        bricks.NonLocal2d(16, sub_sample=True),
        nn.Sequential(bricks.NonLocal2d(16)),
    )
    report = nonlocalnet.swap_nonlocal(model)
    assert report.swapped == ["1", "2.0"]
    assert report.left == {"0": "the norm of its conv_out is a GroupNorm; ours reproduces only BatchNorm2d or no norm"}
    assert type(model[0]).__name__ == "NonLocal2d" and isinstance(model[1], NonLocalBlock)
    assert "3 non-local block(s) found, 2 swapped, 1 left" in str(report)


def test_a_subclass_of_a_recognised_block_is_left_in_place():
    bricks = pytest.importorskip("mmcv.cnn.bricks.non_local")

    class Mine(bricks.NonLocal2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Mine(8))
    report = nonlocalnet.swap_nonlocal(model)
    assert report.left == {"0": "a subclass of mmcv.cnn.bricks.non_local.NonLocal2d, whose forward may differ from it"}
    assert isinstance(model[0], Mine)


def test_mmaction2_nl_i3d_swaps_every_block_to_the_same_function():
    from .test_zoo_convert import _mmaction2_resnet3d

    resnet3d, _ = _mmaction2_resnet3d()
    net = resnet3d(
        depth=50,
        pretrained=None,
        base_channels=8,
        non_local=((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0)),
        non_local_cfg=dict(
            sub_sample=True, use_scale=False, norm_cfg=dict(type="BN3d", requires_grad=True), mode="embedded_gaussian"
        ),
    )
    net.init_weights()
    for i, block in enumerate(m for m in net.modules() if type(m).__name__ == "NonLocal3d"):
        _randomise(block, seed=i)  # random weights, nonzero γ: each block changes what passes through it
    # a whole ResNet-50 at random weights: each block's summation-order differences (1e-15) grow block after block
    report = _check_same_function(net, (1, 3, 8, 32, 32), torch.float64, tolerance=dict(rtol=1e-7, atol=1e-8))
    assert report.swapped == [
        "layer2.1.non_local_block",
        "layer2.3.non_local_block",
        "layer3.1.non_local_block",
        "layer3.3.non_local_block",
        "layer3.5.non_local_block",
    ]


# --- PyTorchVideo, timm, PySlowFast ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "options",
    [
        dict(instantiation="softmax", pool_size=(1, 2, 2)),
        dict(instantiation="dot_product", pool_size=(2, 2, 1), norm=None),
        dict(instantiation="softmax", norm_eps=1e-3, norm_momentum=0.5),
    ],
    ids=["softmax-pool", "dot-nonorm", "softmax-eps"],
)
def test_pytorchvideo_blocks_swap_to_the_same_function(options, dtype):
    nonlocal_net = pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    block = nonlocal_net.create_nonlocal(dim_in=12, dim_inner=6, **options)
    _randomise(block)
    report = _check_same_function(_holder(block, 12, 3), (2, 3, 4, 6, 4), dtype)
    ours = report.model[1]
    assert report.swapped == ["1"] and ours.subsample_position == "input"
    assert ours.mode == {"softmax": "embedded_gaussian", "dot_product": "dot_product"}[options["instantiation"]]


def test_pytorchvideo_blocks_with_an_average_pool_are_left():
    nonlocal_net = pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    block = nonlocal_net.create_nonlocal(dim_in=8, dim_inner=4)
    block.pool = nn.AvgPool3d((1, 2, 2))
    report = nonlocalnet.swap_nonlocal(nn.Sequential(block))
    assert report.left == {"0": "its pool is a AvgPool3d; ours subsamples by max-pooling only"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("use_scale", [True, False])
def test_timm_blocks_swap_to_the_same_function(use_scale, dtype):
    non_local_attn = pytest.importorskip("timm.layers.non_local_attn")
    block = non_local_attn.NonLocalAttn(16, use_scale=use_scale, rd_channels=8)
    _randomise(block)
    report = _check_same_function(_holder(block, 16, 2), (2, 3, 6, 8), dtype)
    assert report.model[1].scale == (16**-0.5 if use_scale else 1.0)  # C^-0.5: timm scales by C, not C'


@pytest.mark.parametrize("norm_type", ["batchnorm", "none"])
def test_pyslowfast_blocks_swap_to_the_same_function(norm_type):
    helper = pytest.importorskip("slowfast.models.nonlocal_helper")
    block = helper.Nonlocal(12, 6, pool_size=(1, 2, 2), norm_type=norm_type)
    _randomise(block)
    report = _check_same_function(_holder(block, 12, 3), (2, 3, 4, 6, 4), torch.float64)
    assert report.swapped == ["1"]


# --- what the report measures --------------------------------------------------------------------------------


def test_measure_reports_a_step_before_and_after_and_leaves_no_trace():
    bricks = pytest.importorskip("mmcv.cnn.bricks.non_local")
    block = bricks.NonLocal2d(16, sub_sample=True, norm_cfg=dict(type="BN"))
    _randomise(block)
    model = _holder(block, 16, 2).train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    report = nonlocalnet.swap_nonlocal(model, measure=x, repeats=2)
    m = report.measurement
    assert m.repeats == 2 and m.before_ms > 0 and m.after_ms > 0 and m.before_peak_mb is None
    # what the conv and mmcv's block save for backward: at least the (2, 3, 8, 8) input x and the 16-channel map
    assert m.before_saved_mb >= (2 * 3 * 64 + 2 * 16 * 64) * 4 / 2**20
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert torch.equal(after["0.weight"], state["0.weight"])
    assert torch.equal(after["1.norm.running_mean"], state["1.conv_out.bn.running_mean"])
