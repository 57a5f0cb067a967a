"""Issue 31's tracebacks and unclear messages: each one `error:` line naming what is wrong, exit status 2."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import save_file

from nonlocalnet.cli import main
from nonlocalnet.commands.visualize import output_path
from nonlocalnet.models import create_model

TINY = "configs/synthetic/nl_c2d_tiny.yaml"
QUICK = [
    "progress=false",
    "data.test_size=8",
    "data.train_size=16",
    "train.batch_size=8",
    "train.log_every=1",
    "train.precise_bn_batches=1",
    "train.lr_steps=[]",
    "train.iterations=2",
    "train.checkpoint_every=1",
]


def _one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nonlocalnet {argv[0]}: error: " in err, err
    return err


@pytest.mark.parametrize(
    "device, message",
    [
        ("banana", "device 'banana' is no device: use auto, cpu, cuda or cuda:N"),
        ("cuda:7", "device 'cuda:7' asked for, but"),
    ],
)
def test_a_device_that_is_not_there_is_one_error_line_in_train(capsys, tmp_path, device, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    assert message in _one_line(
        capsys, ["train", "--config", TINY, *QUICK, f"output_dir={tmp_path}", f"device={device}"]
    )


def test_a_device_that_is_not_there_is_one_error_line_in_detect_test(capsys, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"task": "detection", "model": {}, "config": {"model": {"task": "mask"}, "data": {"builtin": "shapes"}}}, path
    )
    assert "device 'banana' is no device" in _one_line(
        capsys, ["detect-test", "--checkpoint", str(path), "device=banana"]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["flops", "c2d_r50", "--batch", "-3"], "argument --batch: must be at least 1; got -3"),
        (
            ["visualize", "--checkpoint", "w.safetensors", "--video", "v.mp4", "--top-k", "-1"],
            "argument --top-k: must be at least 1; got -1",
        ),
        (["feature-bank-demo", "--threads", "0"], "argument --threads: must be at least 1; got 0"),
    ],
)
def test_a_count_below_one_on_the_command_line_is_one_error_line(capsys, argv, message):
    assert message in _one_line(capsys, argv)


def test_visualize_out_naming_a_folder_writes_inside_it_and_says_so(tmp_path):
    assert output_path(f"{tmp_path}/some/folder/") == tmp_path / "some" / "folder" / "attention.png"
    assert output_path(str(tmp_path)) == tmp_path / "attention.png"  # an existing folder
    assert output_path(f"{tmp_path}/pic") == tmp_path / "pic.png"  # the suffix the PNG writer would add
    assert output_path(f"{tmp_path}/pic.png") == tmp_path / "pic.png"


def test_a_full_disk_while_writing_a_checkpoint_is_one_error_line_naming_the_file(capsys, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, f, *args, **kwargs):
        if "iteration" in obj and obj["iteration"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    err = _one_line(capsys, ["train", "--config", TINY, *QUICK, f"output_dir={tmp_path}"])
    assert (
        f"no space left on the device while writing {tmp_path / 'checkpoints' / 'checkpoint_000000002.pt'}; "
        f"the files written before are intact" in err
    )
    assert torch.load(tmp_path / "checkpoints" / "checkpoint_000000001.pt", weights_only=True)["iteration"] == 1


def test_memory_that_runs_out_is_one_error_line(capsys, tmp_path, monkeypatch):
    import nonlocalnet.engine.trainer as trainer

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(trainer.VideoClassification, "forward", no_memory)  # a training step's forward pass
    err = _one_line(capsys, ["train", "--config", TINY, *QUICK, f"output_dir={tmp_path}"])
    assert "out of memory (an allocation failed); lower train.batch_size" in err


def test_resume_followed_by_an_override_takes_it_as_an_override(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, *QUICK, f"output_dir={out}"]) == 0
    capsys.readouterr()
    err = _one_line(capsys, ["train", "--config", TINY, *QUICK, f"output_dir={out}", "--resume", "train.lr=0.5"])
    assert "the config differs from the one the checkpoint was trained with (train.lr: 0.1 -> 0.5)" in err


def test_a_metrics_log_that_is_not_utf8_is_one_error_line_naming_file_and_line(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, *QUICK, f"output_dir={out}"]) == 0
    capsys.readouterr()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "note": "\xff"}\n')
    err = _one_line(capsys, ["train", "--config", TINY, *QUICK, f"output_dir={out}", "--resume"])
    assert f"{out / 'metrics.jsonl'} line 4: not UTF-8 text (byte 0xff)" in err


def _weights(tmp_path, change=None, metadata=None):
    state = {k: v.contiguous() for k, v in create_model("nl_c2d_tiny", num_classes=2).state_dict().items()}
    if change:
        change(state)
    path = tmp_path / "w.safetensors"
    save_file(state, path, metadata={"model": "nl_c2d_tiny", **(metadata or {})})
    return path


def test_safetensors_model_options_that_are_not_a_mapping_are_one_error_line(capsys, tmp_path):
    path = _weights(tmp_path, metadata={"model_options": "[1, 2]"})
    err = _one_line(capsys, ["test", "--config", TINY, *QUICK, f"output_dir={tmp_path}", "--checkpoint", str(path)])
    assert f"{path}" in err and "model_options must be a JSON object of keyword arguments; got '[1, 2]'" in err


def test_a_zero_dimensional_classifier_weight_is_one_error_naming_the_tensor(tmp_path):
    from nonlocalnet.models.checkpoints.weights import load_model

    def flat(state):
        state["head.fc.weight"] = torch.tensor(1.0)

    path = _weights(tmp_path, flat)
    with pytest.raises(
        ValueError,
        match=r"w.safetensors: tensor 'head.fc.weight' must be 2-D \(classes x features\); "
        r"got shape \[\]",
    ):
        load_model(path)  # (before: IndexError from shape[0], a traceback in `visualize`)


@pytest.mark.parametrize("blob", ["conv1_w", "res2_0_branch2b_w"])
def test_convert_of_a_caffe2_file_with_a_2d_stem_or_branch_is_one_error_line(capsys, tmp_path, blob):
    import numpy as np

    from tests.test_caffe2 import official_blobs, write_pickle

    r50 = {2: [1, 0, 1], 3: [1, 0, 1, 0], 4: [1, 0, 1, 0, 1, 0], 5: [0, 1, 0]}
    blobs = official_blobs(r50, {})
    blobs[blob] = np.zeros((4, 3), dtype=np.float32)
    path = write_pickle(tmp_path / "i3d_baseline_32x2.pkl", blobs)
    err = _one_line(capsys, ["convert", str(path), str(tmp_path / "out.safetensors")])
    message = {
        "conv1_w": "no 5-D conv1_w blob",
        "res2_0_branch2b_w": "res2_0_branch2b_w must be a 5-D convolution weight (out, in, t, h, w); got shape [4, 3]",
    }[blob]
    assert message in err


def test_a_full_disk_while_writing_config_yaml_or_model_final_names_the_file_and_keeps_the_old_one(
    tmp_path, monkeypatch
):
    from pathlib import Path

    from nonlocalnet.cli import user_error
    from nonlocalnet.io import write_text_atomic

    target = tmp_path / "config.yaml"
    target.write_text("seed: 1\n")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as caught:
        write_text_atomic(target, "seed: 2\n")
    monkeypatch.undo()
    assert user_error(caught.value) == (
        f"no space left on the device while writing {target}; the files written before are intact: free space and rerun"
    )
    assert target.read_text() == "seed: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
