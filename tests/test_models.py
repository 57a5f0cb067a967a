"""The paper's video networks: parameter counts, Table 1 sizes, the registry, the timm-like interface, frozen BN,
weights files, torch.hub, tracing, export and compile."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from nonlocalnet.io import UnreadableFile
from nonlocalnet.layers import NonLocalBlock
from nonlocalnet.models import (
    PAPER_32X2,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    ResNet3d,
    create_model,
    freeze_batchnorm,
    list_models,
    load_weights,
    model_defaults,
    register_model,
    save_weights,
)
from nonlocalnet.models.placements import min_layers

REPO = Path(__file__).resolve().parents[1]

# PAPER.md section 2, 400 classes
PAPER_PARAMS = {
    "c2d_r50": 24_327_632,
    "nl1_c2d_r50": 26_429_392,
    "nl_c2d_r50": 31_686_096,
    "nl10_c2d_r50": 39_044_560,
    "i3d_r50": 28_043_472,
    "nl_i3d_r50": 35_401_936,
    "c2d_r101": 43_319_760,
    "nl_i3d_r101": 59_112_656,
}

# Table 1 (and its 8x8 and 128-frame variants): (C, T, H, W) after each layer of an R50 at 224x224
TABLE1_32X2 = {
    "conv1": (64, 16, 112, 112),
    "pool1": (64, 8, 56, 56),
    "res2": (256, 8, 56, 56),
    "pool2": (256, 4, 56, 56),
    "res3": (512, 4, 28, 28),
    "res4": (1024, 4, 14, 14),
    "res5": (2048, 4, 7, 7),
}
TABLE1_8X8 = {
    "conv1": (64, 8, 112, 112),
    "pool1": (64, 8, 56, 56),
    "res2": (256, 8, 56, 56),
    "pool2": (256, 4, 56, 56),
    "res3": (512, 4, 28, 28),
    "res4": (1024, 4, 14, 14),
    "res5": (2048, 4, 7, 7),
}
TABLE1_128X1 = {
    "conv1": (64, 64, 112, 112),
    "pool1": (64, 32, 56, 56),
    "res2": (256, 32, 56, 56),
    "pool2": (256, 16, 56, 56),
    "res3": (512, 16, 28, 28),
    "res4": (1024, 16, 14, 14),
    "res5": (2048, 16, 7, 7),
}

REQUIRED_NAMES = [
    "c2d_r50",
    "c2d_r101",
    "i3d_r50",
    "i3d_r101",
    "i3d3x3x3_r50",
    "nl_c2d_r50",
    "nl1_c2d_r50",
    "nl10_c2d_r50",
    "nl_c2d_r101",
    "nl_i3d_r50",
    "nl_i3d_r101",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str, **overrides) -> ResNet3d:
    """A registered model at width 4 with the fewest blocks (at least 2 per stage) that hold its placement."""
    layers = min_layers(model_defaults(name).get("nonlocal_locations") or {}, at_least=2)
    return create_model(name, **{"layers": layers, "width": 4, "num_classes": 5, **overrides})


def tiny_clip(model: ResNet3d, batch: int = 2, size: int = 64) -> torch.Tensor:
    frames = 8 if model.clip.conv1_stride == 1 else 32
    return torch.randn(batch, 3, frames, size, size)


def activate_nonlocal(model: nn.Module) -> None:
    """NL blocks start as the identity (γ = 0 or W_z = 0), which leaves θ, φ, g without gradient; open them. θ is
    also shrunk: the features of a random frozen-BN backbone grow from stage to stage, and logits that large
    saturate the softmax into exact one-hot weights, whose gradient is exactly zero."""
    for m in model.modules():
        if isinstance(m, NonLocalBlock):
            with torch.no_grad():
                if hasattr(m, "theta"):
                    m.theta.weight.mul_(1e-2)
                if m.norm_type is None:
                    nn.init.normal_(m.out.weight, std=0.5)
                else:
                    nn.init.ones_(m.norm.weight)


# --- the paper's numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_equals_the_paper(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=400)
    assert n_params(model) == PAPER_PARAMS[name]


@pytest.mark.parametrize("name", ["c2d_r50", "nl_i3d_r101"])
def test_parameter_count_does_not_depend_on_the_clip_layout(name):
    with torch.device("meta"):
        counts = {n_params(create_model(name, clip=c)) for c in ("32x2", "8x8", PAPER_32X2)}
    assert counts == {PAPER_PARAMS[name]}


def test_one_nonlocal_block_adds_the_papers_parameters():
    with torch.device("meta"):
        base = n_params(create_model("c2d_r50"))
        res4 = n_params(create_model("c2d_r50", nonlocal_locations={"res4": (2,)}))
        res3 = n_params(create_model("c2d_r50", nonlocal_locations={"res3": (0,)}))
    assert (res4 - base, res3 - base) == (2_101_760, 526_592)


def test_i3d_costs_more_than_c2d_as_table_2e_says():
    # R101: I3D 3x1x1 has 1.2x the parameters of C2D, I3D 3x3x3 1.5x
    with torch.device("meta"):
        c2d, i3d, i3d333 = (n_params(create_model(n)) for n in ("c2d_r101", "i3d_r101", "i3d3x3x3_r101"))
    assert round(i3d / c2d, 1) == 1.2 and round(i3d333 / c2d, 1) == 1.5


def _intermediate_shapes(name: str, frames: int) -> dict:
    with FakeTensorMode():  # shapes only: full-size networks at 224x224 cost nothing
        model = create_model(name).eval()
        out = model.forward_intermediates(torch.zeros(1, 3, frames, 224, 224))
        return {k: tuple(v.shape[1:]) for k, v in out.items()}


@pytest.mark.parametrize(
    "name,frames,table",
    [
        ("c2d_r50", 32, TABLE1_32X2),
        ("nl_i3d_r50", 32, TABLE1_32X2),
        ("i3d3x3x3_r50", 32, TABLE1_32X2),
        ("c2d_r50_8x8", 8, TABLE1_8X8),
        ("nl_i3d_r50_8x8", 8, TABLE1_8X8),
        ("nl_i3d_r50_128x1", 128, TABLE1_128X1),
    ],
)
def test_output_sizes_per_stage_follow_table1(name, frames, table):
    assert _intermediate_shapes(name, frames) == table


def test_paper_pool_kernels_give_the_same_sizes():
    with FakeTensorMode():
        model = ResNet3d(clip=PAPER_32X2).eval()
        out = model.forward_intermediates(torch.zeros(1, 3, 32, 224, 224))
        shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    assert shapes == TABLE1_32X2
    assert model.pool1.kernel_size == (3, 3, 3) and model.pool2.kernel_size == (3, 1, 1)


def test_temporal_kernels_follow_the_i3d_pattern():
    def kernels(model, conv):
        return {
            s: [
                getattr(getattr(model, s), str(i)).__getattr__(conv).kernel_size[0]
                for i in range(getattr(model, s).depth)
            ]
            for s in ("res2", "res3", "res4", "res5")
        }

    with torch.device("meta"):
        c2d, i3d, i3d333, r101 = (create_model(n) for n in ("c2d_r50", "i3d_r50", "i3d3x3x3_r50", "i3d_r101"))
    assert (c2d.conv1.kernel_size, i3d.conv1.kernel_size) == ((1, 7, 7), (5, 7, 7))
    assert kernels(c2d, "conv_a") == {"res2": [1] * 3, "res3": [1] * 4, "res4": [1] * 6, "res5": [1] * 3}
    assert kernels(i3d, "conv_a") == {
        "res2": [3, 3, 3],
        "res3": [3, 1, 3, 1],
        "res4": [3, 1, 3, 1, 3, 1],
        "res5": [1, 3, 1],
    }
    assert kernels(i3d, "conv_b") == kernels(c2d, "conv_b")
    assert kernels(i3d333, "conv_b") == kernels(i3d, "conv_a") and kernels(i3d333, "conv_a") == kernels(c2d, "conv_a")
    assert kernels(r101, "conv_a")["res4"] == [3 if i % 2 == 0 else 1 for i in range(23)]


def test_nonlocal_blocks_sit_where_the_paper_puts_them():
    def placed(name):
        with torch.device("meta"):
            model = create_model(name)
        return sorted(n for n, m in model.named_modules() if isinstance(m, NonLocalBlock))

    assert placed("nl1_c2d_r50") == ["res4.nl4"]
    assert placed("nl_c2d_r50") == ["res3.nl1", "res3.nl3", "res4.nl1", "res4.nl3", "res4.nl5"]
    assert placed("nl_i3d_r101") == ["res3.nl1", "res3.nl3", "res4.nl13", "res4.nl20", "res4.nl6"]
    assert len(placed("nl10_c2d_r50")) == 10
    assert [placed(f"nl1_c2d_r50_res{s}") for s in (2, 3, 4, 5)] == [
        ["res2.nl1"],
        ["res3.nl2"],
        ["res4.nl4"],
        ["res5.nl1"],
    ]
    with torch.device("meta"):
        model = create_model("nl1_c2d_r50")
    names = list(dict(model.res4.named_children()))
    assert names == ["0", "1", "2", "3", "4", "nl4", "5"]  # the block runs after residual block 4
    assert model.res4[5] is getattr(model.res4, "5") and model.res4[-1] is model.res4[5]  # indices skip "nl4"
    with pytest.raises(IndexError, match="6 residual blocks"):
        model.res4[6]


def test_variants_configure_their_blocks():
    with torch.device("meta"):
        gauss = create_model("nl1_c2d_r50_gaussian").res4.nl4
        concat = create_model("nl1_c2d_r50_concatenation").res4.nl4
        dot = create_model("nl1_c2d_r50_dot_product").res4.nl4
        emb = create_model("nl1_c2d_r50").res4.nl4
        space = create_model("nl_c2d_r50_space").res3.nl1
        time = create_model("nl_c2d_r50_time").res3.nl1
        long = create_model("nl_i3d_r50_128x1")
    assert not hasattr(gauss, "theta") and hasattr(concat, "concat_project")
    assert (gauss.mode, concat.mode, dot.mode, emb.mode) == (
        "gaussian",
        "concatenation",
        "dot_product",
        "embedded_gaussian",
    )
    assert emb.subsample == (1, 2, 2) and emb.scale == pytest.approx(512**-0.5) and dot.scale == 1.0
    assert (space.extent, time.extent, time.subsample) == ("space", "time", None)
    assert isinstance(long.bn1, FrozenBatchNorm3d) and isinstance(long.res4[0].bn_c, FrozenBatchNorm3d)
    assert long.res3.nl1.norm_type is None and isinstance(long.res3.nl1.norm, nn.Identity)
    assert (long.res3.nl1.temporal_groups, long.res4.nl1.temporal_groups) == (4, 1)


# --- the registry -----------------------------------------------------------------------------------------------


def test_registry_has_the_papers_names_for_both_clips():
    names = set(list_models())
    for name in REQUIRED_NAMES:
        assert name in names and f"{name}_8x8" in names
    for mode in ("gaussian", "embedded_gaussian", "dot_product", "concatenation"):
        assert f"nl1_c2d_r50_{mode}" in names
    assert {"nl_c2d_r50_space", "nl_c2d_r50_time", "nl_c2d_r50_spacetime", "nl_i3d_r50_128x1"} <= names


def test_list_models_filters_with_a_glob():
    assert list_models("nl1_c2d_r50_*") == sorted(
        f"nl1_c2d_r50_{s}"
        for s in (
            "gaussian",
            "embedded_gaussian",
            "dot_product",
            "concatenation",
            "res2",
            "res3",
            "res4",
            "res5",
            "8x8",
        )
    )
    assert list_models("nothing*") == []


def test_register_model_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: ResNet3d(**kw), name="c2d_r50")


def test_unknown_names_and_options_are_errors_that_name_them():
    with pytest.raises(KeyError, match="c2d_r52"):
        create_model("c2d_r52")
    with pytest.raises(TypeError, match="'depth'"):
        create_model("c2d_r50", depth=50)
    with pytest.raises(ValueError, match="'bogus'"):
        create_model("nl_c2d_r50", nonlocal_options={"bogus": 1})
    with pytest.raises(ValueError, match="unknown arch 'c3d'"):
        ResNet3d(arch="c3d")
    with pytest.raises(ValueError, match="unknown clip '16x4'"):
        ResNet3d(clip="16x4")


@pytest.mark.parametrize(
    "locations,message",
    [
        ({"res4": (6,)}, r"res4 has 6 blocks \(indices 0..5\)"),
        ({"res6": (0,)}, "unknown stage 'res6'"),
        ({"res3": (1, 1)}, "repeats an index"),
        ({"res3": 1}, "must be a sequence"),
        ({"res3": (1.0,)}, "not a block index"),
    ],
)
def test_placements_are_checked_against_stage_depths(locations, message):
    with pytest.raises(ValueError, match=message):
        ResNet3d(layers=(3, 4, 6, 3), nonlocal_locations=locations)


def test_a_tiny_override_of_a_placement_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="res3 has 1 blocks"):
        create_model("nl_c2d_r50", layers=(1, 1, 1, 1), width=8)
    model = create_model("c2d_r50", layers=(1, 1, 1, 1), width=8)
    assert model.layers == (1, 1, 1, 1) and model.num_features == 256


def test_dict_options_merge_into_the_registered_ones():
    with torch.device("meta"):
        model = create_model("nl_i3d_r50", nonlocal_options={"impl": "dense"})
    block = model.res4.nl1
    assert (block.impl, block.mode, block.subsample, block.scale) == (
        "dense",
        "embedded_gaussian",
        (1, 2, 2),
        pytest.approx(512**-0.5),
    )


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_a_step_at_tiny_size(name):
    model = tiny(name).train()
    activate_nonlocal(model)
    x = tiny_clip(model)
    logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def test_nonlocal_blocks_start_as_the_identity():
    # the same backbone weights with and without the 5 blocks give the same output
    nl = create_model("nl_i3d_r50", layers=(2, 4, 6, 2), width=4, num_classes=5).eval()
    base = create_model("i3d_r50", layers=(2, 4, 6, 2), width=4, num_classes=5).eval()
    missing, unexpected = base.load_state_dict(nl.state_dict(), strict=False)
    assert not missing and all(".nl" in k for k in unexpected) and unexpected
    x = torch.randn(1, 3, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(nl(x), base(x))


def test_the_paper_forbids_bn_in_the_frozen_models_blocks_so_w_z_starts_at_zero():
    model = tiny("nl_i3d_r50_128x1")
    blocks = [m for m in model.modules() if isinstance(m, NonLocalBlock)]
    assert blocks and all(b.out.weight.abs().sum() == 0 for b in blocks)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_too_short_clips_and_wrong_channels_are_clear_errors():
    model = tiny("c2d_r50")
    with pytest.raises(ValueError, match=r"expects a clip \(B, 3, T, H, W\)"):
        model(torch.randn(1, 4, 32, 64, 64))
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(1, 3, 2, 64, 64))


# --- timm-like interface ----------------------------------------------------------------------------------------


def test_forward_features_head_and_reset_classifier():
    model = tiny("nl_i3d_r50").eval()
    x = tiny_clip(model, batch=2)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 4, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features) and isinstance(model.get_classifier(), nn.Identity)


def test_head_is_initialised_as_the_paper_says():
    model = create_model("c2d_r50", layers=(1, 1, 1, 1))
    fc = model.get_classifier()
    assert fc.weight.shape == (400, 2048)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(fc.bias) == 0
    model.reset_classifier(10)
    assert model.get_classifier().weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_fully_convolutional_mode_gives_the_logits_of_the_averaged_per_position_scores():
    model = tiny("nl_i3d_r50").eval()
    x = torch.randn(2, 3, 32, 64, 96)  # not square: the full-frame test
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        score_map = model.head.score_map(feats)
        model.fully_convolutional = True
        fully_conv = model(x)
        model.score_activation = "sigmoid"
        multi_label = model(x)
        model.score_activation = None
        mean_logits = model(x)
    assert score_map.shape == (2, 5, 4, 2, 3)
    probs = fully_conv.softmax(dim=1)  # logits still: the softmax a caller applies gives the averaged scores
    torch.testing.assert_close(probs, score_map.softmax(dim=1).mean(dim=(2, 3, 4)))
    torch.testing.assert_close(fully_conv.logsumexp(dim=1), torch.zeros(2))  # log-probabilities, normalised
    torch.testing.assert_close(multi_label.sigmoid(), score_map.sigmoid().mean(dim=(2, 3, 4)))
    # the fc is linear, so averaged logits equal the pooled path's logits
    torch.testing.assert_close(mean_logits, logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probs, logits.softmax(dim=1))  # averaging probabilities is not averaging logits


def test_reset_parameters_reinitialises_every_module():
    model = tiny("nl_c2d_r50")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    model.reset_parameters()
    assert model.res4.nl1.norm.weight.abs().sum() == 0  # γ = 0 again
    assert torch.count_nonzero(model.head.fc.bias) == 0
    assert model.res3[0].bn_a.weight.eq(1).all()
    for name, p in model.named_parameters():  # nothing keeps the filled value
        assert not (p == 3.0).all(), name
    w = model.conv1.weight  # He (fan-out) normal: std sqrt(2 / (out channels x kernel volume))
    assert w.std().item() == pytest.approx((2 / (w.shape[0] * w[0, 0].numel())) ** 0.5, rel=0.1)


# --- frozen batch norm ------------------------------------------------------------------------------------------


def test_freeze_batchnorm_keeps_the_eval_function_and_drops_parameters():
    model = tiny("i3d_r50", dropout=0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.2)
    x = tiny_clip(model, batch=1)
    with torch.no_grad():
        expected = model.eval()(x)
    before = n_params(model)
    bn_parameters = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    freeze_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert before - n_params(model) == bn_parameters  # γ and β of every BN become buffers, nothing else changes
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), expected)  # statistics stay frozen in train mode too


@pytest.mark.parametrize(
    "bn_cls,frozen_cls,shape",
    [
        (nn.BatchNorm1d, FrozenBatchNorm1d, (4, 6, 5)),
        (nn.BatchNorm2d, FrozenBatchNorm2d, (4, 6, 5, 3)),
        (nn.BatchNorm3d, FrozenBatchNorm3d, (4, 6, 2, 5, 3)),
    ],
)
def test_frozen_batchnorm_matches_batchnorm_in_eval_for_each_rank(bn_cls, frozen_cls, shape):
    bn = bn_cls(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    frozen = freeze_batchnorm(bn)
    assert type(frozen) is frozen_cls and not list(frozen.parameters())
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    with pytest.raises(ValueError, match="rank"):
        frozen(torch.randn(2, 6, *([3] * (len(shape) - 1))))


def test_a_batchnorm_checkpoint_loads_into_frozen_batchnorm():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.5)
    frozen = FrozenBatchNorm(3)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    assert frozen.running_mean.eq(0.5).all()


# --- weights files and torch.hub --------------------------------------------------------------------------------


def test_save_and_load_weights_round_trip(tmp_path):
    a, b = tiny("nl_i3d_r50"), tiny("nl_i3d_r50")
    path = tmp_path / "w.safetensors"
    save_weights(a, path, metadata={"model": "nl_i3d_r50"})
    load_weights(b, path)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(b, tmp_path / "missing.safetensors")


def test_read_state_dict_reads_every_layout_and_names_bad_files(tmp_path):
    import json

    from nonlocalnet.models.checkpoints.weights import read_state_dict

    state = {"a.weight": torch.arange(6.0).view(2, 3), "b.bias": torch.ones(2)}
    save_weights(
        state,
        tmp_path / "w.safetensors",
        metadata={"model": "nl_c2d_tiny", "model_options": json.dumps({"num_classes": 3})},
    )
    got, meta = read_state_dict(tmp_path / "w.safetensors")
    assert meta == {"model_name": "nl_c2d_tiny", "model_options": {"num_classes": 3}}
    torch.testing.assert_close(got["a.weight"], state["a.weight"])
    # a training checkpoint (weights under "model", DDP prefix) and a bare state dict
    torch.save(
        {
            "model": {"module." + k: v for k, v in state.items()},
            "iteration": 7,
            "model_name": "x",
            "model_options": {"depth": 2},
            "rng": {"torch": torch.get_rng_state()},
        },
        tmp_path / "c.pt",
    )
    got, meta = read_state_dict(tmp_path / "c.pt")
    assert set(got) == set(state) and meta == {"model_name": "x", "model_options": {"depth": 2}}
    torch.save(state, tmp_path / "bare.pth")
    got, meta = read_state_dict(tmp_path / "bare.pth")
    assert set(got) == set(state) and meta == {}
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_state_dict(tmp_path / "missing.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:100])
    with pytest.raises(UnreadableFile, match="cannot read .*cut.pt: no weights: truncated"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:60])
    with pytest.raises(UnreadableFile, match="cut.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")
    torch.save({"iteration": 3}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "nothing.pt")


def test_torch_hub_lists_and_builds_the_registered_models(tmp_path):
    # torch.hub.list reads GitHub only; list the local hubconf the way it does: its public callables
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert set(list_models()) <= set(entries)
    assert not {"create_model", "list_models", "load_weights"} & set(entries)
    model = torch.hub.load(str(REPO), "nl_i3d_r50", source="local", layers=(2, 4, 6, 2), width=4, num_classes=3)
    assert isinstance(model, ResNet3d) and model.num_classes == 3
    with pytest.raises(RuntimeError, match="nonlocalnet convert SRC"):
        torch.hub.load(str(REPO), "nl_i3d_r50", source="local", pretrained=True)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    loaded = torch.hub.load(
        str(REPO), "nl_i3d_r50", source="local", pretrained=str(path), layers=(2, 4, 6, 2), width=4, num_classes=3
    )
    assert torch.equal(loaded.res4.nl1.theta.weight, model.res4.nl1.theta.weight)


# --- trace, export, compile --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("name", ["c2d_r50", "nl_i3d_r50"])
def test_traced_model_equals_eager(name):
    model = tiny(name).eval()
    activate_nonlocal(model)
    x = tiny_clip(model, batch=1)
    fresh = torch.randn(3, *x.shape[1:])  # another batch size and other values than the traced input
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.testing.assert_close(traced(fresh), model(fresh))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["c2d_r50", "nl_i3d_r50"])
def test_exported_model_equals_eager(name):
    model = tiny(name).eval()
    activate_nonlocal(model)
    x = tiny_clip(model, batch=1)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["c2d_r50", "nl_i3d_r50"])
def test_compiled_model_equals_eager(name):
    model = tiny(name).eval()
    activate_nonlocal(model)
    x = tiny_clip(model, batch=1)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), expected, atol=1e-4, rtol=1e-4)
