"""`nonlocalnet convert` proven against the zoos' own code: PyTorchVideo's hub models and mmaction2's ResNet3d
(built from its NL I3D config files) with random weights, saved in each zoo's checkpoint layout, converted
without --from, rebuilt by `models.load_model`, and compared logit for logit on the same clip. The official
Caffe2 code cannot run anywhere now: its families are pickles in the official blob layout (tests/test_caffe2.py
writes them), each recognised and every blob placed.

Tolerance: max |ours - zoo| <= 1e-5 max |zoo| (float32; the same operations in another order differ by a few
ulps). Each comparison also has a positive control: the same weights in the model the zoo's network is *not*
(the paper's layout) differ by far more, so the options the conversion carries are what makes them agree.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nonlocalnet.cli import main
from nonlocalnet.layers.conv import torch_conv_dispatch
from nonlocalnet.models import ConversionError, convert_checkpoint, create_model, detect_format, load_model
from nonlocalnet.models.checkpoints.weights import read_metadata

from .helpers import NL5, check_placed, fold_bn, official_blobs, write_pickle

RTOL = 1e-5  # of the largest logit


def _randomise_bn(net: nn.Module, seed: int = 0, scale: tuple[float, float] = (0.5, 1.5)) -> None:
    """Random BN statistics and affine parameters (a fresh BN is the identity in eval and would hide a mix-up)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * (scale[1] - scale[0]) + scale[0])
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs().max().item()
    assert diff <= RTOL * theirs.abs().max().item(), (diff, theirs.abs().max().item())
    return diff


def _convert(src: Path, *extra: str) -> Path:
    out = src.with_suffix(".safetensors")
    assert main(["convert", str(src), str(out), *extra]) == 0
    return out


# --- PyTorchVideo ------------------------------------------------------------------------------------------------

PYTORCHVIDEO = {"c2d_r50": "c2d_r50_8x8", "i3d_r50": "i3d_r50_8x8", "slow_r50": "slow_r50_8x8"}


@pytest.mark.parametrize("hub_name", sorted(PYTORCHVIDEO))
def test_pytorchvideo_hub_models_convert_to_the_same_function(hub_name, tmp_path):
    hub = pytest.importorskip("pytorchvideo.models.hub")
    torch.manual_seed(0)
    zoo = getattr(hub, hub_name)(pretrained=False).eval()  # the hub's real R50, random weights
    _randomise_bn(zoo)
    src = tmp_path / f"{hub_name.upper()}.pyth"  # PySlowFast's checkpoint dict, as the hub's files are
    torch.save({"epoch": 196, "model_state": zoo.state_dict(), "optimizer_state": {}, "cfg": "MODEL: ..."}, src)
    assert detect_format(src) == "pytorchvideo"
    out = _convert(src)
    meta = read_metadata(out)
    assert meta["model"] == PYTORCHVIDEO[hub_name] and meta["converted_from"] == "pytorchvideo"
    model = load_model(out)
    clips = {"224": torch.randn(1, 3, 8, 224, 224), "256": torch.randn(1, 3, 8, 256, 256)}
    with torch.no_grad():
        for clip in clips.values():  # at 256 the head's windowed average differs from a global one
            _close(model(clip), zoo(clip))
        # positive control: the same weights with the paper's global-average head at 256
        paper = create_model(PYTORCHVIDEO[hub_name], num_classes=400).eval()
        paper.load_state_dict(model.state_dict())
        gap = (paper(clips["256"]) - zoo(clips["256"])).abs().max().item()
    assert gap > 100 * RTOL * zoo(clips["256"]).abs().max().item()


def test_a_tiny_pytorchvideo_model_converts_fine_tunes_and_tests(tmp_path, monkeypatch):
    zoo, src = _tiny_pytorchvideo(tmp_path)  # R50 depth, width 4
    out = _convert(src)
    assert json.loads(read_metadata(out)["model_options"]) == {"width": 4, "head_pool_kernel": [4, 7, 7]}
    clip = torch.randn(2, 3, 8, 224, 224)
    with torch.no_grad():
        _close(load_model(out)(clip), zoo(clip))
    _fine_tune(tmp_path, monkeypatch, out, "c2d_r50_8x8", ["model.options.width=4"])


