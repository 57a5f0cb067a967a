"""SIGINT and SIGTERM always stop a run, with its last checkpoint intact and exit status 130 / 143 (issue 31,
item 12), also when the signal's exception is swallowed while DataLoader workers start."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nonlocalnet.engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from nonlocalnet.engine.signals import Interrupted, check_interrupted, deferred, handled

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_whose_exception_was_swallowed_still_stops_the_next_step(signum, status):
    with handled():
        try:
            os.kill(os.getpid(), signum)
            time.sleep(1)  # (the handler runs here)
        except KeyboardInterrupt:
            pass  # what an at-fork handler does with it: "Exception ignored in _releaseLock"
        with pytest.raises(Interrupted) as caught:
            check_interrupted()
    assert caught.value.exit_status == status
    check_interrupted()  # outside the block nothing is recorded


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_at_a_random_moment_with_loader_workers_stops_the_run_with_its_checkpoint_intact(
    tmp_path, signum, status
):
    """Four runs, each signalled at a random moment from its first checkpoint on (epochs of two steps, so loader
    workers start every other step): every one exits with the signal's status and its newest checkpoint reads."""
    rng = random.Random(31 + signum)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nonlocalnet.cli",
                "train",
                "--config",
                "configs/synthetic/nl_c2d_tiny.yaml",
                "progress=false",
                "data.workers=2",
                "data.train_size=16",
                "data.test_size=8",
                "train.batch_size=8",
                "train.iterations=400",
                "train.checkpoint_every=1",
                "train.keep_checkpoints=2",
                "train.lr_steps=[]",
                f"output_dir={out}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signum)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"attempt {attempt}: the run went on after {signal.Signals(signum).name}")
        assert proc.returncode == status, err.decode()[-2000:]
        newest = list_checkpoints(out / "checkpoints")[-1]
        assert load_checkpoint(newest)["iteration"] >= 1  # it reads, its checksum holds


def _swallow_a_signal(signum: int = signal.SIGTERM) -> None:
    """A stop signal whose exception is swallowed where it lands (as an at-fork handler does)."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(1)  # (the handler raises here, ending the sleep)
    except KeyboardInterrupt:
        pass


class _SignalWhenSaved(dict):
    """An empty dict whose pickling sends this process a signal: the signal lands inside ``torch.save``'s archive
    writer, where a raised exception comes out as the writer's ``RuntimeError`` ("unexpected pos ... vs 0")."""

    def __init__(self, *signums: int) -> None:
        super().__init__()
        self.signums = signums

    def __reduce__(self):
        for signum in self.signums:
            signal.raise_signal(signum)  # the handler runs here, synchronously
        return (collections.OrderedDict, ())


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_a_checkpoint_is_written_stops_the_run_once_the_file_and_its_rotation_are_complete(
    tmp_path, signum, status
):
    folder = tmp_path / "checkpoints"
    save_checkpoint({"iteration": 1}, folder, 1, keep=1)
    with handled(), pytest.raises(Interrupted) as caught:
        save_checkpoint({"iteration": 2, "marker": _SignalWhenSaved(signum)}, folder, 2, keep=1)
    assert caught.value.exit_status == status
    assert [p.name for p in folder.iterdir()] == [checkpoint_path(folder, 2).name]  # whole, the older one rotated
    state = load_checkpoint(checkpoint_path(folder, 2))  # its checksum holds
    assert state["iteration"] == 2 and state["marker"] == {}


def test_a_second_signal_while_a_checkpoint_is_written_stops_at_once_and_leaves_the_older_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint({"iteration": 1}, folder, 1, keep=1)
    with handled(), pytest.raises(Interrupted):
        save_checkpoint({"iteration": 2, "marker": _SignalWhenSaved(signal.SIGINT, signal.SIGINT)}, folder, 2, keep=1)
    assert list_checkpoints(folder) == [checkpoint_path(folder, 1)]
    assert load_checkpoint(checkpoint_path(folder, 1))["iteration"] == 1


def test_an_error_a_signal_caused_where_it_landed_stops_as_the_signal():
    with pytest.raises(Interrupted) as caught, handled():
        _swallow_a_signal(signal.SIGTERM)
        raise RuntimeError("unexpected pos 64 vs 0")  # what torch.save's writer raises over the KeyboardInterrupt
    assert caught.value.exit_status == 143
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError), handled():  # without a signal an error stays itself
        raise RuntimeError("a bug")


def test_deferred_blocks_nest_and_only_the_outermost_raises():
    with handled():
        with pytest.raises(Interrupted):
            with deferred():
                with deferred():
                    signal.raise_signal(signal.SIGINT)
                reached = True  # the inner block ended without raising
        assert reached


def test_the_training_loop_stops_a_video_run_at_the_step_after_a_swallowed_signal_and_frees_its_folder(tmp_path):
    from nonlocalnet.engine import load_config, train
    from nonlocalnet.engine.rundir import lock_run_directory

    out = tmp_path / "run"
    cfg = load_config(
        "configs/synthetic/nl_c2d_tiny.yaml",
        [
            "progress=false",
            "data.test_size=8",
            "data.train_size=32",
            "train.batch_size=8",
            "train.iterations=4",
            "train.checkpoint_every=2",
            "train.lr_steps=[]",
            f"output_dir={out}",
        ],
    )
    steps = []

    def step_done(iteration: int) -> None:
        steps.append(iteration)
        if iteration == 1:
            _swallow_a_signal()

    with handled(), pytest.raises(Interrupted) as caught:
        train(cfg, on_iteration=step_done)
    assert caught.value.exit_status == 143 and steps == [1]  # no second step
    lock_run_directory(out).release()  # the interrupted run released its folder


def test_the_training_loop_stops_a_detection_run_at_the_step_after_a_swallowed_signal(tmp_path, monkeypatch):
    import nonlocalnet.detection.train as detection
    from tests.test_detection import _tiny_config

    config = _tiny_config("shapes", "mask", tmp_path / "run", mask_head_channels=16)
    config["train"]["max_iters_per_epoch"] = 3
    steps = []

    def items(self, batch):
        steps.append(len(batch[0]))
        if len(steps) == 1:
            _swallow_a_signal(signal.SIGINT)
        return len(batch[0])

    monkeypatch.setattr(detection.Detection, "items", items)
    with handled(), pytest.raises(Interrupted) as caught:
        detection.train(config)
    assert caught.value.exit_status == 130 and steps == [2]  # one step of two images, no second
