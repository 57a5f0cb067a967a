"""``nonlocalnet.add_nonlocal``: non-local blocks after named submodules of any network, identity at the start."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import get_model, resnet18
from torchvision.models.video import r2plus1d_18, r3d_18

import nonlocalnet
from nonlocalnet.layers import NonLocalBlock, find_nonlocal_blocks
from nonlocalnet.models.checkpoints.weights import load_weights, save_weights
from nonlocalnet.models.insert import match_modules


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that eval mode is not a near-identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _check_identity_train_save_load(build, at, x, tmp_path, **options) -> dict[str, NonLocalBlock]:
    """The insertion keeps the outputs exactly (eval and train mode), trains every new parameter within three
    SGD steps, and a safetensors file of the trained model loads into a fresh model with the same insertion."""
    torch.manual_seed(0)
    plain = build()
    _randomise_norms(plain)
    model = nonlocalnet.add_nonlocal(copy.deepcopy(plain), at, verbose=False, **options)
    blocks = find_nonlocal_blocks(model)
    assert blocks
    for mode in (False, True):
        plain.train(mode), model.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)  # the same dropout masks
            expected = plain(x)
            torch.manual_seed(1)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=f"training={mode}")
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    target = torch.randn_like(model(x))
    new = {f"{path}.{name}": p for path, block in blocks.items() for name, p in block.named_parameters()}
    start = {name: p.detach().clone() for name, p in new.items()}
    for _ in range(3):
        optimiser.zero_grad()
        loss = (model(x) - target).square().mean()
        assert loss.isfinite()
        loss.backward()
        optimiser.step()
    # every new parameter is in the graph; every weight moves. Some biases have no gradient by construction: φ's
    # under a softmax over the keys (it shifts every logit of a query alike) and W_z's before a training-mode BN
    # (the batch mean takes it out); they are left out of the "moved" check, as float32 rounding alone moves them
    assert not [name for name, p in new.items() if p.grad is None], "new parameters outside the graph"
    unmoved = [
        name
        for name, p in new.items()
        if not name.endswith("bias") and (torch.equal(p, start[name]) or not p.grad.abs().sum() > 0)
    ]
    assert not unmoved, f"new weights without gradient: {unmoved}"
    model.eval()
    path = tmp_path / "model.safetensors"
    save_weights(model, path)
    fresh = nonlocalnet.add_nonlocal(build(), at, verbose=False, **options).eval()
    load_weights(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    return blocks


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_torchvision_resnets_take_blocks_by_glob_start_as_identity_train_and_reload(arch, tmp_path):
    blocks = _check_identity_train_save_load(
        lambda: get_model(arch, weights=None, num_classes=10),
        ["layer2.[13]", "layer3.4"],
        torch.randn(2, 3, 64, 64),
        tmp_path,
        subsample=2,
    )
    assert {p: (b.in_channels, b.dim) for p, b in blocks.items()} == {
        "layer2.nl1": (512, 2),
        "layer2.nl3": (512, 2),
        "layer3.nl4": (1024, 2),
    }


@pytest.mark.slow
@pytest.mark.parametrize("build", [r3d_18, r2plus1d_18], ids=["r3d_18", "r2plus1d_18"])
def test_torchvision_video_resnets_take_3d_blocks(build, tmp_path):
    blocks = _check_identity_train_save_load(
        lambda: build(num_classes=10),
        "layer[23].1",
        torch.randn(2, 3, 4, 32, 32),
        tmp_path,
        subsample=(1, 2, 2),
        mode="dot_product",
    )
    assert {p: (b.in_channels, b.dim, b.mode) for p, b in blocks.items()} == {
        "layer2.nl1": (128, 3, "dot_product"),
        "layer3.nl1": (256, 3, "dot_product"),
    }


def test_resnet18_block_after_a_residual_block_keeps_outputs_and_trains(tmp_path):
    blocks = _check_identity_train_save_load(
        lambda: resnet18(num_classes=10), "layer3.1", torch.randn(2, 3, 32, 32), tmp_path, norm=None
    )
    assert list(blocks) == ["layer3.nl1"] and blocks["layer3.nl1"].norm_type is None


@pytest.mark.slow
def test_timm_convnext_and_regnet_take_blocks(tmp_path):
    timm = pytest.importorskip("timm")
    blocks = _check_identity_train_save_load(
        lambda: timm.create_model("convnext_atto", num_classes=10),
        "stages.2.blocks.*",
        torch.randn(2, 3, 64, 64),
        tmp_path,
    )
    assert {p: b.in_channels for p, b in blocks.items()} == {f"stages.2.blocks.nl{i}": 160 for i in range(6)}
    blocks = _check_identity_train_save_load(
        lambda: timm.create_model("regnetx_002", num_classes=10), "s3.b[13]", torch.randn(2, 3, 64, 64), tmp_path
    )
    # a RegNet stage calls its blocks by name (not an nn.Sequential): each block is run by a hook
    assert {p: b.in_channels for p, b in blocks.items()} == {"s3.b1.nonlocal_block": 152, "s3.b3.nonlocal_block": 152}


@pytest.mark.slow
def test_pytorchvideo_resnet_takes_blocks_in_its_module_lists(tmp_path):
    resnet = pytest.importorskip("pytorchvideo.models.resnet")

    def build():
        return resnet.create_resnet(
            model_depth=50,
            model_num_class=10,
            head_pool_kernel_size=(1, 2, 2),
            stem_conv_kernel_size=(1, 7, 7),
            stage1_pool=None,
        )

    blocks = _check_identity_train_save_load(
        build, "blocks.[23].res_blocks.1", torch.randn(2, 3, 4, 64, 64), tmp_path, subsample=(1, 2, 2)
    )
    # res_blocks is a ModuleList its stage loops over: the block lives in the residual block, run by a hook
    assert {p: (b.in_channels, b.dim) for p, b in blocks.items()} == {
        "blocks.2.res_blocks.1.nonlocal_block": (512, 3),
        "blocks.3.res_blocks.1.nonlocal_block": (1024, 3),
    }


class _Loop(nn.Module):
    """A network whose stages are a ModuleList it loops over, and an activation at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
                nn.Sequential(nn.Conv2d(8, 6, 1), nn.ReLU()),
            ]
        )
        self.act = nn.Tanh()

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.act(x)


