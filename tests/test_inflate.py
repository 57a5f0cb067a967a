"""2D -> 3D inflation: a clip of one repeated frame through the inflated network gives the 2D network's features."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.resnet import Bottleneck, ResNet

from nonlocalnet.models import ResNet3d, create_model
from nonlocalnet.models.checkpoints.inflate import inflate_2d_weights, torchvision_name


def randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that a wrong BN mapping shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return net.eval()


def features_2d(net: ResNet, image: torch.Tensor) -> torch.Tensor:
    """torchvision's res5 (layer4) map of an image batch (B, 3, H, W)."""
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def assert_same_features(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, judged against the features' magnitude (deep random nets reach 1e3)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def repeated(image: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, 3, H, W) -> a clip (B, 3, T, H, W) of one repeated frame."""
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()


@pytest.fixture(scope="module")
def small_2d():
    """A torchvision ResNet with the ResNet-50 block layout, 2 blocks a stage (fast)."""
    torch.manual_seed(0)
    return randomise_bn(ResNet(Bottleneck, [2, 2, 2, 2]))


def test_names_map_to_torchvision():
    assert torchvision_name("conv1.weight") == "conv1.weight"
    assert torchvision_name("res4.2.conv_a.weight") == "layer3.2.conv1.weight"
    assert torchvision_name("res5.1.bn_c.running_var") == "layer4.1.bn3.running_var"
    assert torchvision_name("res2.0.shortcut.conv.weight") == "layer1.0.downsample.0.weight"
    assert torchvision_name("res2.0.shortcut.bn.bias") == "layer1.0.downsample.1.bias"
    assert torchvision_name("head.fc.weight") == "fc.weight"
    assert torchvision_name("res4.nl3.theta.weight") is None


@pytest.mark.parametrize("clip,frames", [("32x2", 16), ("8x8", 4)])
def test_inflated_c2d_reproduces_the_2d_features_at_every_frame(small_2d, clip, frames):
    model = ResNet3d((2, 2, 2, 2), arch="c2d", clip=clip, num_classes=1000).eval()
    report = inflate_2d_weights(model, small_2d.state_dict())
    assert report.inflated == [] and "head.fc.weight" in report.copied  # 1-frame kernels, 1000 classes
    image = torch.randn(2, 3, 64, 64)
    expected = features_2d(small_2d, image)  # (B, 2048, 2, 2)
    with torch.no_grad():
        got = model.forward_features(repeated(image, frames))  # (B, 2048, T', 2, 2)
    assert got.shape[2] == (frames // 8 if clip == "32x2" else frames // 2)
    assert_same_features(got, expected[:, :, None].expand_as(got))


@pytest.mark.parametrize("arch", ["i3d", "i3d_3x3x3"])
@pytest.mark.parametrize("clip,frames", [("32x2", 96), ("8x8", 24)])
def test_inflated_i3d_reproduces_the_2d_features_away_from_the_clip_ends(small_2d, arch, clip, frames):
    # each temporal slice is W / t, so a static clip gives the 2D response wherever a temporal kernel sees only
    # frames of the clip; zero padding cuts the kernels at the two ends, so the clip is long enough that the
    # middle res5 frames' receptive fields lie inside it
    model = ResNet3d((2, 2, 2, 2), arch=arch, clip=clip, num_classes=10).eval()
    report = inflate_2d_weights(model, small_2d.state_dict())
    assert "conv1.weight" in report.inflated and "head.fc.weight" in report.kept
    assert model.conv1.weight.shape[2] == 5
    torch.testing.assert_close(model.conv1.weight.sum(dim=2), small_2d.conv1.weight)
    image = torch.randn(1, 3, 32, 32)
    expected = features_2d(small_2d, image)  # (1, 2048, 1, 1)
    with torch.no_grad():
        got = model.forward_features(repeated(image, frames))  # (1, 2048, 12, 1, 1)
    middle = got.shape[2] // 2
    assert_same_features(got[:, :, middle - 1 : middle + 1], expected[:, :, None].expand(-1, -1, 2, -1, -1))


def test_nonlocal_blocks_keep_their_init_so_the_nl_model_matches_the_baseline(small_2d):
    base = ResNet3d((2, 2, 2, 2), arch="c2d", num_classes=10).eval()
    nl = ResNet3d((2, 2, 2, 2), arch="c2d", num_classes=10, nonlocal_locations={"res3": (0, 1), "res4": (1,)}).eval()
    inflate_2d_weights(base, small_2d.state_dict())
    report = inflate_2d_weights(nl, small_2d.state_dict())
    assert {k.split(".")[1] for k in report.kept if k.startswith("res")} == {"nl0", "nl1"}
    clip = repeated(torch.randn(1, 3, 64, 64), 16) + 0.1 * torch.randn(1, 3, 16, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nl.forward_features(clip), base.forward_features(clip))


def test_mismatched_networks_are_clear_errors(small_2d):
    with pytest.raises(ValueError, match="same depth"):
        inflate_2d_weights(ResNet3d((3, 2, 2, 2)), small_2d.state_dict())
    with pytest.raises(ValueError, match="no place in the model"):
        inflate_2d_weights(ResNet3d((1, 2, 2, 2)), small_2d.state_dict())
    with pytest.raises(ValueError, match="shape"):
        inflate_2d_weights(ResNet3d((2, 2, 2, 2), width=32), small_2d.state_dict())


def test_real_resnet50_inflates_into_c2d_r50_exactly():
    torch.manual_seed(0)
    net = randomise_bn(resnet50())
    model = create_model("c2d_r50_8x8", num_classes=1000).eval()
    inflate_2d_weights(model, net.state_dict())
    image = torch.randn(1, 3, 64, 64)
    expected = features_2d(net, image)
    with torch.no_grad():
        got = model.forward_features(repeated(image, 4))
    assert_same_features(got, expected[:, :, None].expand_as(got))
    with torch.no_grad():  # and the whole network: the same classifier on the same features
        assert_same_features(model(repeated(image, 4)), net(image))


@pytest.mark.slow
@pytest.mark.parametrize("builder,name,frames", [(resnet50, "nl_i3d_r50_8x8", 48), (resnet101, "nl_i3d_r101_8x8", 96)])
def test_real_resnets_inflate_into_nl_i3d(builder, name, frames):
    # frames: enough that the middle res5 frames' temporal receptive field (R50 36 frames, R101 72) fits inside
    torch.manual_seed(0)
    net = randomise_bn(builder())
    model = create_model(name).eval()
    report = inflate_2d_weights(model, net.state_dict())
    assert "head.fc.weight" in report.kept and "fc.weight" in report.unused  # 1000 ImageNet classes vs 400
    image = torch.randn(1, 3, 32, 32)
    expected = features_2d(net, image)
    with torch.no_grad():
        got = model.forward_features(repeated(image, frames))
    middle = got.shape[2] // 2
    assert_same_features(got[:, :, middle - 1 : middle + 1], expected[:, :, None].expand(-1, -1, 2, -1, -1))