def _fine_tune(
    tmp_path: Path,
    monkeypatch,
    weights: Path,
    name: str,
    options: list[str],
    config: str = "configs/kinetics/c2d_r50_8x8.yaml",
    classes: int = 3,
) -> None:
    """The README's way on: a shipped recipe with model.pretrained = the converted file, trained and tested."""
    from .helpers import write_video
    from .test_recipes import TINY

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "kinetics").mkdir(parents=True)
    rows = []
    for i in range(4):
        write_video(tmp_path / "data" / "kinetics" / f"v{i}.mp4", rng.integers(0, 255, (36, 40, 48, 3), np.uint8))
        rows.append(f"v{i}.mp4 {i % 2}")
    for split in ("train_list", "val_list"):
        (tmp_path / "data" / "kinetics" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.trainer import build_model

    overrides = [
        *TINY[1:],
        "data.frames=8",
        "data.sampling_rate=1",
        "data.num_classes=2",
        f"model.name={name}",
        f"model.pretrained={weights}",
        *options,
        "output_dir=runs/ft",
    ]
    # what training starts from: every converted tensor but the classifier (`classes` there, 2 here)
    start, converted = build_model(load_config(config, overrides)).state_dict(), load_model(weights).state_dict()
    assert {k for k in converted if not torch.equal(converted[k], start[k])} == {"head.fc.weight", "head.fc.bias"}
    # the converted file itself is testable: `test` rebuilds it with its recorded options (the hub head)
    assert (
        main(
            [
                "test",
                "--config",
                config,
                "--checkpoint",
                str(weights),
                "--no-progress",
                "--output",
                "zoo.json",
                *[o for o in overrides if not o.startswith(("data.num_classes", "model.pretrained"))],
                f"data.num_classes={classes}",
            ]
        )
        == 0
    )
    assert json.loads(Path("zoo.json").read_text())["videos"] == 4
    assert main(["train", "--config", config, "--no-progress", *overrides]) == 0
    assert main(["test", "--config", "runs/ft/config.yaml", "--no-progress"]) == 0


# --- mmaction2 ---------------------------------------------------------------------------------------------------

MMACTION2 = {  # config file of configs/recognition/i3d -> the model it converts to
    "i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb": "mmaction2_i3d_r50",
    "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb": "mmaction2_nl_i3d_r50_dot_product",
    "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb": (
        "mmaction2_nl_i3d_r50_embedded_gaussian"
    ),
    "i3d_imagenet-pretrained-r50-nl-gaussian_8xb8-32x2x1-100e_kinetics400-rgb": "mmaction2_nl_i3d_r50_gaussian",
}
# positive controls: each difference from the paper's network the conversion carries, undone one at a time
CONTROLS = {
    "pool1 of temporal kernel 2 (the official code's)": ({"clip": "32x2"}, "i3d"),
    "blocks scaled by C'^-1/2": ({"nonlocal_options": {"scale": "auto"}}, "nl_"),
    "keys/values pooled before the φ/g convs": (
        {"nonlocal_options": {"subsample_position": "input"}},
        "product|embedded",
    ),
}


@functools.cache
def _mmaction2_resnet3d():
    """mmaction2's ResNet3d class from its installed wheel, without the package's ``__init__`` (which asserts
    mmcv < 2.2 and imports modules needing packages the wheel does not declare): the ``mmaction`` package is
    registered empty, so only ``mmaction.registry`` and the backbone's own file run."""
    pytest.importorskip("mmcv.cnn")
    pytest.importorskip("mmengine")
    spec = importlib.util.find_spec("mmaction")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mmaction2 is not installed (the newest environment installs it)")
    root = Path(list(spec.submodule_search_locations)[0])
    if "mmaction" not in sys.modules:
        package = types.ModuleType("mmaction")
        package.__path__ = [str(root)]
        sys.modules["mmaction"] = package
    importlib.import_module("mmaction.registry")
    name = "mmaction.models.backbones.resnet3d"
    if name not in sys.modules:
        file = importlib.util.spec_from_file_location(name, root / "models" / "backbones" / "resnet3d.py")
        module = importlib.util.module_from_spec(file)
        sys.modules[name] = module
        file.loader.exec_module(module)
    return sys.modules[name].ResNet3d, root / ".mim" / "configs" / "recognition" / "i3d"


class _I3DHead(nn.Module):
    """mmaction2's I3DHead in eval: AdaptiveAvgPool3d(1), dropout, ``fc_cls`` (the head module itself imports
    mmaction.evaluation, whose imports need packages the wheel does not declare)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc_cls = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc_cls.weight, std=0.01)

    def forward(self, x):
        return self.fc_cls(x.mean(dim=(2, 3, 4)))


def _mmaction2_checkpoint(
    config: str, tmp_path: Path, base_channels: int = 64, with_cfg: bool = True, file_name: str | None = None
):
    resnet3d, configs = _mmaction2_resnet3d()  # skips where mmaction2 and its mmcv / mmengine are missing
    from mmengine.config import Config

    cfg = Config.fromfile(configs / f"{config}.py")
    backbone = {k: v for k, v in cfg.model.backbone.items() if k not in ("type", "pretrained", "pretrained2d")}
    torch.manual_seed(0)
    net = resnet3d(pretrained=None, pretrained2d=False, base_channels=base_channels, **backbone)
    net.init_weights()
    # random BN everywhere, the NL blocks' too (γ = 0 at init), so that they are not the identity; the dot product
    # is unnormalised, so its network gets smaller BN scales, or the activations grow block after block past float32
    _randomise_bn(net, scale=(0.2, 0.5) if "dot-product" in config else (0.5, 1.5))
    head = _I3DHead(base_channels * 32, 400)
    state = {f"backbone.{k}": v for k, v in net.state_dict().items()}
    state.update({f"cls_head.{k}": v for k, v in head.state_dict().items()})
    src = tmp_path / (file_name or f"{config}_20220812-8e1f2148.pth")
    torch.save(
        {"meta": {"cfg": cfg.pretty_text, "mmengine_version": "0.10.7"} if with_cfg else {}, "state_dict": state}, src
    )
    return nn.Sequential(net, head).eval(), src


@pytest.mark.parametrize("config", sorted(MMACTION2))
def test_mmaction2_i3d_and_nl_i3d_convert_to_the_same_function(config, tmp_path):
    zoo, src = _mmaction2_checkpoint(config, tmp_path)
    assert detect_format(src) == "mmaction2"
    out = _convert(src)
    name = MMACTION2[config]
    assert read_metadata(out)["model"] == name
    model = load_model(out)
    clip = torch.randn(1, 3, 32, 112, 112)
    # torch's own convolution kernels on both sides: the conversion is what is compared, not oneDNN's rounding
    with torch.no_grad(), torch_conv_dispatch():
        expected = zoo(clip)
        _close(model(clip), expected)
        for what, (undo, applies) in CONTROLS.items():
            if re.search(applies, name):
                other = create_model(name, num_classes=400, **undo).eval()
                other.load_state_dict(model.state_dict())
                gap = (other(clip) - expected).abs().max()
                assert gap > 100 * RTOL * expected.abs().max(), what


def test_an_mmaction2_nl_i3d_converts_fine_tunes_and_tests_as_the_readme_says(tmp_path, monkeypatch):
    config = "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb"
    _, src = _mmaction2_checkpoint(config, tmp_path, base_channels=8)
    out = _convert(src)
    _fine_tune(
        tmp_path,
        monkeypatch,
        out,
        "mmaction2_nl_i3d_r50_dot_product",
        ["model.options.width=8"],
        config="configs/kinetics/nl_i3d_r50_32x2.yaml",
        classes=400,
    )


def test_mmaction2_dot_product_and_embedded_gaussian_need_a_name_or_a_config(tmp_path):
    config = "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb"
    zoo, src = _mmaction2_checkpoint(config, tmp_path, base_channels=8, with_cfg=False, file_name="nl.pth")
    with pytest.raises(ConversionError, match="dot products or embedded gaussians, which have the same tensors"):
        convert_checkpoint(src)
    # the released file name says it; so does --model
    named = src.rename(tmp_path / "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8.pth")
    assert convert_checkpoint(named).model_name == "mmaction2_nl_i3d_r50_dot_product"
    result = convert_checkpoint(named, model="mmaction2_nl_i3d_r50_embedded_gaussian")
    assert result.model_name == "mmaction2_nl_i3d_r50_embedded_gaussian" and result.options["width"] == 8
    clip = torch.randn(1, 3, 16, 64, 64)
    with torch.no_grad():  # the width was read from the file; the dot product is the zoo's function
        _close(convert_checkpoint(named).model(clip), zoo(clip))


# --- the official Caffe2 checkpoints ------------------------------------------------------------------------------

R50 = (3, 4, 6, 3)
I3D_R50 = {2: [1, 1, 1], 3: [1, 0, 1, 0], 4: [1, 0, 1, 0, 1, 0], 5: [0, 1, 0]}
C2D_R50 = {s: [0] * n for s, n in zip((2, 3, 4, 5), R50)}
# file name (as the official model zoo names them) -> the model it is, and PAPER.md's blob inventory
CAFFE2 = {
    "c2d_baseline_32x2_IN_pretrain_400k.pkl": ("c2d_r50", C2D_R50, {}, False, 267),
    "c2d_nonlocal_32x2_IN_pretrain_400k.pkl": ("nl_c2d_r50", C2D_R50, NL5, False, 327),
    "i3d_baseline_32x2_IN_pretrain_400k.pkl": ("i3d_r50", I3D_R50, {}, False, 267),
    "i3d_nonlocal_32x2_IN_pretrain_400k.pkl": ("nl_i3d_r50", I3D_R50, NL5, False, 327),
    "c2d_baseline_8x8_IN_pretrain_400k.pkl": ("c2d_r50_8x8", C2D_R50, {}, False, 267),
    "c2d_nonlocal_8x8_IN_pretrain_400k.pkl": ("nl_c2d_r50_8x8", C2D_R50, NL5, False, 327),
    "i3d_baseline_8x8_IN_pretrain_400k.pkl": ("i3d_r50_8x8", I3D_R50, {}, False, 267),
    "i3d_nonlocal_8x8_IN_pretrain_400k.pkl": ("nl_i3d_r50_8x8", I3D_R50, NL5, False, 327),
    "i3d_baseline_affine_128f_IN_pretrain_400k.pkl": ("i3d_r50_128x1", I3D_R50, {}, True, 161),
    "i3d_nonlocal_affine_128f_IN_pretrain_400k.pkl": ("nl_i3d_r50_128x1", I3D_R50, NL5, True, 201),
}


@pytest.mark.parametrize("file_name", sorted(CAFFE2))
def test_every_official_family_is_recognised_and_every_blob_placed(file_name, tmp_path):
    name, temp_convs, nonlocal_after, affine, inventory = CAFFE2[file_name]
    blobs = official_blobs_r50(temp_convs, nonlocal_after, affine)
    assert len(blobs) == inventory  # PAPER.md's count for the released file of this family
    blobs["model_iter"] = np.array(400000)  # training state, skipped
    src = write_pickle(tmp_path / file_name, blobs)
    assert detect_format(src) == "caffe2"
    out = _convert(src)  # no --from, no --model
    meta = read_metadata(out)
    assert meta["model"] == name and meta["converted_from"] == "caffe2"
    model = load_model(out)
    check_placed(model, {k: v for k, v in blobs.items() if k != "model_iter"}, affine=affine)
    assert model.pool1.padding[1:] == (0, 0)  # the official network: pool1 unpadded
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32 if "32x2" in file_name or affine else 8, 64, 64))).all()


def official_blobs_r50(temp_convs, nonlocal_after, affine):
    """tests/test_caffe2.py's official blob writer at R50 depth (its width of 4 keeps the pickles small); affine
    files fold every BN as the official modify_caffe2_ftvideo.py does, and their NL blocks have none."""
    blobs = official_blobs(temp_convs, nonlocal_after, num_classes=7, training_state=False, nonlocal_bn=not affine)
    return fold_bn(blobs) if affine else blobs


def test_a_caffe2_file_whose_name_does_not_say_32x2_or_8x8_needs_a_model(tmp_path):
    src = write_pickle(tmp_path / "model.pkl", official_blobs_r50(I3D_R50, NL5, False))
    with pytest.raises(
        ConversionError,
        match="the 32x2 and 8x8 models have the same tensors.*--model nl_i3d_r50 .*--model nl_i3d_r50_8x8",
    ):
        convert_checkpoint(src)
    assert convert_checkpoint(src, model="nl_i3d_r50_8x8").model.clip_name == "8x8_official"


# --- formats, refusals, safety ------------------------------------------------------------------------------------


def test_a_format_given_with_from_must_be_the_files(tmp_path):
    src = write_pickle(tmp_path / "c2d_baseline_32x2.pkl", official_blobs_r50(C2D_R50, {}, False))
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--from", "mmaction2"]) == 2
    with pytest.raises(ConversionError, match="is a caffe2 checkpoint, not mmaction2"):
        convert_checkpoint(src, source_format="mmaction2")


def test_files_of_no_zoo_are_named(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(ConversionError, match="not a checkpoint of a zoo nonlocalnet converts.*encoder.weight"):
        convert_checkpoint(other)
    ours = tmp_path / "ours.pth"
    torch.save(create_model("c2d_tiny").state_dict(), ours)
    with pytest.raises(ConversionError, match="already a nonlocalnet state dict"):
        convert_checkpoint(ours)
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(ConversionError, match="neither a torch file nor a Caffe2 pickle"):
        convert_checkpoint(text)


def test_a_tensor_with_no_place_and_an_entry_left_unfilled_are_named(tmp_path):
    hub = pytest.importorskip("pytorchvideo.models.hub")
    zoo = hub.slow_r50(pretrained=False, stem_dim_out=4, model_num_class=3)
    state = zoo.state_dict()
    state["blocks.2.res_blocks.0.extra.weight"] = torch.zeros(1)
    del state["blocks.3.res_blocks.1.branch2.norm_b.running_var"]
    src = tmp_path / "SLOW_8x8_R50.pyth"
    torch.save({"model_state": state}, src)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(src)
    assert "1 tensor(s) the model has no place for: blocks.2.res_blocks.0.extra.weight" in str(err.value)
    assert "res4.1.bn_b.running_var (blocks.3.res_blocks.1.branch2.norm_b.running_var)" in str(err.value)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_a_file_that_would_run_code_is_refused_by_convert_and_load_model(kind, tmp_path, capsys):
    marker = tmp_path / "ran"
    src = tmp_path / ("evil.pkl" if kind == "pickle" else "evil.pth")
    if kind == "pickle":
        src.write_bytes(pickle.dumps({"blobs": {"conv1_w": _RunsCode(marker)}}, protocol=2))
    else:
        torch.save({"model_state": {"blocks.0.conv.weight": torch.zeros(1)}, "x": _RunsCode(marker)}, src)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("error:") == 1
        and "system" in err
        and "o.safetensors" not in " ".join(p.name for p in tmp_path.iterdir())
    )
    with pytest.raises(ValueError, match="system"):
        load_model(src, "c2d_tiny")
    assert not marker.exists()


# --- one way back: load_model under torch.hub, visualize and model.pretrained -----------------------------------


def test_hub_entry_points_rebuild_the_recorded_network(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    src = write_pickle(tmp_path / "i3d_nonlocal_32x2_IN_pretrain_400k.pkl", official_blobs_r50(I3D_R50, NL5, False))
    out = _convert(src)
    model = torch.hub.load(str(repo), "nl_i3d_r50", source="local", pretrained=str(out))
    assert model.clip_name == "32x2_official" and model.width == 4 and model.training  # the file's record
    check_placed(model, official_blobs_r50(I3D_R50, NL5, False))
    with pytest.raises(ValueError, match="holds weights of nl_i3d_r50 .*not i3d_r50"):
        torch.hub.load(str(repo), "i3d_r50", source="local", pretrained=str(out))


def test_model_pretrained_warns_when_a_zoo_network_goes_into_the_papers(tmp_path, caplog):
    from nonlocalnet.models import load_pretrained

    config = "i3d_imagenet-pretrained-r50-nl-gaussian_8xb8-32x2x1-100e_kinetics400-rgb"
    _, src = _mmaction2_checkpoint(config, tmp_path, base_channels=8)
    out = _convert(src)
    caplog.clear()  # the conversion's own note on unscaled blocks (said once per process, so not in every order)
    with caplog.at_level("WARNING", logger="nonlocalnet"):
        report = load_pretrained(create_model("mmaction2_nl_i3d_r50_gaussian", width=8, num_classes=5), out)
        assert report.kind == "same model" and not caplog.records
        paper = create_model(
            "nl_i3d_r50", width=8, num_classes=5, nonlocal_options={"mode": "gaussian"}
        )  # the same tensors fit
        load_pretrained(paper, out)
    assert (
        "computes differently from this model; to fine-tune the network the zoo trained, build "
        "mmaction2_nl_i3d_r50_gaussian with those options" in caplog.text
    )


# --- what a review's probes found (each fails on the first version of convert) --------------------------------


def _tiny_pytorchvideo(tmp_path: Path, name: str = "C2D_8x8_R50.pyth", **save) -> tuple[nn.Module, Path]:
    hub = pytest.importorskip("pytorchvideo.models.hub")
    torch.manual_seed(0)
    zoo = hub.c2d_r50(pretrained=False, stem_dim_out=4, model_num_class=3).eval()
    _randomise_bn(zoo)
    src = tmp_path / name
    torch.save({"model_state": zoo.state_dict()}, src, **save)
    return zoo, src


def test_a_model_named_with_model_keeps_what_the_file_says(tmp_path):
    zoo, src = _tiny_pytorchvideo(tmp_path)
    result = convert_checkpoint(src, model="c2d_r50_8x8")
    assert result.options["head_pool_kernel"] == (4, 7, 7) and result.options["width"] == 4
    clip = torch.randn(1, 3, 8, 256, 256)  # where the head's window matters
    with torch.no_grad():
        _close(result.model(clip), zoo(clip))


def test_a_config_recorded_in_an_mmaction2_file_holds_under_model_too(tmp_path):
    config = "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb"
    _, src = _mmaction2_checkpoint(config, tmp_path, base_channels=8)
    saved = torch.load(src, weights_only=True)
    saved["meta"]["cfg"] = saved["meta"]["cfg"].replace("use_scale=False", "use_scale=True")
    assert "use_scale=True" in saved["meta"]["cfg"]  # the recorded config now scales the blocks
    torch.save(saved, src)
    for model in (None, "mmaction2_nl_i3d_r50_embedded_gaussian"):
        result = convert_checkpoint(src, model=model)
        assert result.options["nonlocal_options"] == {"scale": "auto"}
        blocks = [b for b in result.model.modules() if hasattr(b, "subsample_position")]
        assert len(blocks) == 5 and all(b.scale == pytest.approx(b.inter_channels**-0.5) for b in blocks)


def test_skip_classifier_writes_a_model_without_one_that_loads_back_and_fine_tunes(tmp_path):
    from nonlocalnet.models import load_pretrained

    zoo, src = _tiny_pytorchvideo(tmp_path)
    out = tmp_path / "backbone.safetensors"
    assert main(["convert", str(src), str(out), "--skip-classifier"]) == 0
    assert read_metadata(out)["num_classes"] == "0"
    backbone = load_model(out)  # no classifier: the pooled features
    clip = torch.randn(1, 3, 8, 224, 224)
    with torch.no_grad():
        assert backbone(clip).shape == (1, 128)
    report = load_pretrained(create_model("c2d_r50_8x8", width=4, num_classes=9), out)
    assert report.kind == "same model" and set(report.fresh) == {"head.fc.weight", "head.fc.bias"}


def test_old_format_and_truncated_torch_files_are_read_as_torch_files(tmp_path):
    zoo, src = _tiny_pytorchvideo(tmp_path, "legacy.pyth", _use_new_zipfile_serialization=False)
    assert detect_format(src) == "pytorchvideo"  # torch < 1.6's format, not taken for a Caffe2 pickle
    _, whole = _tiny_pytorchvideo(tmp_path, "whole.pyth")
    cut = tmp_path / "cut.pyth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        convert_checkpoint(cut)
    assert "Caffe2" not in str(err.value) and "cut.pyth" in str(err.value)


def test_outputs_and_inputs_the_command_cannot_use_are_named(tmp_path, capsys):
    _, src = _tiny_pytorchvideo(tmp_path)
    (tmp_path / "outdir.safetensors").mkdir()
    for args, message in (
        (["out.pth"], "must end in .safetensors"),
        (["outdir.safetensors"], "is a directory"),
        (["o.safetensors", "--paper-layout"], "--paper-layout applies to the official Caffe2"),
    ):
        assert main(["convert", str(src), str(tmp_path / args[0]), *args[1:]]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and message in err, err
    assert main(["convert", str(tmp_path), str(tmp_path / "o.safetensors")]) == 2
    assert "is a directory, not a checkpoint file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "out.pth").exists()


def test_pytorchvideo_networks_that_are_not_its_resnets_are_named(tmp_path):
    hub = pytest.importorskip("pytorchvideo.models.hub")
    src = tmp_path / "X3D_S.pyth"
    torch.save({"model_state": hub.x3d_s(pretrained=False).state_dict()}, src)
    with pytest.raises(ConversionError, match="a PyTorchVideo network that is not one of its ResNets.*X3D"):
        convert_checkpoint(src)


def test_an_unscaled_mmaction2_embedded_gaussian_warns_once_that_float32_comparisons_differ(tmp_path, caplog):
    import logging

    from nonlocalnet.models.checkpoints import mmaction2 as convert_module

    config = "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb"
    _, src = _mmaction2_checkpoint(config, tmp_path, base_channels=8)
    convert_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="nonlocalnet"):
        first, second = convert_checkpoint(src), convert_checkpoint(src)
    assert convert_module.UNSCALED_NOTE in first.notes and convert_module.UNSCALED_NOTE in second.notes
    assert caplog.text.count("compare them in float64 (model.double())") == 1
