"""Every shipped video config walked through its real chain on tiny sizes, with the configs' own paths.

ImageNet (a torchvision-layout ResNet-50 state dict) -> inflated 32x2 / 8x8 baselines and NL models -> the
128-frame frozen-BN NL I3D from the 32x2 I3D (as the official run script) or from the 32x2 NL I3D -> Charades
from the Kinetics models. Only sizes, iterations, worker counts, a gradient-norm clip and the class count (from the
tiny lists: ``data.num_classes=null``) are overridden; every
``model.pretrained`` is the config's own, so a recipe that names a file its predecessor does not write fails here.

Random weights on random pixels at 32² (BN over a few values at res5) give gradients of 1e9 at conv1, and which
run then diverges depended on the pixels: the ImageNet stand-in is torchvision's ResNet-50 with its residual
branches' last BN at zero (``zero_init_residual``, Goyal et al.'s initialisation) and the gradient norm is clipped at 1,
so every step stays finite whatever the clips hold (the walk tests the chain, not the training).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from nonlocalnet.cli import main
from nonlocalnet.io import packaged_configs

from .helpers import write_video

KINETICS = [
    "i3d_r50_32x2",
    "i3d_r50_8x8",
    "c2d_r50_32x2",
    "c2d_r50_8x8",
    "nl_c2d_r50_32x2",
    "nl_c2d_r50_8x8",
    "nl_i3d_r50_32x2",
    "nl_i3d_r50_8x8",
]  # the ones that start from ImageNet
TINY = [
    "--no-progress",
    "train.iterations=2",
    "train.batch_size=2",
    "train.precise_bn_batches=1",
    "train.log_every=1",
    "data.workers=0",
    "data.crop_size=32",
    "data.train_scale=[32,40]",
    "data.test_scale=32",
    "data.test_clips=2",
    "data.test_crops=1",
    "test.batch_size=2",
    "train.clip_grad_norm=1.0",
    "data.num_classes=null",
]


def _frames(cfg: str) -> list[str]:
    if cfg.endswith("128x1"):
        return ["data.frames=32", "data.sampling_rate=1"]  # res3 sees 4 frames: one temporal group
    return ["data.frames=8", "data.sampling_rate=2" if cfg.endswith("32x2") else "data.sampling_rate=1"]


def _walk(name: str) -> dict:
    """Trains the shipped config ``name`` ("kinetics/i3d_r50_32x2") on tiny sizes, then tests it by the CLI."""
    assert main(["train", "--config", f"configs/{name}.yaml", *TINY, *_frames(name)]) == 0
    run = Path("runs") / name
    assert (
        main(
            [
                "test",
                "--config",
                str(run / "config.yaml"),
                "--checkpoint",
                str(run / "model_final.safetensors"),
                "--output",
                str(run / "cli_test.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    return json.loads((run / "cli_test.json").read_text())


@pytest.mark.slow
def test_every_shipped_video_recipe_walks_its_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data/, runs/, pretrained/) land here
    rng = np.random.default_rng(0)
    lines = {"kinetics": [], "charades": []}
    for i in range(4):
        for kind in lines:
            (tmp_path / "data" / kind).mkdir(parents=True, exist_ok=True)
            write_video(tmp_path / "data" / kind / f"v{i}.mp4", rng.integers(0, 255, (36, 40, 48, 3), np.uint8))
            lines[kind].append(f"v{i}.mp4 {i % 2}" if kind == "kinetics" else f"v{i}.mp4 {i},{i + 100}")
    for kind, rows in lines.items():
        for split in ("train_list", "val_list"):
            (tmp_path / "data" / kind / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "pretrained").mkdir()
    imagenet = torchvision.models.resnet50(weights=None, zero_init_residual=True).state_dict()
    torch.save(imagenet, tmp_path / "pretrained" / "resnet50_imagenet.pth")

    # (each walk also trains and tests in train(); the CLI test re-scores the saved weights)
    reports = {name: _walk(f"kinetics/{name}") for name in KINETICS}
    assert all(r["videos"] == 4 and r["views"] == 8 for r in reports.values())
    i3d = load_file(tmp_path / "runs" / "kinetics" / "i3d_r50_32x2" / "model_final.safetensors")
    assert i3d["res2.0.conv_a.weight"].shape[2] == 3  # inflated over time, from the 2D file
    # the 128-frame model from the I3D baseline (the config's own pretrained), then from the NL I3D (BN folded)
    reports["nl_i3d_r50_128x1"] = _walk("kinetics/nl_i3d_r50_128x1")
    nl32 = "runs/kinetics/nl_i3d_r50_32x2/model_final.safetensors"
    assert (
        main(
            [
                "train",
                "--config",
                "configs/kinetics/nl_i3d_r50_128x1.yaml",
                *TINY,
                *_frames("128x1"),
                f"model.pretrained={nl32}",
                "output_dir=runs/kinetics/nl_i3d_r50_128x1_from_nl",
            ]
        )
        == 0
    )
    # Charades from the Kinetics models (157 sigmoid classes; the Kinetics classifier is left out)
    for name in ("i3d_r50_32x2", "nl_i3d_r50_32x2"):
        reports[f"charades/{name}"] = _walk(f"charades/{name}")
        assert "mAP" in reports[f"charades/{name}"]
    walked = (
        {f"kinetics/{n}" for n in KINETICS}
        | {"kinetics/nl_i3d_r50_128x1"}
        | {f"charades/{n}" for n in ("i3d_r50_32x2", "nl_i3d_r50_32x2")}
    )
    shipped = {
        p.relative_to(packaged_configs()).with_suffix("").as_posix()
        for folder in ("kinetics", "charades")
        for p in (packaged_configs() / folder).glob("*.yaml")
    }
    assert shipped - {"kinetics/base"} == walked, "a shipped video config is not walked here"


@pytest.mark.parametrize("name", ["c2d_tiny", "nl_c2d_tiny"])
def test_the_builtin_data_configs_train_and_test(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "train",
                "--config",
                f"configs/synthetic/{name}.yaml",
                "--no-progress",
                "train.iterations=2",
                "train.batch_size=4",
                "data.train_size=8",
                "data.test_size=4",
                "train.precise_bn_batches=1",
            ]
        )
        == 0
    )
    run = tmp_path / "runs" / "synthetic" / name  # the config's own output_dir
    trained = (run / "test_metrics.json").read_text()
    assert main(["test", "--config", str(run / "config.yaml"), "--no-progress"]) == 0
    # the test command writes beside the run's own report, never over it
    assert json.loads((run / "test_metrics_model_final.json").read_text())["videos"] == 4
    assert (run / "test_metrics.json").read_text() == trained


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kind,annotations",
    [
        ("maskrcnn_r50_fpn_nl_1x", "shapes", "instances"),
        ("keypointrcnn_r101_fpn_nl_1x", "figures", "person_keypoints"),
    ],
)
def test_the_detection_recipes_train_and_test_on_coco_files_in_their_layout(
    tmp_path, monkeypatch, capsys, name, kind, annotations
):
    from nonlocalnet.detection.synthetic import make_builtin_coco

    monkeypatch.chdir(tmp_path)  # the config's datasets/coco/... paths land here
    coco = tmp_path / "datasets" / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split, count in (("train2017", 4), ("val2017", 2)):
        _, ann = make_builtin_coco(kind, coco, num_images=count, image_size=64, split=split)
        ann.rename(coco / "annotations" / f"{annotations}_{split}.json")
    sizes = [
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=1",
        "--set",
        "train.workers=0",
        "--set",
        "train.warmup_iters=1",
        "--set",
        "model.min_size=64",
        "--set",
        "model.max_size=64",
    ]
    assert (
        main(["detect-train", "--config", name, "output_dir=run", "device=cpu", "train.max_iters_per_epoch=1", *sizes])
        == 0
    )
    assert main(["detect-test", "--checkpoint", "run/model_final.safetensors", "--results", "results.json"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == ({"bbox", "segm"} if kind == "shapes" else {"bbox", "keypoints"})
