"""Issue 31's reproductions of a run directory that mixed two runs, a checkpoint read without a word, and weights
of the wrong kind: each one as the user's command, pinned to what happens now."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nonlocalnet.cli import main
from nonlocalnet.engine import load_config, train
from nonlocalnet.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nonlocalnet.engine.rundir import lock_run_directory, read_identity
from nonlocalnet.models import create_model
from nonlocalnet.models.checkpoints.weights import save_weights

TINY = "configs/synthetic/nl_c2d_tiny.yaml"
QUICK = [
    "progress=false",
    "data.test_size=8",
    "data.train_size=32",
    "train.batch_size=8",
    "train.log_every=2",
    "train.precise_bn_batches=1",
    "train.lr_steps=[]",
    "train.iterations=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
]


def _run(out: Path, *extra: str, stop_after: int | None = None) -> Path:
    train(load_config(TINY, QUICK + [f"output_dir={out}", *extra]), stop_after=stop_after)
    return out


def _files(out: Path) -> dict[Path, bytes]:
    """Everything a run directory holds (the lock file records the last process that held it, refused ones too)."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _ckpt(out: Path, iteration: int) -> Path:
    return out / "checkpoints" / f"checkpoint_{iteration:09d}.pt"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run (checkpoints at 2 and 4), never changed by the tests that use it."""
    return _run(tmp_path_factory.mktemp("finished") / "run")


# --- 1-3: one run per directory --------------------------------------------------------------------------------


def test_resume_of_another_runs_checkpoint_into_a_finished_run_refuses_and_touches_nothing(tmp_path, capsys, finished):
    run_b = _run(tmp_path / "b", "train.lr=0.02")
    before = _files(run_b)
    code, err = _cli(
        capsys,
        "train",
        "--config",
        TINY,
        *QUICK,
        "train.lr=0.02",
        f"output_dir={run_b}",
        "--resume",
        str(_ckpt(finished, 4)),
        "--allow-config-change",
    )
    assert code == 2 and err.count("error:") == 1
    assert f"belongs to run {read_identity(finished).run_id}" in err
    assert f"holds run {read_identity(run_b).run_id}" in err and "empty directory" in err
    assert _files(run_b) == before


def test_resume_of_another_runs_checkpoint_into_an_empty_directory_starts_a_new_run_said_plainly(
    tmp_path, caplog, finished
):
    out = tmp_path / "new"
    cfg = load_config(TINY, QUICK + [f"output_dir={out}"])
    with caplog.at_level("WARNING", logger="nonlocalnet"):
        train(cfg, resume=_ckpt(finished, 2), allow_config_change=True)
    mine, theirs = read_identity(out), read_identity(finished)
    assert mine.run_id != theirs.run_id and mine.resumed_from == theirs.run_id
    assert f"starting a new run {mine.run_id} in the empty directory {out}" in caplog.text
    assert load_checkpoint(_ckpt(out, 4))["run"]["run_id"] == mine.run_id
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {row["run"] for row in rows} == {mine.run_id}


def test_resume_of_a_finished_run_whose_checkpoints_were_deleted_refuses_and_keeps_its_results(tmp_path, capsys):
    out = _run(tmp_path / "run")
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    before = _files(out)
    code, err = _cli(capsys, "train", "--config", TINY, *QUICK, f"output_dir={out}", "train.lr=0.05", "--resume")
    assert code == 2
    assert (
        "holds the results of a run (metrics.jsonl, model_final.safetensors, test_metrics.json) but no "
        "checkpoint to resume from" in err
    )
    assert _files(out) == before


def test_a_second_run_into_a_directory_in_use_refuses_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with lock_run_directory(out):  # the first run, still training
        code, err = _cli(capsys, "train", "--config", TINY, *QUICK, f"output_dir={out}", "train.lr=0.02")
    assert code == 2
    assert f"output_dir {out} is in use by another run (pid {os.getpid()} on " in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    _run(out)  # once the first run has ended, the directory is free


def test_every_checkpoint_and_log_row_carries_the_run_identity(finished):
    identity = read_identity(finished)
    assert len(identity.run_id) == 16 and identity.resumed_from is None
    for iteration in (2, 4):
        assert load_checkpoint(_ckpt(finished, iteration))["run"] == identity.as_dict()
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {row["run"] for row in rows} == {identity.run_id}


# --- 5, 10: checkpoints verified, every unreadable newest one falls back -----------------------------------------


def _flip_a_tensor_byte(path: Path) -> None:
    """Flips one byte inside the stored bytes of the model's largest tensor (torch does not check the zip's CRC)."""
    state = torch.load(path, weights_only=True)
    name, tensor = max(state["model"].items(), key=lambda kv: kv[1].numel())
    data = path.read_bytes()
    at = data.index(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:64]) + 17
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :])
    assert not torch.equal(torch.load(path, weights_only=True)["model"][name], tensor)  # it loads, changed


def test_a_checkpoint_with_a_flipped_byte_is_refused_when_named_and_passed_over_by_resume(
    tmp_path, capsys, caplog, finished
):
    out = _run(tmp_path / "run", stop_after=4)
    (out / "metrics.jsonl").unlink()  # (the run stopped at 4 without its final evaluation: resume does it)
    _flip_a_tensor_byte(_ckpt(out, 4))
    code, err = _cli(capsys, "train", "--config", TINY, *QUICK, f"output_dir={out}", "--resume", str(_ckpt(out, 4)))
    assert code == 2 and f"checkpoint {_ckpt(out, 4)} is corrupt: its content does not match the checksum" in err
    with caplog.at_level("WARNING", logger="nonlocalnet"):
        train(load_config(TINY, QUICK + [f"output_dir={out}"]), resume=True)
    assert f"{_ckpt(out, 4)} is corrupt" in caplog.text and f"falling back to {_ckpt(out, 2)}" in caplog.text
    assert (out / "checkpoints" / "checkpoint_000000004.pt.unreadable").exists()
    mine, straight = load_file(out / "model_final.safetensors"), load_file(finished / "model_final.safetensors")
    assert all(torch.equal(mine[k], straight[k]) for k in straight)  # the uninterrupted run's weights


@pytest.mark.parametrize("kind", ["directory", "dangling link", "truncated"])
def test_resume_falls_back_over_every_kind_of_unreadable_newest_checkpoint(tmp_path, caplog, kind):
    out = _run(tmp_path / "run", stop_after=4)
    newest = _ckpt(out, 4)
    newest.unlink()
    if kind == "directory":
        newest.mkdir()
    elif kind == "dangling link":
        newest.symlink_to(tmp_path / "gone.pt")
    else:
        newest.write_bytes(_ckpt(out, 2).read_bytes()[:1000])
    with caplog.at_level("INFO", logger="nonlocalnet"):
        train(load_config(TINY, QUICK + [f"output_dir={out}"]), resume=True)
    assert f"resumed from {_ckpt(out, 2)} at iteration 2" in caplog.text
    assert f"cannot read checkpoint {newest}" in caplog.text
    assert os.path.lexists(newest.with_name(newest.name + ".unreadable"))


def test_model_final_carries_a_checksum_that_a_changed_tensor_fails(tmp_path, capsys, finished):
    path = tmp_path / "model_final.safetensors"
    path.write_bytes((finished / "model_final.safetensors").read_bytes())
    tensors = load_file(path)
    name = max(tensors, key=lambda k: tensors[k].numel())
    data = path.read_bytes()
    at = data.index(tensors[name].view(-1).view(torch.uint8).numpy().tobytes()[:64]) + 9
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    code, err = _cli(capsys, "test", "--config", TINY, *QUICK, f"output_dir={tmp_path}", "--checkpoint", str(path))
    assert code == 2 and "corrupt: its tensors do not match the checksum written with them" in err


def test_save_checkpoint_of_a_state_then_load_gives_it_back_verified(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "iteration": 5, "nested": [1, (2.5, "x"), None]}
    path = save_checkpoint(state, tmp_path, 5)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["nested"] == [1, (2.5, "x"), None]
    loaded["iteration"] = 6
    torch.save(loaded, path)  # content changed, the recorded checksum kept
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)


# --- 6: weights checked on load --------------------------------------------------------------------------------


def _tiny_weights(path: Path, change=None) -> Path:
    state = create_model("nl_c2d_tiny", num_classes=2).state_dict()
    if change is not None:
        change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"model": "nl_c2d_tiny"})
    return path


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_test_checkpoint_refuses_weights_that_are_not_floating_naming_the_tensor(tmp_path, capsys, dtype):
    def to_int(state):
        state["conv1.weight"] = state["conv1.weight"].to(dtype)

    path = _tiny_weights(tmp_path / "w.safetensors", to_int)
    code, err = _cli(capsys, "test", "--config", TINY, *QUICK, f"output_dir={tmp_path}", "--checkpoint", str(path))
    assert code == 2
    assert (
        f"{path}: tensor 'conv1.weight' has dtype {str(dtype).removeprefix('torch.')}, not floating-point "
        f"weights" in err
    )


def test_all_nan_weights_give_no_test_report(tmp_path, capsys):
    def nan(state):
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = torch.full_like(value, float("nan"))

    path = _tiny_weights(tmp_path / "w.safetensors", nan)
    code, err = _cli(capsys, "test", "--config", TINY, *QUICK, f"output_dir={tmp_path}", "--checkpoint", str(path))
    assert code == 2 and f"{path}: tensor 'bn1.bias' holds NaN" in err  # the first in the file (sorted names)
    assert not (tmp_path / "test_metrics.json").exists()


def test_a_nan_pretrained_file_is_named_as_such_not_blamed_on_the_learning_rate(tmp_path, capsys):
    def one_nan(state):
        state["res2.0.conv_a.weight"].view(-1)[3] = float("nan")

    path = _tiny_weights(tmp_path / "w.safetensors", one_nan)
    code, err = _cli(
        capsys, "train", "--config", TINY, *QUICK, f"output_dir={tmp_path / 'run'}", f"model.pretrained={path}"
    )
    assert code == 2 and f"{path}: tensor 'res2.0.conv_a.weight' holds NaN" in err and "lr" not in err


def test_weights_written_by_training_carry_their_checksum(tmp_path):
    model = create_model("nl_c2d_tiny", num_classes=2)
    save_weights(model, tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert len(f.metadata()["checksum"]) == 64


# --- 4: detection runs follow the same rules -------------------------------------------------------------------


def _detection(out: Path, **kwargs) -> None:
    import nonlocalnet.detection.train as detection
    from tests.test_detection import _tiny_config

    config = _tiny_config("shapes", "mask", out, mask_head_channels=16)
    config["train"].update(epochs=1, max_iters_per_epoch=1)
    detection.train(config, **kwargs)


def test_detect_train_into_a_finished_video_run_refuses_and_writes_nothing(finished):
    from nonlocalnet.engine.rundir import RunDirectoryError

    before = _files(finished)
    with pytest.raises(
        RunDirectoryError,
        match=r"already holds a run \(checkpoints, metrics.jsonl, "
        r"model_final.safetensors, test_metrics.json\)",
    ):
        _detection(finished)
    assert _files(finished) == before


def test_detect_train_resume_of_another_runs_checkpoint_into_a_detection_run_refuses(tmp_path):
    from nonlocalnet.engine.rundir import RunDirectoryError

    _detection(tmp_path / "a")
    _detection(tmp_path / "b")
    before = _files(tmp_path / "b")
    with pytest.raises(
        RunDirectoryError,
        match=f"belongs to run {read_identity(tmp_path / 'a').run_id}, and "
        f"output_dir {tmp_path / 'b'} holds run "
        f"{read_identity(tmp_path / 'b').run_id}",
    ):
        _detection(tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "checkpoint_000000001.pt")
    assert _files(tmp_path / "b") == before
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    mine = read_identity(tmp_path / "b").run_id  # the step's row and the final evaluation's, both run b's
    assert [(row["split"], row["run"]) for row in rows] == [("train", mine), ("test", mine)]


@pytest.mark.slow
def test_two_train_commands_started_together_on_one_directory_one_runs_the_other_refuses(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nonlocalnet.cli",
                "train",
                "--config",
                TINY,
                *QUICK,
                f"train.lr={lr}",
                f"output_dir={out}",
            ],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for lr in (0.01, 0.02)
    ]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert f"output_dir {out} is in use by another run (pid " in refused or "already holds a run" in refused
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (4, "train"), (4, "test")]  # each step once
    winner = read_identity(out)
    assert {r["run"] for r in rows} == {winner.run_id} and load_checkpoint(_ckpt(out, 4))["run"] == winner.as_dict()
    lr = (0.01, 0.02)[[code for code, _ in results].index(0)]
    assert load_config(out / "config.yaml")["train"]["lr"] == lr  # the config of the weights that are there
