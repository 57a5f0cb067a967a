"""Starting weights (model.pretrained): every route the paper's recipes take, and the refusals."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from nonlocalnet.layers import NonLocalBlock
from nonlocalnet.models import PretrainedMismatch, create_model, load_pretrained, save_weights

SMALL = dict(layers=(2, 4, 6, 2), width=4, num_classes=5)


def trained_like(model):
    """Random values in every tensor, BN statistics and the blocks' γ included (a fresh model hides mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture
def clip():
    return torch.randn(2, 3, 8, 32, 32)


def test_the_same_models_checkpoint_loads_exactly(tmp_path, caplog):
    source = trained_like(create_model("nl_i3d_r50", **SMALL))
    save_weights(source, tmp_path / "w.safetensors")
    model = create_model("nl_i3d_r50", **SMALL)
    with caplog.at_level(logging.INFO, logger="nonlocalnet"):
        report = load_pretrained(model, tmp_path / "w.safetensors")
    assert report.kind == "same model" and report.fresh == [] and report.folded == []
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert "(same model)" in caplog.text


def test_another_class_count_keeps_the_models_classifier(tmp_path):
    save_weights(trained_like(create_model("i3d_r50", **SMALL)), tmp_path / "k400.safetensors")
    model = create_model("i3d_r50", **{**SMALL, "num_classes": 7})
    head = model.head.fc.weight.clone()
    report = load_pretrained(model, tmp_path / "k400.safetensors")
    assert report.fresh == ["head.fc.bias", "head.fc.weight"] and torch.equal(model.head.fc.weight, head)


def test_a_torchvision_resnet_is_inflated(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # statistics and affine parameters unlike the defaults both networks start with
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_()
    torch.save(resnet.state_dict(), tmp_path / "r50.pth")
    model = create_model("i3d_r50", num_classes=400)
    report = load_pretrained(model, tmp_path / "r50.pth")
    assert report.kind == "2D inflated"
    kt = model.conv1.weight.shape[2]
    torch.testing.assert_close(model.conv1.weight, resnet.conv1.weight.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt)
    for part in ("running_mean", "running_var", "weight", "bias"):
        assert torch.equal(getattr(model.res4[5].bn_c, part), getattr(resnet.layer3[5].bn3, part)), part
    conv_b = model.res4[5].conv_b.weight  # a 1x3x3 conv: the 2D kernel itself, nothing to spread over time
    torch.testing.assert_close(conv_b[:, :, 0], resnet.layer3[5].conv2.weight)


def test_the_baseline_starts_its_nl_model_whose_blocks_stay_the_identity(tmp_path, clip):
    baseline = trained_like(create_model("i3d_r50", **SMALL))
    save_weights(baseline, tmp_path / "i3d.safetensors")
    model = create_model("nl_i3d_r50", **SMALL)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, NonLocalBlock)}
    report = load_pretrained(model, tmp_path / "i3d.safetensors")
    assert report.kind == "without non-local blocks"
    assert {k.rsplit(".", 2)[0] for k in report.fresh if ".nl" in k} == set(blocks)
    with torch.no_grad():
        assert torch.equal(model.eval()(clip), baseline(clip))  # z = x exactly while γ = 0


def test_nl_bn_is_folded_into_wz_of_blocks_without_norm(tmp_path, clip):
    source = trained_like(create_model("nl_i3d_r50", **SMALL))
    save_weights(source, tmp_path / "nl.safetensors")
    model = create_model("nl_i3d_r50", **SMALL, nonlocal_options={"norm": None})
    report = load_pretrained(model, tmp_path / "nl.safetensors")
    assert report.kind == "non-local BN folded" and report.folded == [
        "res3.nl1",
        "res3.nl3",
        "res4.nl1",
        "res4.nl3",
        "res4.nl5",
    ]
    block, folded = source.res4.nl3, model.res4.nl3
    x = torch.randn(2, block.in_channels, 4, 4, 4)
    with torch.no_grad():
        term = block(x) - x  # the non-local term BN(W_z y), what the fold must preserve
        torch.testing.assert_close(folded.eval()(x) - x, term, atol=1e-5 * term.abs().max().item(), rtol=0)
        expected = source(clip)
        torch.testing.assert_close(model.eval()(clip), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_the_128_frame_model_starts_from_either_32_frame_model(tmp_path):
    save_weights(trained_like(create_model("nl_i3d_r50", **SMALL)), tmp_path / "nl.safetensors")
    save_weights(trained_like(create_model("i3d_r50", **SMALL)), tmp_path / "i3d.safetensors")
    folded = load_pretrained(create_model("nl_i3d_r50_128x1", **SMALL), tmp_path / "nl.safetensors")
    assert folded.kind == "non-local BN folded" and folded.fresh == []
    assert folded.folded == ["res3.nl1", "res3.nl3", "res4.nl1", "res4.nl3", "res4.nl5"]
    fresh = load_pretrained(create_model("nl_i3d_r50_128x1", **SMALL), tmp_path / "i3d.safetensors")
    assert fresh.kind == "without non-local blocks" and fresh.folded == []
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in fresh.fresh}) == folded.folded