def test_each_wiring_runs_the_block_once_after_its_module():
    model = _Loop()
    model, report = nonlocalnet.add_nonlocal(
        model,
        ["stages.0", "stages.1.0", "act"],
        verbose=False,
        return_report=True,
        example_input=torch.randn(1, 3, 5, 5),
    )
    assert [(i.after, i.block, i.channels, i.how) for i in report.insertions] == [
        ("stages.0", "stages.0.nonlocal_block", 8, "last child"),
        ("stages.1.0", "stages.1.nl0", 6, "sibling"),
        ("act", "act.nonlocal_block", 6, "hook"),
    ]
    calls = []
    for path in find_nonlocal_blocks(model):
        model.get_submodule(path).register_forward_hook(lambda m, a, o, path=path: calls.append(path))
    model(torch.randn(1, 3, 5, 5))
    assert calls == ["stages.0.nonlocal_block", "stages.1.nl0", "act.nonlocal_block"]


def test_the_report_says_what_went_where(capsys):
    nonlocalnet.add_nonlocal(resnet18(), "layer3.1", mode="dot_product")
    out = capsys.readouterr().out
    assert "add_nonlocal: 1 non-local block(s) (mode='dot_product')" in out
    assert out.splitlines()[2].split() == ["layer3.1", "layer3.nl1", "256", "2", "structure", "sibling"]


def test_globs_match_one_path_segment_at_a_time():
    model = resnet18()
    assert match_modules(model, ["layer3.*"]) == ["layer3.0", "layer3.1"]
    assert match_modules(model, ["layer[12].[1]", "layer4.0.conv?"]) == [
        "layer1.1",
        "layer2.1",
        "layer4.0.conv1",
        "layer4.0.conv2",
    ]
    nonlocalnet.add_nonlocal(model, "layer3.0", verbose=False)
    assert match_modules(model, ["layer3.*"]) == ["layer3.0", "layer3.1"]  # nor blocks nor their insides


