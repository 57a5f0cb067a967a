"""A new user's first steps, walked as typed: each test runs the command or call a newcomer would and reads its
output back (the paths of issue 32: starting weights, configs of one's own, names, the first commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nonlocalnet.cli import main
from nonlocalnet.models import create_model, save_weights
from tests.helpers import video_overrides

TINY_OPTIONS = ["model.name=nl_c2d_tiny"]


# --- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["kinetics/nl_c2d_r50_8x8", "configs/kinetics/nl_c2d_r50_8x8.yaml", "nl_c2d_r50_8x8"])
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
    assert (
        f"base 'kinetics/nl_c2d_r50_8x9' not found; looked at {tmp_path / 'kinetics/nl_c2d_r50_8x9'}, "
        f"{tmp_path / 'kinetics/nl_c2d_r50_8x9.yaml'}, then in the shipped configs under " in err
    )
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
    assert (
        main(
            [
                "test",
                "--checkpoint",
                str(tmp_path / "w.safetensors"),
                "--no-progress",
                "data.test_size=8",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("nl_c2d_tiny on synthetic test data") and "views                          8 (1 per" in out


def test_full_frame_test_with_crop_size_null_runs_and_training_with_it_is_refused(tmp_path, capsys, video_root):
    # the paper's fully-convolutional test: whole 36x44 frames (short side 36), one view per clip, softmax averaged
    # over the res5 positions
    torch.manual_seed(0)
    save_weights(
        create_model("nl_c2d_tiny", num_classes=3), tmp_path / "w.safetensors", metadata={"model": "nl_c2d_tiny"}
    )
    overrides = video_overrides(video_root, tmp_path / "run")
    full = ["data.crop_size=null", "data.test_crops=1", "test.batch_size=1", "test.fully_convolutional=true"]
    assert (
        main(
            [
                "test",
                "--checkpoint",
                str(tmp_path / "w.safetensors"),
                *overrides,
                *full,
                "--output",
                str(tmp_path / "full.json"),
            ]
        )
        == 0
    )
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


# --- names -------------------------------------------------------------------------------------------------------


def test_version_and_no_main_job_in_the_cli(capsys):
    from nonlocalnet import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"nonlocalnet {__version__}\n"
    assert main([]) == 0
    assert "main job" not in capsys.readouterr().out


def test_models_command_lists_names_with_parameters_clip_and_blocks(capsys):
    assert main(["models", "nl_i3d_r50*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "parameters", "clip", "non-local", "blocks", "also"]
    assert [line.split()[0] for line in lines[1:-1]] == ["nl_i3d_r50", "nl_i3d_r50_128x1", "nl_i3d_r50_8x8"]
    assert lines[1].split() == [
        "nl_i3d_r50",
        "35.40M",
        "32x2",
        "res3:",
        "1,",
        "3;",
        "res4:",
        "1,",
        "3,",
        "5",
        "(embedded_gaussian)",
        "nl_i3d_r50_32x2",
    ]
    assert lines[-1].startswith("3 model(s)")
    assert main(["models", "nl_i3d_r50_32x2"]) == 0  # an alias finds its model
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "nl_i3d_r50"
    assert main(["models", "nl_i3d_r5O*"]) == 2
    assert "no model matches 'nl_i3d_r5O*'" in capsys.readouterr().err


def test_the_models_table_for_the_docs_lists_exactly_the_registry():
    from nonlocalnet.models import list_models
    from nonlocalnet.models.catalog import models_markdown

    table = models_markdown().splitlines()
    assert [row.split("`")[1] for row in table[2:]] == list_models()
    assert "| `c2d_r50` | `c2d_r50_32x2` | 32x2 | - | 24,327,632 | C2D ResNet-50 (Table 1), 32x2 clip |" in table


def test_every_shipped_video_config_is_named_as_the_model_it_builds():
    from nonlocalnet.engine import load_config
    from nonlocalnet.io import shipped_configs
    from nonlocalnet.models import get_model_entry

    configs = [c for c in shipped_configs() if not c.startswith("coco/")]
    assert len(configs) == 13
    for config in configs:
        built = load_config(config)["model"]["name"]
        assert get_model_entry(Path(config).name).name == built, config  # the stem is the name, or its alias


def test_create_model_takes_a_pretrained_file_and_num_classes_as_timm_does(tmp_path):
    torch.manual_seed(0)
    baseline = create_model("c2d_tiny").eval()
    save_weights(baseline, tmp_path / "c2d_tiny.safetensors")
    model = create_model("nl_c2d_tiny", pretrained=tmp_path / "c2d_tiny.safetensors").eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(clip), baseline(clip))  # the baseline's weights, the new block the identity
    five = create_model("nl_c2d_tiny", pretrained=tmp_path / "c2d_tiny.safetensors", num_classes=5)
    assert five.num_classes == 5 and torch.equal(five.res2[0].conv_a.weight, baseline.res2[0].conv_a.weight)
    assert create_model("nl_i3d_r50_32x2", num_classes=7, layers=(1, 4, 6, 1), width=4).num_classes == 7


def test_torch_hub_builds_and_loads_a_model_by_its_alias(tmp_path):
    repo = str(Path(__file__).resolve().parents[1])
    small = dict(layers=(1, 4, 6, 1), width=4, num_classes=3)
    model = torch.hub.load(repo, "nl_i3d_r50_32x2", source="local", **small)
    save_weights(model, tmp_path / "w.safetensors", metadata={"model": "nl_i3d_r50"})
    loaded = torch.hub.load(
        repo, "nl_i3d_r50_32x2", source="local", pretrained=str(tmp_path / "w.safetensors"), **small
    )
    assert torch.equal(loaded.res4.nl1.theta.weight, model.res4.nl1.theta.weight)


def test_create_model_with_a_name_to_download_says_how_to_make_the_file(tmp_path, capsys):
    with pytest.raises(
        FileNotFoundError,
        match="nonlocalnet downloads no weights. Convert a checkpoint with `nonlocalnet convert IN OUT.safetensors`",
    ):
        create_model("nl_i3d_r50", pretrained="kinetics400")
    with pytest.raises(ValueError, match="pretrained must be the path of a weights file; got True"):
        create_model("nl_i3d_r50", pretrained=True)


def test_missing_videos_hint_names_the_cli_key(tmp_path, capsys, video_root):
    (tmp_path / "list.txt").write_text("gone.mp4 0\nv0.mp4 1\n")
    overrides = video_overrides(video_root, tmp_path / "run") + [f"data.train_list={tmp_path / 'list.txt'}"]
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 videos listed in" in err and "gone.mp4" in err
    assert "to drop them: data.skip_missing=true in a config or on the command line, skip_missing=True in Python" in err


def test_a_benchmark_runs_as_a_file_from_any_folder(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "block.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: block.py")