def test_files_that_do_not_fit_are_refused_with_the_mismatch_named(tmp_path):
    model = create_model("nl_i3d_r50", **SMALL)
    cases = {
        "deeper": (
            create_model("nl_i3d_r50", **{**SMALL, "layers": (2, 4, 8, 2)}).state_dict(),
            r"another depth: res4 has 8 residual blocks in the file, 6 in the model",
        ),
        "wider": (
            create_model("nl_i3d_r50", **{**SMALL, "width": 8}).state_dict(),
            r"another width or kernel: .* e\.g\. conv1\.weight is \(8, 3, 5, 7, 7\) in the file, "
            r"\(4, 3, 5, 7, 7\) in the model",
        ),
        "c2d": (create_model("nl_c2d_r50", **SMALL).state_dict(), r"another width or kernel"),
        "not_resnet": ({"encoder.weight": torch.zeros(3)}, r"not a ResNet state dict .*encoder\.weight"),
        "other_mode": (
            create_model("nl_i3d_r50", **SMALL, nonlocal_options={"mode": "concatenation"}).state_dict(),
            r"tensor\(s\) the model lacks: res3\.nl1\.concat_project\.0\.weight",
        ),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(PretrainedMismatch, match=message):
            load_pretrained(model, tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_pretrained(model, tmp_path / "missing.pt")


def test_a_file_without_classifier_and_a_frozen_bn_file_start_a_model(tmp_path):
    from nonlocalnet.models import freeze_batchnorm

    source = trained_like(create_model("i3d_r50", **SMALL))
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pt")  # as convert-caffe2 --skip-classifier writes
    model = create_model("i3d_r50", **SMALL)
    head = model.head.fc.weight.clone()
    report = load_pretrained(model, tmp_path / "backbone.pt")
    assert report.fresh == ["head.fc.weight", "head.fc.bias"] and torch.equal(model.head.fc.weight, head)
    assert torch.equal(model.res4[2].conv_b.weight, source.res4[2].conv_b.weight)
    # a run trained with train.freeze_bn saves no BN step counters; its weights start a plain-BN model
    save_weights(freeze_batchnorm(trained_like(create_model("i3d_r50", **SMALL))), tmp_path / "frozen.safetensors")
    model = create_model("i3d_r50", **SMALL)
    assert load_pretrained(model, tmp_path / "frozen.safetensors").kind == "same model"
    assert torch.equal(model.bn1.running_var, source.bn1.running_var)  # the same trained_like values


@pytest.mark.parametrize(
    "name, fresh_modules",
    [
        ("c2d_r50_8x8", ["head.fc"]),
        ("nl_i3d_r50_8x8", ["res3.nl1", "res3.nl3", "res4.nl1", "res4.nl3", "res4.nl5", "head.fc"]),
    ],
)
def test_the_imagenet_start_reports_every_backbone_tensor_loaded_and_only_new_ones_fresh(
    tmp_path, caplog, name, fresh_modules
):
    # torchvision's ResNet-50 has 320 entries: 318 without its 1000-class fc. All 318 reach the model, the 1x1
    # convs and BNs copied as they are, the temporal kernels inflated; fresh are only the 400-class fc (2 tensors)
    # and each non-local block's 12 (θ, φ, g, W_z weights and biases, BN weight, bias, mean, var).
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50_torchvision.pth")
    model = create_model(name)
    with caplog.at_level(logging.INFO, logger="nonlocalnet"):
        report = load_pretrained(model, tmp_path / "resnet50_torchvision.pth")
    assert report.kind == "2D inflated"
    assert len(report.loaded) == 318
    assert len(report.fresh) == 2 + 12 * (len(fresh_modules) - 1)
    assert set(report.loaded) | set(report.fresh) == {
        k for k in model.state_dict() if not (".nl" in k and k.endswith("num_batches_tracked"))
    }
    assert f"318 tensors loaded, {len(report.fresh)} initialised fresh" in caplog.text
    assert f"initialised fresh (not in the file): {', '.join(fresh_modules)}" in caplog.text