def test_a_path_that_matches_nothing_names_the_closest_modules():
    with pytest.raises(
        ValueError,
        match=r"no module of ResNet matches 'layer3\.7'; the closest module names: "
        r"layer3\.1, layer3\.0, layer3,",
    ):
        nonlocalnet.add_nonlocal(resnet18(), ["layer3.1", "layer3.7"])
    with pytest.raises(ValueError, match=r"'layers\.1'; the closest module names: layer4\.1, layer3\.1, "):
        nonlocalnet.add_nonlocal(resnet18(), "layers.1")


def test_unknown_or_worked_out_options_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown non-local block option 'sub_sample' \(did you mean 'subsample'"):
        nonlocalnet.add_nonlocal(resnet18(), "layer3.1", sub_sample=True)
    with pytest.raises(ValueError, match="works out in_channels"):
        nonlocalnet.add_nonlocal(resnet18(), "layer3.1", in_channels=256)
    with pytest.raises(ValueError, match="unknown norm 'group'"):  # the block's own check, before any change
        model = resnet18()
        nonlocalnet.add_nonlocal(model, "layer3.1", norm="group")
    assert not find_nonlocal_blocks(model)


def test_a_module_without_conv_needs_an_example_input_whose_dry_run_leaves_no_trace():
    model = resnet18()
    with pytest.raises(ValueError, match=r"relu \(ReLU\) has no convolution.*pass example_input="):
        nonlocalnet.add_nonlocal(model, "relu")
    model.train()
    before = copy.deepcopy(model.state_dict())
    nonlocalnet.add_nonlocal(model, ["relu", "maxpool"], example_input=torch.randn(2, 3, 32, 32), verbose=False)
    assert {p: b.in_channels for p, b in find_nonlocal_blocks(model).items()} == {
        "relu.nonlocal_block": 64,
        "maxpool.nonlocal_block": 64,
    }
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # BN statistics untouched by the dry run
    with pytest.raises(ValueError, match=r"fc returns a tensor of shape \(2, 1000\)"):
        nonlocalnet.add_nonlocal(model, "fc", example_input=torch.randn(2, 3, 32, 32))


def test_a_module_already_followed_by_a_block_is_refused():
    model = nonlocalnet.add_nonlocal(_Loop(), ["stages.0", "act"], verbose=False, example_input=torch.randn(1, 3, 4, 4))
    with pytest.raises(
        ValueError,
        match=r"stages\.0 is already followed by a non-local block "
        r"\(stages\.0\.nonlocal_block\)",
    ):
        nonlocalnet.add_nonlocal(model, "stages.0", verbose=False)
    with pytest.raises(ValueError, match=r"act is already followed"):  # refused before stages.1.0 gets one
        nonlocalnet.add_nonlocal(model, ["stages.1.0", "act"], verbose=False, example_input=torch.randn(1, 3, 4, 4))
    assert sorted(find_nonlocal_blocks(model)) == ["act.nonlocal_block", "stages.0.nonlocal_block"]
    with pytest.raises(
        ValueError,
        match=r"stages is a ModuleList, a container that is never called itself; name "
        r"the modules inside it \(stages\.\*\)",
    ):
        nonlocalnet.add_nonlocal(model, "stages", verbose=False)
    with pytest.raises(
        ValueError,
        match=r"the example input's forward never ran stages: a block after it would "
        r"never run either",
    ):
        nonlocalnet.add_nonlocal(model, "stages", verbose=False, example_input=torch.randn(1, 3, 4, 4))


def test_blocks_take_the_dtype_of_the_module_they_follow():
    model = resnet18().double().eval()
    nonlocalnet.add_nonlocal(model, "layer2.0", verbose=False)
    assert model.layer2.nl0.theta.weight.dtype == torch.float64
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
