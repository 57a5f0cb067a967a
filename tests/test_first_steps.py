"""A new user's first steps, walked as typed: each test runs the command or call a newcomer would and reads its
output back (the paths of issue 32: starting weights, configs of one's own, names, the first commands)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nonlocalnet.cli import main
from nonlocalnet.models import create_model, save_weights
from tests.test_train import _video_overrides, video_root  # noqa: F401  (video_root is a fixture)

TINY_OPTIONS = ["model.name=nl_c2d_tiny"]


# --- configs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["kinetics/nl_c2d_r50_8x8", "configs/kinetics/nl_c2d_r50_8x8.yaml",
                                  "nl_c2d_r50_8x8"])
def test_a_users_config_extends_a_shipped_one_by_the_name_config_takes(tmp_path, monkeypatch, base):
    monkeypatch.chdir(tmp_path)  # any folder: nothing here but the user's file
    (tmp_path / "mine.yaml").write_text(f"base: {base}\ntrain:\n  iterations: 4\n")
    from nonlocalnet.engine import load_config

    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg["model"]["name"] == "nl_c2d_r50_8x8" and cfg["train"]["iterations"] == 4
    assert cfg["data"]["crop_size"] == 224 and cfg["train"]["lr_steps"] == [150000, 300000]  # kinetics/base.yaml


def test_a_base_beside_the_file_wins_over_a_shipped_config_of_that_name(tmp_path):
    from nonlocalnet.engine import load_config

    (tmp_path / "nl_c2d_r50_8x8.yaml").write_text("model:\n  name: c2d_tiny\n")
    (tmp_path / "mine.yaml").write_text("base: nl_c2d_r50_8x8\n")
    assert load_config(tmp_path / "mine.yaml")["model"]["name"] == "c2d_tiny"


def test_a_missing_base_names_every_place_looked(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("base: kinetics/nl_c2d_r50_8x9\n")
    assert main(["train", "--config", str(tmp_path / "mine.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"base 'kinetics/nl_c2d_r50_8x9' not found; looked at {tmp_path / 'kinetics/nl_c2d_r50_8x9'}, " \
           f"{tmp_path / 'kinetics/nl_c2d_r50_8x9.yaml'}, then in the shipped configs under " in err
    assert "kinetics/nl_c2d_r50_8x8.yaml" in err  # the shipped names it could have meant


# --- the first commands ------------------------------------------------------------------------------------------

def test_train_without_arguments_refuses_and_lists_the_shipped_configs(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nonlocalnet train: error: pass --config: a shipped config (charades/i3d_r50_32x2, ")
    assert "synthetic/nl_c2d_tiny" in err and "kinetics/nl_i3d_r50_8x8" in err and "coco/" not in err
    assert "kinetics/base" not in err


def test_test_without_config_builds_the_model_the_checkpoint_records(tmp_path, capsys):
    torch.manual_seed(0)
    save_weights(create_model("nl_c2d_tiny"), tmp_path / "w.safetensors", metadata={"model": "nl_c2d_tiny"})
    assert main(["test", "--checkpoint", str(tmp_path / "w.safetensors"), "--no-progress", "data.test_size=8",
                 f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nl_c2d_tiny on synthetic test data") and "views                          8 (1 per" in out


def test_full_frame_test_with_crop_size_null_runs_and_training_with_it_is_refused(tmp_path, capsys, video_root):
    # the paper's fully-convolutional test: whole 36x44 frames (short side 36), one view per clip, softmax averaged
    # over the res5 positions
    torch.manual_seed(0)
    save_weights(create_model("nl_c2d_tiny", num_classes=3), tmp_path / "w.safetensors",
                 metadata={"model": "nl_c2d_tiny"})
    overrides = _video_overrides(video_root, tmp_path / "run")
    full = ["data.crop_size=null", "data.test_crops=1", "test.batch_size=1", "test.fully_convolutional=true"]
    assert main(["test", "--checkpoint", str(tmp_path / "w.safetensors"), *overrides, *full,
                 "--output", str(tmp_path / "full.json")]) == 0
    report = json.loads((tmp_path / "full.json").read_text())
    assert report["videos"] == 2 and report["views"] == 2 * 2  # 2 clips x 1 crop each
    from nonlocalnet.data import build_dataset
    from nonlocalnet.engine import load_config

    clip = build_dataset(load_config(None, overrides + full)["data"], "test")[0]["clip"]
    assert tuple(clip.shape) == (3, 8, 36, 44)  # the whole frame, not a 32x32 crop
    capsys.readouterr()
    assert main(["train", *overrides, *full]) == 2
    assert "data.crop_size=null: full frames) is for testing only" in capsys.readouterr().err
    assert main(["test", "--checkpoint", str(tmp_path / "w.safetensors"), *overrides, "data.crop_size=null"]) == 2
    assert "data.crop_size=null (full frames at test time) takes data.test_crops=1; got 3" in capsys.readouterr().err
