"""Runs that never lose or mix data, and files that never run code (single process; the multi-process and
fault-injection walks are in test_faults.py)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.cli import main
from nonlocalnet.engine import load_config, train
from nonlocalnet.engine.checkpoint import list_checkpoints, save_checkpoint
from nonlocalnet.engine.rundir import RunDirectoryError, config_changes

TINY = "configs/synthetic/nl_c2d_tiny.yaml"
QUICK = [
    "progress=false",
    "data.test_size=16",
    "data.train_size=128",
    "train.batch_size=8",
    "train.log_every=2",
    "train.precise_bn_batches=2",
    "model.options.dropout=0.5",
    "train.lr_steps=[6]",
    "train.iterations=8",
    "train.checkpoint_every=3",
]


def _cfg(out: Path, *extra: str):
    return load_config(TINY, QUICK + [f"output_dir={out}", *extra])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model_final.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds", "run")} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted run, the reference of every resumption below."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_cfg(out))
    return out


# --- one run per directory -------------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_directory_refuses_and_touches_nothing(tmp_path, straight):
    out = tmp_path / "run"
    train(_cfg(out))
    # (the lock file records whichever process held the directory last, the refused one too)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(
        RunDirectoryError,
        match=r"already holds a run \(checkpoints, metrics.jsonl.*--resume.*"
        r"another directory \(output_dir=\.\.\.\)",
    ):
        train(_cfg(out, "train.lr=0.02"))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_rotation_never_deletes_the_checkpoint_it_just_wrote(tmp_path):
    save_checkpoint({"iteration": 100}, tmp_path, 100, keep=1)
    save_checkpoint({"iteration": 10}, tmp_path, 10, keep=1)  # before the fix: 10 was deleted at once
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000000010.pt", "checkpoint_000000100.pt"]


def test_a_start_that_fails_leaves_the_config_of_the_run_as_it_was(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=3)
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(RunDirectoryError, match="model.name"):
        train(_cfg(out, "model.name=c2d_tiny"), resume=True)
    assert (out / "config.yaml").read_bytes() == config
    # told to go ahead, the weights still do not fit: a clear error, and the config is still the run's
    with pytest.raises(ValueError, match="checkpoint_000000003.pt holds weights of another model"):
        train(_cfg(out, "model.name=c2d_tiny"), resume=True, allow_config_change=True)
    assert (out / "config.yaml").read_bytes() == config


def test_resume_refuses_a_changed_config_unless_allowed_and_names_the_keys(tmp_path, straight, caplog):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=4)
    with pytest.raises(
        RunDirectoryError,
        match=r"train.batch_size: 8 -> 4; train.lr: 0.1 -> 0.02.*"
        r"--allow-config-change",
    ):
        train(_cfg(out, "train.lr=0.02", "train.batch_size=4"), resume=True)
    # what does not change the computation is not a change: loader processes, progress, evaluation
    assert (
        config_changes(
            _cfg(out),
            _cfg(tmp_path / "elsewhere", "data.workers=2", "progress=true", "test.batch_size=3", "train.log_every=5"),
        )
        == []
    )
    with caplog.at_level(logging.WARNING, logger="nonlocalnet"):
        report = train(_cfg(out, "train.lr=0.02"), resume=True, allow_config_change=True)
    assert "resuming" in caplog.text and "train.lr: 0.1 -> 0.02" in caplog.text
    assert report["videos"] == 16
    # and it did train differently
    assert not torch.equal(_weights(out)["head.fc.weight"], _weights(straight)["head.fc.weight"])


def test_resume_falls_back_over_an_unreadable_newest_checkpoint(tmp_path, straight, caplog):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=7)  # checkpoints 3, 6, 7
    newest = out / "checkpoints" / "checkpoint_000000007.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short, a disk that filled up
    with caplog.at_level(logging.WARNING, logger="nonlocalnet"):
        train(_cfg(out), resume=True)
    assert "checkpoint_000000007.pt" in caplog.text and "falling back to" in caplog.text
    assert "checkpoint_000000006.pt" in caplog.text
    _assert_same_weights(out, straight)
    assert (out / "checkpoints" / "checkpoint_000000007.pt.unreadable").is_file()  # kept aside, out of rotation


def test_resume_with_no_readable_checkpoint_is_one_error(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=3)
    (out / "checkpoints" / "checkpoint_000000003.pt").write_bytes(b"\0" * 64)
    with pytest.raises(RunDirectoryError, match="no checkpoint in .* can be read"):
        train(_cfg(out), resume=True)


def test_a_resumed_run_clears_debris_and_its_metrics_read_as_one_run(tmp_path, straight):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=7)  # logged 2, 4, 6, 7; checkpoints 3, 6, 7
    (out / "checkpoints" / "checkpoint_000000007.pt").unlink()  # killed before the step-7 checkpoint landed
    debris = out / "checkpoints" / ".checkpoint_000000007.pt.x1y2.tmp"
    debris.write_bytes(b"half a checkpoint")
    (out / ".model_final.safetensors.abcd.tmp").write_bytes(b"half")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "split": "tr')  # a row torn by the kill
    train(_cfg(out), resume=True)  # from 6: steps 7 and 8 are replayed
    assert not debris.exists() and not list(out.glob(".*.tmp"))
    assert _rows(out) == _rows(straight)
    _assert_same_weights(out, straight)


def test_resume_from_an_earlier_checkpoint_into_a_run_that_went_further_refuses(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out))
    with pytest.raises(RunDirectoryError, match="already holds a later checkpoint"):
        train(_cfg(out), resume=out / "checkpoints" / "checkpoint_000000006.pt")


def test_the_demo_replaces_its_own_runs_when_rerun(tmp_path):
    from nonlocalnet.engine.demo import run_demo

    args = dict(
        variants=["baseline"],
        overrides=QUICK[:-2] + ["train.iterations=2", "data.test_size=8"],
        jobs=1,
        pictures=False,
        echo=lambda *a: None,
    )
    first = run_demo(tmp_path, **args)
    messages = []
    second = run_demo(tmp_path, **{**args, "echo": messages.append})
    assert any("replacing the previous demo's run" in m for m in messages)
    assert first["rows"][0]["top1"] == second["rows"][0]["top1"]


# --- files never run code --------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(path: Path, marker: Path, layout: dict) -> Path:
    with open(path, "wb") as f:
        pickle.dump({**layout, "payload": _Payload(marker)}, f, protocol=2)
    return path


@pytest.mark.parametrize(
    "command", ["train-resume", "test-checkpoint", "pretrained", "convert-caffe2", "detect-train-resume", "detect-test"]
)
def test_no_file_we_load_runs_code(tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    evil = _hostile(tmp_path / "evil.pt", marker, {"model": {}, "blobs": {}, "config": {}, "epoch": 0})
    out = tmp_path / "run"
    argv = {
        "train-resume": ["train", "--config", TINY, *QUICK, f"output_dir={out}", "--resume", str(evil)],
        "test-checkpoint": ["test", "--config", TINY, *QUICK, f"output_dir={out}", "--checkpoint", str(evil)],
        "pretrained": ["train", "--config", TINY, *QUICK, f"output_dir={out}", f"model.pretrained={evil}"],
        "convert-caffe2": ["convert-caffe2", str(evil), str(tmp_path / "out.safetensors"), "--model", "nl_c2d_tiny"],
        "detect-train-resume": [
            "detect-train",
            f"output_dir={out}",
            "--resume",
            str(evil),
            "data.num_train=2",
            "data.num_val=2",
            "device=cpu",
        ],
        "detect-test": ["detect-test", "--checkpoint", str(evil), "device=cpu"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err
    assert "could run code" in err and "posix.system" in err, err


# --- detection: the same guarantees ----------------------------------------------------------------------------


def _detection_config(output_dir):
    from tests.test_detection import _tiny_config

    config = _tiny_config("shapes", "mask", output_dir, mask_head_channels=16)
    config["train"].update(epochs=2, max_iters_per_epoch=3, eval_every=2, log_every=3)  # a log row per epoch
    config["train"]["hflip"] = 0.5  # a random transform: the resumed run must draw the same flips
    return config


def test_detection_resume_continues_the_epoch_order_and_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    import nonlocalnet.detection.train as detection

    detection.train(_detection_config(tmp_path / "a"))
    with pytest.raises(RunDirectoryError, match="already holds a run"):  # one run per directory here too
        detection.train(_detection_config(tmp_path / "a"))

    real = detection.Detection.forward
    calls = []

    def crash_in_epoch_1(self, *args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while training the second epoch
        return real(self, *args)

    monkeypatch.setattr(detection.Detection, "forward", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        detection.train(_detection_config(tmp_path / "b"))
    monkeypatch.setattr(detection.Detection, "forward", real)
    changed = _detection_config(tmp_path / "b")
    changed["train"]["lr"] = 0.05
    with pytest.raises(RunDirectoryError, match=r"train.lr: 0.02 -> 0.05"):
        detection.train(changed, resume=True)
    debris = tmp_path / "b" / "checkpoints" / ".checkpoint_000000003.pt.x1y2.tmp"  # a kill during a write
    debris.write_bytes(b"half")
    detection.train(_detection_config(tmp_path / "b"), resume=True)
    assert not debris.exists()
    a = torch.load(tmp_path / "a" / "checkpoints" / "checkpoint_000000006.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "checkpoint_000000006.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key  # epoch 1 saw epoch 1's images and flips, not epoch 0's again
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")  # one row per epoch and the test, as uninterrupted
    assert [(r["step"], r["split"]) for r in _rows(tmp_path / "b")] == [(3, "train"), (6, "train"), (6, "test")]


def test_a_failed_detection_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import nonlocalnet.detection.train as detection

    real, calls = torch.save, []

    def full_disk_at_the_second_write(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half")
            raise OSError("disk full")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_at_the_second_write)
    config = _detection_config(tmp_path)
    config["train"]["max_iters_per_epoch"] = 1
    with pytest.raises(OSError, match="disk full"):
        detection.train(config)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoints" / "checkpoint_000000001.pt", weights_only=True)["iteration"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_000000001.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "run.json",
        "tensorboard",
    ]  # no .tmp debris


def test_a_detection_rerun_into_a_used_directory_is_one_error_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = ["detect-train", f"output_dir={out}", "device=cpu", "data.num_train=2"]
    line = _error_line(capsys, argv, "detect-train")
    assert f"output_dir {out} already holds a run (metrics.jsonl); continue it with --resume" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl"]  # the lock file of the refused start
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _detection_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"task": "detection", "model": {}, "config": {"model": {"task": "mask"}, "data": {"builtin": "shapes"}}}, path
    )
    return path


@pytest.mark.parametrize("command", ["detect-train", "detect-test", "train", "convert", "flops", "visualize"])
def test_a_bad_override_is_one_error_line_naming_it_in_every_command(tmp_path, capsys, command):
    argv, message = {
        "detect-train": (
            ["detect-train", "device=cpu", "--set", "train.epoch=2"],
            "unknown config key 'train.epoch'; known keys of 'train': amp, batch_size",
        ),
        "detect-test": (
            ["detect-test", "--checkpoint", str(_detection_checkpoint(tmp_path)), "device=cpu", "data.num_vall=3"],
            "unknown config key 'data.num_vall'",
        ),
        "train": (["train", "--config", TINY, "--set", "train.lr=fast"], "train.lr must be a finite number"),
        "convert": (
            ["convert", str(tmp_path / "in.pkl"), str(tmp_path / "out.safetensors"), "--set", "layers"],
            "override 'layers' must look like key=value (e.g. layers=[3,4,6,3])",
        ),
        "flops": (["flops", "c2d_r50", "--set", "width=[1,"], "override 'width=[1,': value is not valid YAML"),
        "visualize": (
            ["visualize", "--checkpoint", str(tmp_path / "w.safetensors"), "--video", "v.mp4", "--set", "2width=4"],
            "override '2width=4': '2width' is not an option name",
        ),
    }[command]
    assert message in _error_line(capsys, argv, command)


def test_detection_sampler_orders_differ_by_epoch_repeat_for_the_same_epoch_and_skip_what_was_read():
    from nonlocalnet.detection.loaders import make_loader

    first = list(make_loader(list(range(20)), 2, 0, train=True, seed=3, epoch=0).sampler)
    second = list(make_loader(list(range(20)), 2, 0, train=True, seed=3, epoch=1).sampler)
    again = list(make_loader(list(range(20)), 2, 0, train=True, seed=3, epoch=1).sampler)
    later = list(make_loader(list(range(20)), 2, 0, train=True, seed=3, epoch=1, skip=6).sampler)
    assert first != second and again == second and sorted(second) == list(range(20)) and later == second[6:]


# --- corrupt data: counted once per video, never fatal while one video decodes ---------------------------------


def test_corrupt_videos_are_counted_once_each_in_training_and_testing(tmp_path):
    import shutil

    from tests.helpers import video_overrides, write_video

    root = tmp_path / "videos"
    root.mkdir()
    rng = torch.Generator().manual_seed(0)
    write_video(root / "good.mp4", torch.randint(0, 255, (20, 36, 44, 3), generator=rng, dtype=torch.uint8).numpy())
    for i in range(8):
        shutil.copy(root / "good.mp4", root / f"g{i}.mp4")
    for i in range(4):
        (root / f"bad{i}.mp4").write_bytes(bytes([i]) * 2048)
    # 12 videos, 4 corrupt (three of them in a row), each with 2 x 3 test views and drawn often in training
    names = ["g0", "bad0", "g1", "g2", "bad1", "bad2", "bad3", "g3", "g4", "g5", "g6", "g7"]
    listing = "".join(f"{n}.mp4 {i % 3}\n" for i, n in enumerate(names))
    (root / "list.txt").write_text("\ufeff" + listing)  # and a byte-order mark, as Windows editors write
    overrides = video_overrides(root, tmp_path / "run") + [
        f"data.train_list={root / 'list.txt'}",
        f"data.test_list={root / 'list.txt'}",
        "train.iterations=12",
        "train.batch_size=4",
    ]
    report = train(load_config(None, overrides))
    assert report["skipped_videos"] == 4  # not one per view and per replacement walked past (42 here)
    assert report["videos"] == 8 and report["views"] == 12 * 6
    assert report["skipped_videos_train"] == 4  # 48 draws of 12 videos: every corrupt one was drawn


# --- COCO files: checked up front, named ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> tuple[Path, dict]:
    from nonlocalnet.detection.synthetic import make_builtin_coco

    root = tmp_path_factory.mktemp("coco")
    images, annotations = make_builtin_coco("shapes", root, num_images=3, image_size=64, split="val")
    return Path(images), json.loads(Path(annotations).read_text())


def _break(data: dict, how: str) -> dict:
    data = json.loads(json.dumps(data))
    first = data["annotations"][0]
    if how == "no bbox":
        del first["bbox"]
    elif how == "no categories":
        del data["categories"]
    elif how == "no category_id":
        del first["category_id"]
    elif how == "unknown category_id":
        first["category_id"] = 99
    elif how == "empty segmentation":
        first["segmentation"] = []
    elif how == "unknown image_id":
        first["image_id"] = 12345
    return data


@pytest.mark.parametrize(
    "how,message",
    [
        ("no bbox", r"annotations without 'bbox' \(ids\): 1"),
        ("no categories", "no 'categories' list"),
        ("no category_id", r"annotations without 'category_id' \(ids\): 1"),
        (
            "unknown category_id",
            r"annotations of categories the file does not list \(\[1, 2, 3\]\): 1 \(category_id 99\)",
        ),
        ("empty segmentation", r"annotations without a mask .*\(ids\): 1"),
        ("unknown image_id", r"annotations of images the file does not list: 1 \(image_id 12345\)"),
    ],
)
def test_a_broken_coco_file_is_refused_up_front_naming_the_entry(tmp_path, coco_files, how, message):
    from nonlocalnet.detection.coco import CocoDetection, CocoFormatError

    images, data = coco_files
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_break(data, how)))
    with pytest.raises(CocoFormatError, match=f"{path}: {message}"):
        CocoDetection(images, path, masks=True, train=True)


def test_detect_commands_turn_broken_inputs_into_one_error_line(tmp_path, coco_files, capsys):
    images, data = coco_files
    (tmp_path / "bad.json").write_text(json.dumps(_break(data, "unknown category_id")))
    (tmp_path / "empty.json").write_text(json.dumps({**data, "annotations": []}))
    common = [
        "--set",
        f"data.train_images={images}",
        "--set",
        f"data.val_images={images}",
        "--set",
        "data.builtin=null",
        f"output_dir={tmp_path / 'run'}",
        "device=cpu",
        "train.max_iters_per_epoch=1",
    ]
    assert (
        main(
            [
                "detect-train",
                *common,
                "--set",
                f"data.train_annotations={tmp_path / 'bad.json'}",
                "--set",
                f"data.val_annotations={tmp_path / 'bad.json'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: " in err and "category_id 99" in err and "Traceback" not in err
    assert (
        main(
            [
                "detect-train",
                *common,
                "--set",
                f"data.train_annotations={tmp_path / 'bad.json'}",
                "--set",
                f"data.val_annotations={tmp_path / 'empty.json'}",
            ]
        )
        == 2
    )
    assert "has no annotations: there is nothing to score AP against" in capsys.readouterr().err


# --- one error path: a user error is one `error:` line and exit status 2 --------------------------------------


def _error_line(capsys, argv: list[str], name: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if f"nonlocalnet {name}: error: " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "run"
    train(_cfg(out, "train.iterations=2"))
    return out / "model_final.safetensors"


def test_user_errors_are_one_line(tmp_path, capsys, tiny_weights):
    from tests.helpers import video_overrides

    run = ["train", "--config", TINY, *QUICK, f"output_dir={tmp_path / 'run'}"]
    assert "train.lr must be a finite number; got 'abc'" in _error_line(capsys, run + ["train.lr=abc"], "train")
    assert "train.checkpoint_every must be at least 1" in _error_line(
        capsys, run + ["train.checkpoint_every=0"], "train"
    )
    line = _error_line(capsys, run + ["model.name=nl_i3d_r50_8x16"], "train")
    assert "unknown model 'nl_i3d_r50_8x16'" in line and "did you mean nl_i3d_r50_8x8," in line
    (tmp_path / "five.yaml").write_text("train: 5\n")
    assert "config section 'train' must be a mapping" in _error_line(
        capsys, ["train", "--config", str(tmp_path / "five.yaml")], "train"
    )
    # data: a directory as the list, and a list of corrupt videos read by two loader processes
    (tmp_path / "videos").mkdir()
    for i in range(3):
        (tmp_path / "videos" / f"bad{i}.mp4").write_bytes(b"\1" * 1024)
    (tmp_path / "videos" / "list.txt").write_text("bad0.mp4 0\nbad1.mp4 1\nbad2.mp4 2\n")
    videos = video_overrides(tmp_path / "videos", tmp_path / "vrun")
    line = _error_line(capsys, ["train", *videos, f"data.train_list={tmp_path / 'videos'}"], "train")
    assert f"video list {tmp_path / 'videos'} is a directory" in line
    line = _error_line(
        capsys, ["train", *videos, f"data.train_list={tmp_path / 'videos' / 'list.txt'}", "data.workers=2"], "train"
    )
    assert "every video listed in" in line and "failed to decode (3 videos)" in line
    # weights: cut short, and of another class count
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_weights.read_bytes()[:200])
    test = ["test", "--config", TINY, *QUICK, f"output_dir={tmp_path / 'trun'}", "--no-progress"]
    assert f"cannot read {cut}" in _error_line(capsys, test + ["--checkpoint", str(cut)], "test")
    line = _error_line(capsys, test + ["data.num_classes=5", "--checkpoint", str(tiny_weights)], "test")
    assert "does not fit nl_c2d_tiny with data.num_classes=5" in line and "size mismatch" in line


def test_convert_caffe2_names_a_blob_that_is_no_array_and_creates_its_output_folder(tmp_path, capsys):
    from tests.helpers import C2D_TEMP, official_blobs, write_pickle

    blobs = official_blobs(C2D_TEMP, {})
    good = write_pickle(tmp_path / "good.pkl", blobs)
    out = tmp_path / "new" / "folder" / "c2d.safetensors"
    assert (
        main(
            [
                "convert-caffe2",
                str(good),
                str(out),
                "--model",
                "c2d_r50",
                "--set",
                "layers=[2,4,6,2]",
                "--set",
                "width=4",
            ]
        )
        == 0
    )
    assert out.is_file()
    blobs["res2_0_branch2a_w"] = "not an array"
    bad = write_pickle(tmp_path / "bad.pkl", blobs)
    line = _error_line(
        capsys, ["convert-caffe2", str(bad), str(tmp_path / "o.safetensors"), "--model", "c2d_r50"], "convert-caffe2"
    )
    assert "blob 'res2_0_branch2a_w' is a str, not a numeric array" in line


def test_cli_resume_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out), stop_after=4)
    argv = ["train", "--config", TINY, *QUICK, f"output_dir={out}", "train.lr=0.02", "--resume"]
    assert "train.lr: 0.1 -> 0.02" in _error_line(capsys, argv, "train")
    assert main(argv + ["--allow-config-change", "--no-progress"]) == 0
    assert json.loads((out / "test_metrics.json").read_text())["videos"] == 16
    assert load_config(out / "config.yaml")["train"]["lr"] == 0.02  # the run's config is the one it went on with


def test_debug_shows_the_traceback_of_a_user_error(monkeypatch):
    from nonlocalnet.engine.config import ConfigError

    monkeypatch.setenv("NONLOCALNET_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        main(["train", "--config", TINY, "train.lr=abc"])


def test_a_program_error_keeps_its_traceback(monkeypatch):
    import nonlocalnet.commands.flops as flops

    def broken(args):
        raise AttributeError("a bug, not a user error")

    monkeypatch.setattr(flops, "run", broken)
    with pytest.raises(AttributeError, match="a bug"):
        main(["flops", "c2d_r50"])


def test_resuming_a_run_killed_after_its_last_checkpoint_measures_the_same_precise_bn(tmp_path, monkeypatch):
    # killed between the final checkpoint and model_final: the resumed process never enters the training loop,
    # so nothing had set the data's epoch; precise BN must still read the last epoch's clips (found by
    # test_faults.py: every BN statistic differed, every weight was equal)
    import nonlocalnet.engine.trainer as trainer

    longer = ("train.iterations=20", "train.checkpoint_every=10")  # 16 steps an epoch: the last one is in epoch 1
    train(_cfg(tmp_path / "straight", *longer))
    out = tmp_path / "run"
    real = trainer.precise_bn_copy

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill right after the step-20 checkpoint

    monkeypatch.setattr(trainer, "precise_bn_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out, *longer))
    monkeypatch.setattr(trainer, "precise_bn_copy", real)
    assert (out / "checkpoints" / "checkpoint_000000020.pt").is_file()
    assert not (out / "model_final.safetensors").exists()
    train(_cfg(out, *longer), resume=True)
    _assert_same_weights(out, tmp_path / "straight")
    assert _rows(out) == _rows(tmp_path / "straight")
