"""End-to-end training: exact resumption, real video lists, multi-label, the CLI, torchrun, the demo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nonlocalnet.cli import main
from nonlocalnet.data.decoders import DECODERS, decoder_available
from nonlocalnet.engine import load_config, train

from .helpers import video_overrides

TINY = "configs/synthetic/nl_c2d_tiny.yaml"
QUICK = [
    "progress=false",
    "data.test_size=32",
    "data.train_size=256",
    "train.batch_size=8",
    "train.log_every=2",
    "train.precise_bn_batches=2",
    "model.options.dropout=0.5",
    "train.lr_steps=[6]",
]


def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path):
    overrides = QUICK + ["train.iterations=10", "train.checkpoint_every=3"]
    straight = train(load_config(TINY, overrides + [f"output_dir={tmp_path / 'a'}"]))
    cfg = load_config(TINY, overrides + [f"output_dir={tmp_path / 'b'}"])
    assert train(cfg, stop_after=7) == {"stopped_at": 7}
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())[-1] == "checkpoint_000000007.pt"
    resumed = train(cfg, resume=True)
    a = load_file(tmp_path / "a" / "model_final.safetensors")
    b = load_file(tmp_path / "b" / "model_final.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["top1"] == resumed["top1"]
    # and a different seed really gives different weights (the comparison above can fail)
    other = train(load_config(TINY, overrides + [f"output_dir={tmp_path / 'c'}", "seed=1"]))
    c = load_file(tmp_path / "c" / "model_final.safetensors")
    assert not torch.equal(a["res3.nl0.theta.weight"], c["res3.nl0.theta.weight"])
    assert other["videos"] == 32


def test_run_directory_has_config_metrics_and_final_weights(tmp_path):
    out = tmp_path / "run"
    report = train(load_config(TINY, QUICK + ["train.iterations=4", f"output_dir={out}"]))
    saved = load_config(out / "config.yaml")
    assert saved["train"]["iterations"] == 4 and saved["output_dir"] == str(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert records[-1]["split"] == "test" and records[-1]["top1"] == report["top1"]
    assert json.loads((out / "test_metrics.json").read_text())["videos"] == 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert [s for s, _ in losses] == [2, 4] and [v for _, v in losses] == pytest.approx([v for _, v in expected])


TRAIN_ROW = ["step", "split", "loss", "lr", "skipped_videos", "seconds", "train_accuracy", "run"]
CHECKPOINT_KEYS = [
    "model",
    "optimizer",
    "scaler",
    "iteration",
    "skipped_videos",
    "skipped_video_ids",
    "config",
    "world_size",
    "model_name",
    "model_options",
    "rng",
    "rng_per_rank",
    "run",
    "checksum",
]


def test_a_stopped_and_resumed_run_writes_these_rows_checkpoints_and_log_lines(tmp_path, caplog):
    # what the trainer writes, pinned field by field: log every 2 steps and at the stop, checkpoint every 3 (the
    # last 2 kept), evaluate at 4 (eval_every, before the end) and at the end after precise BN
    out = tmp_path / "run"
    cfg = load_config(
        TINY, QUICK + ["train.iterations=6", "train.checkpoint_every=3", "train.eval_every=4", f"output_dir={out}"]
    )
    assert train(cfg, stop_after=3) == {"stopped_at": 3}
    with caplog.at_level("INFO", logger="nonlocalnet"):
        report = train(cfg, resume=True)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")]
    assert resumed == [f"resumed from {out / 'checkpoints' / 'checkpoint_000000003.pt'} at iteration 3"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [
        (2, "train"),
        (3, "train"),
        (4, "train"),
        (4, "test"),
        (6, "train"),
        (6, "test"),
    ]
    assert all(list(r) == TRAIN_ROW for r in rows if r["split"] == "train")
    # the lr of the row's last step (0-based 1, 2, 3, 5), in the warm-up from 0.1 x 0.1 over 400 steps
    assert [r["lr"] for r in rows if r["split"] == "train"] == pytest.approx(
        [0.01 + 0.09 * i / 400 for i in (1, 2, 3, 5)]
    )
    middle, final = (r for r in rows if r["split"] == "test")
    assert "train_seconds" not in middle and final["train_seconds"] == report["train_seconds"]
    assert final["skipped_videos_train"] == 0 and final["top1"] == report["top1"]
    assert json.loads((out / "test_metrics.json").read_text()) == report

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_000000003.pt",
        "checkpoint_000000006.pt",
    ]
    state = torch.load(out / "checkpoints" / "checkpoint_000000006.pt", weights_only=True)
    assert list(state) == CHECKPOINT_KEYS
    assert (state["iteration"], state["world_size"], state["skipped_videos"], state["skipped_video_ids"]) == (
        6,
        1,
        0,
        [],
    )
    assert (state["model_name"], state["model_options"]) == ("nl_c2d_tiny", {"dropout": 0.5})
    assert state["config"]["output_dir"] == str(out) and state["rng_per_rank"] == [state["rng"]]
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "model_final.safetensors",
        "run.json",
        "tensorboard",
        "test_metrics.json",
    ]


# --- real videos -----------------------------------------------------------------------------------------------


def test_skipped_video_count_survives_a_resume(tmp_path, video_root):
    overrides = ["train.checkpoint_every=2", "data.train_list=" + str(video_root / "train.txt")]
    straight = train(load_config(None, video_overrides(video_root, tmp_path / "a") + overrides))
    cfg = load_config(None, video_overrides(video_root, tmp_path / "b") + overrides)
    assert train(cfg, stop_after=2) == {"stopped_at": 2}
    before = torch.load(tmp_path / "b" / "checkpoints" / "checkpoint_000000002.pt", weights_only=True)
    resumed = train(cfg, resume=True)
    # skips happened before the stop (a count from zero would lose them): broken.mp4, line 3 of train.txt
    assert before["skipped_videos"] == 1 and before["skipped_video_ids"] == [2]
    assert resumed["skipped_videos_train"] == straight["skipped_videos_train"] >= before["skipped_videos"]


def test_training_on_a_video_list_counts_the_corrupt_video(tmp_path, video_root):
    report = train(load_config(None, video_overrides(video_root, tmp_path / "run")))
    assert (
        report["videos"] == 2
        and report["views"] == 2 * 2 * 3
        and report["views_per_video"] == {"mean": 6, "min": 6, "max": 6}
    )
    assert report["skipped_videos"] == 0 and report["skipped_videos_train"] == 1  # broken.mp4, drawn and skipped
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-2]["skipped_videos"] == report["skipped_videos_train"]


def test_multi_label_training_reports_map(tmp_path, video_root):
    cfg = load_config(None, video_overrides(video_root, tmp_path / "run", "charades"))
    report = train(cfg)
    assert report["videos"] == 3 and len(report["per_class_ap"]) == 3
    # by hand: every view scored alone, sigmoid scores averaged per video, AP = mean precision at each positive
    from nonlocalnet.data import build_dataset
    from nonlocalnet.engine import build_model

    model = build_model({**cfg, "model": {**cfg["model"], "pretrained": None}})
    model.load_state_dict(load_file(tmp_path / "run" / "model_final.safetensors"))
    model.eval()
    test_set = build_dataset(cfg["data"], "test", cfg["seed"])
    scores, labels = {}, {}
    with torch.no_grad():
        for i in range(len(test_set)):
            item = test_set[i]
            video = int(item["video"])
            scores.setdefault(video, []).append(model(item["clip"][None]).sigmoid()[0])
            labels[video] = item["label"]
    videos = sorted(scores)
    mean = torch.stack([torch.stack(scores[v]).mean(0) for v in videos])
    targets = torch.stack([labels[v] for v in videos])
    expected = []
    for c in range(3):
        order = mean[:, c].argsort(descending=True)
        hits = targets[order, c].bool().tolist()
        precisions = [sum(hits[: k + 1]) / (k + 1) for k, hit in enumerate(hits) if hit]
        expected.append(sum(precisions) / len(precisions))
    assert report["per_class_ap"] == pytest.approx(expected, abs=1e-6)
    assert report["mAP"] == pytest.approx(sum(expected) / 3)
    assert min(expected) < 1  # the ranking matters here: a wrong score order would change an AP


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not decoder_available("torchcodec"), reason="torchcodec and FFmpeg's shared libraries")
def test_a_run_through_torchcodec_is_the_run_through_pyav(tmp_path, video_root):
    """data.decoder=torchcodec from the config to the test report: the same items, so the same run."""
    reports = {
        d: train(load_config(None, video_overrides(video_root, tmp_path / d) + [f"data.decoder={d}"])) for d in DECODERS
    }
    assert reports["torchcodec"]["skipped_videos_train"] == 1  # broken.mp4, as through PyAV
    drop = ("time", "second")  # wall clock differs between two runs; so does each run's identity
    rows = {
        d: [
            {k: v for k, v in r.items() if k != "run" and not any(w in k for w in drop)} for r in _metrics(tmp_path / d)
        ]
        for d in DECODERS
    }
    assert rows["pyav"] == rows["torchcodec"]
    same = {
        d: json.dumps({k: v for k, v in r.items() if "time" not in k and "second" not in k}, sort_keys=True)
        for d, r in reports.items()
    }  # as text: a class without a test video has accuracy NaN in both
    assert same["pyav"] == same["torchcodec"]


def test_an_unavailable_decoder_stops_the_command_with_one_error_line(tmp_path, video_root, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if torchcodec were not installed
    assert main(["train", *video_overrides(video_root, tmp_path / "run"), "data.decoder=torchcodec"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nonlocalnet train: error: decoder 'torchcodec' needs torchcodec")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_videos_stop_the_run_with_one_clear_error(tmp_path, video_root):
    (tmp_path / "list.txt").write_text("v0.mp4 0\ngone1.mp4 1\ngone2.mp4 1\n")
    overrides = video_overrides(video_root, tmp_path / "run") + [f"data.train_list={tmp_path / 'list.txt'}"]
    with pytest.raises(FileNotFoundError, match="gone1.mp4") as info:
        train(load_config(None, overrides))
    assert "gone2.mp4" in str(info.value)


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_train_then_test_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--no-progress", *QUICK, "train.iterations=3", f"output_dir={out}"]) == 0
    assert "top-1" in capsys.readouterr().out
    report_path = tmp_path / "again.json"
    assert (
        main(
            [
                "test",
                "--config",
                str(out / "config.yaml"),
                "--checkpoint",
                str(out / "checkpoints" / "checkpoint_000000003.pt"),
                "--output",
                str(report_path),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert f"{100 * report['top1']:.2f}" in printed and report["videos"] == 32
    # both accuracies, named, and the views each video had (the synthetic test set: one view a video)
    assert f"top-1 (video: views averaged)  {100 * report['top1']:.2f}" in printed
    assert f"top-1 (clip: each view alone)  {100 * report['clip_top1']:.2f}" in printed
    assert "views                          32 (1 per video)" in printed


def test_no_progress_training_prints_a_log_line_every_log_every_iterations(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                TINY,
                "--no-progress",
                *QUICK,
                "train.log_every=1",
                "train.iterations=3",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration ")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert len(lines) == 3 and len(rows) == 3
    for i, (line, row) in enumerate(zip(lines, rows), start=1):
        fields = line.split("  ")  # iteration i/total, loss, lr, speed, data time, time left, memory
        assert fields[:3] == [f"iteration {i}/3", f"loss {row['loss']:.4f}", f"lr {row['lr']:.4g}"]
        assert fields[3].endswith(" clips/s") and fields[4].startswith("data ") and fields[4].endswith("s/it")
        assert fields[5].startswith("left 0:00:") and fields[6].startswith("memory ") and fields[6].endswith(" GiB")
    assert lines[-1].split("  ")[5] == "left 0:00:00"


def test_resuming_a_finished_run_says_so_and_redoes_the_final_test(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    run = ["train", "--config", TINY, "--no-progress", *QUICK, "train.iterations=2", f"output_dir={out}"]
    assert main(run) == 0
    first = json.loads((out / "test_metrics.json").read_text())
    caplog.set_level("INFO", logger="nonlocalnet")
    assert main(run + ["--resume"]) == 0
    assert f"the run in {out} had finished its 2 iterations; its final steps run again" in caplog.text
    assert "top-1" in capsys.readouterr().out
    assert json.loads((out / "test_metrics.json").read_text())["top1"] == first["top1"]


def test_test_at_end_false_stops_after_the_final_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                TINY,
                "--no-progress",
                *QUICK,
                "train.iterations=2",
                "test.at_end=false",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    assert "no final test (test.at_end=false)" in capsys.readouterr().out
    assert (out / "model_final.safetensors").is_file() and not (out / "test_metrics.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train"]


def test_the_test_command_writes_beside_the_runs_report_never_over_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--no-progress", *QUICK, "train.iterations=2", f"output_dir={out}"]) == 0
    trained = (out / "test_metrics.json").read_text()
    checkpoint = out / "checkpoints" / "checkpoint_000000002.pt"
    assert main(["test", "--config", str(out / "config.yaml"), "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    assert (out / "test_metrics.json").read_text() == trained
    assert json.loads((out / "test_metrics_checkpoint_000000002.json").read_text())["checkpoint"] == str(checkpoint)


def test_test_metrics_json_is_strict_json_when_a_class_has_no_test_video(tmp_path):
    # 5 classes, 4 test clips: at least one class has no video, hence no accuracy (NaN in memory, null in the file)
    out = tmp_path / "run"
    report = train(
        load_config(TINY, QUICK + ["train.iterations=2", "data.num_classes=5", "data.test_size=4", f"output_dir={out}"])
    )
    assert any(math.isnan(v) for v in report["per_class_accuracy"])

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    saved = json.loads((out / "test_metrics.json").read_text(), parse_constant=refuse)
    assert [v is None for v in saved["per_class_accuracy"]] == [math.isnan(v) for v in report["per_class_accuracy"]]


def test_num_classes_comes_from_the_list_when_null_and_a_mismatch_names_both_numbers(tmp_path, video_root, capsys):
    run = video_overrides(video_root, tmp_path / "run") + ["train.iterations=1", "test.at_end=false"]
    assert main(["train", *run, "data.num_classes=400"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"nonlocalnet train: error: data.num_classes is 400 but the training list "
        f"{video_root / 'train.txt'} has 3 classes (labels 0 to 2); set data.num_classes=3, or "
        f"data.num_classes=null to take it from the list"
    )
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(["train", *run, "data.num_classes=null"]) == 0
    assert load_config(tmp_path / "run" / "config.yaml")["data"]["num_classes"] == 3
    assert load_file(tmp_path / "run" / "model_final.safetensors")["head.fc.weight"].shape[0] == 3
    with pytest.raises(ValueError, match="the built-in synthetic data has none: set 2 to 6"):
        load_config(TINY, ["data.num_classes=null"])
    with pytest.raises(ValueError, match="data.num_classes must be a positive integer, or null .*; got 0"):
        load_config(None, video_overrides(video_root, tmp_path / "other") + ["data.num_classes=0"])


def test_loader_workers_are_capped_by_the_cores_this_process_may_run_on():
    from nonlocalnet.data import ShardedSampler
    from nonlocalnet.engine.evaluation import make_loader

    loader = make_loader(list(range(8)), ShardedSampler(8), 2, workers=1000, drop_last=False, seed=0)
    assert loader.num_workers == len(os.sched_getaffinity(0))
    assert make_loader(list(range(8)), ShardedSampler(8), 2, workers=0, drop_last=False, seed=0).num_workers == 0


def test_sync_bn_on_cpu_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="train.sync_bn needs CUDA"):
        train(load_config(TINY, QUICK + ["train.sync_bn=true", "device=cpu", f"output_dir={tmp_path}"]))


def test_cli_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["test", "--config", TINY, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


# --- many processes and the demo (slow) ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_cpu_processes_train_and_agree(tmp_path):
    """2 processes x 8 clips train what 1 process x 16 clips trains (same clips per step, gradients averaged),
    and both processes end with the same weights. BN frozen, no dropout and blocks without norm: per-process
    batch statistics and dropout streams are the only legitimate differences, and they are taken out here."""
    runner = Path(__file__).with_name("_fault_runner.py")
    same = QUICK + [
        "train.iterations=4",
        "model.options.dropout=0",
        "train.freeze_bn=true",
        "model.options.nonlocal_options.norm=null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NONLOCALNET_DUMP_FINAL": str(tmp_path)}
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(runner),
        "train",
        "--config",
        TINY,
        "--no-progress",
        *same,
        f"output_dir={out}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["videos"] == 32 and report["views"] == 32  # each process scored half, gathered once
    # the log lines and the results, printed once for the job (by rank 0), not once per process
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("iteration ")] == ["2/4", "4/4"]
    assert done.stdout.count("top-1 (video: views averaged)") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]  # only rank 0 logs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    final = load_file(out / "model_final.safetensors")
    for key in final:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(final[key], ranks[0][key]), key
    single = train(load_config(TINY, same + ["train.batch_size=16", f"output_dir={tmp_path / 'single'}"]))
    alone = load_file(tmp_path / "single" / "model_final.safetensors")
    for key in final:  # equal up to the order of the gradient sums
        torch.testing.assert_close(final[key], alone[key], rtol=1e-4, atol=1e-6, msg=key)
    assert report["top1"] == single["top1"]
    assert alone["res3.nl0.out.weight"].abs().max() > 1e-4  # W_z starts at 0: the comparison is of trained weights


@pytest.mark.slow
def test_demo_compares_all_variants_and_writes_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--iterations",
                "6",
                "--no-progress",
                "data.test_size=16",
                "data.train_size=64",
                "train.batch_size=8",
                "train.precise_bn_batches=1",
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in result["rows"]] == [
        "baseline",
        "gaussian",
        "embedded_gaussian",
        "dot_product",
        "concatenation",
    ]
    base, *nl = result["rows"]
    assert all(r["params"] > base["params"] and r["macs"] > base["macs"] for r in nl)
    assert all(0 <= r["attention_hit_rate"] <= 1 and (out / r["picture"]).is_file() for r in nl)
    assert (out / "results.md").read_text().startswith("| model | top-1")
    printed = capsys.readouterr().out
    assert "C2D + NL dot product" in printed
    # the total and each network's training time, as measured
    assert f"5 networks trained and tested in {result['seconds']:.0f} s in all" in printed
    assert all(f"{r['variant']} {r['train_seconds']:.0f} s" in printed for r in result["rows"])


@pytest.mark.slow
def test_demo_in_parallel_processes_equals_one_network_at_a_time(tmp_path):
    tiny = [
        "--iterations",
        "5",
        "--no-progress",
        "data.test_size=16",
        "data.train_size=64",
        "train.batch_size=8",
        "train.precise_bn_batches=1",
        "--variants",
        "baseline",
        "concatenation",
        "embedded_gaussian",
    ]
    assert main(["demo", "--out", str(tmp_path / "parallel"), "--jobs", "2", *tiny]) == 0
    assert main(["demo", "--out", str(tmp_path / "serial"), "--jobs", "1", *tiny]) == 0
    parallel, serial = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("parallel", "serial"))
    assert (parallel["jobs"], serial["jobs"]) == (2, 1)
    for a, b in zip(parallel["rows"], serial["rows"]):
        assert {k: v for k, v in a.items() if k != "train_seconds"} == {
            k: v for k, v in b.items() if k != "train_seconds"
        }
        weights = [load_file(tmp_path / d / a["variant"] / "model_final.safetensors") for d in ("parallel", "serial")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), a["variant"]
    # and the seed matters, so the equality above could fail
    assert main(["demo", "--out", str(tmp_path / "seed1"), "--jobs", "2", "--seed", "1", *tiny]) == 0
    other = load_file(tmp_path / "seed1" / "concatenation" / "model_final.safetensors")
    first = load_file(tmp_path / "serial" / "concatenation" / "model_final.safetensors")
    assert not torch.equal(other["res3.nl0.theta.weight"], first["res3.nl0.theta.weight"])


def test_final_weights_rebuild_the_trained_variant_for_visualize(tmp_path):
    from nonlocalnet.viz.loading import load_model

    out = tmp_path / "run"
    train(
        load_config(
            TINY,
            QUICK + ["train.iterations=2", f"output_dir={out}", "model.options.nonlocal_options.mode=concatenation"],
        )
    )
    for path in (out / "model_final.safetensors", out / "checkpoints" / "checkpoint_000000002.pt"):
        model, info = load_model(path)
        assert info["model"] == "nl_c2d_tiny" and model.res3.nl0.mode == "concatenation"


def test_amp_frozen_bn_and_clipping_options_train(tmp_path, monkeypatch):
    from nonlocalnet.engine import build_model
    from nonlocalnet.engine.trainer import seed_everything
    from nonlocalnet.models.batchnorm import FrozenBatchNorm

    overrides = QUICK + [
        "train.iterations=3",
        "train.amp=true",
        "train.freeze_bn=true",
        "train.clip_grad_norm=1.0",
        "train.precise_bn_batches=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(TINY, overrides)
    seed_everything(cfg["seed"])
    model = build_model(cfg)  # the same initial weights train() starts from
    # every BN of the backbone frozen; the non-local block's own BN (γ = 0 at init) stays trainable
    trainable_bn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert trainable_bn == ["res3.nl0.norm"]
    frozen = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm)}
    assert len(frozen) == 17 and "bn1" in frozen
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    norms = []  # (before, after) clipping, every step
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        before = clip(parameters, max_norm, *args, **kwargs)
        norms.append(
            (
                float(before),
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))),
            )
        )
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    report = train(cfg)
    assert len(norms) == 3 and max(before for before, _ in norms) > 1.0  # clipping had work to do
    assert all(after <= 1.0 + 1e-5 for _, after in norms)  # and the step used gradients of norm <= the bound
    final = load_file(tmp_path / "run" / "model_final.safetensors")
    # frozen statistics and affine parameters stay as they were through training
    for name in frozen:
        for part in ("running_mean", "running_var", "weight", "bias"):
            assert torch.equal(final[f"{name}.{part}"], initial[f"{name}.{part}"]), (name, part)
    assert not torch.equal(final["conv1.weight"], model.conv1.weight.detach())  # but the weights trained
    # and so did the block: γ left 0, θ / φ / g / W_z got gradients, and the block no longer returns its input
    assert final["res3.nl0.norm.weight"].abs().min() > 0
    for part in ("theta", "phi", "g", "out"):
        assert not torch.equal(final[f"res3.nl0.{part}.weight"], initial[f"res3.nl0.{part}.weight"]), part
    model.load_state_dict(final)
    x = torch.randn(2, model.res3.nl0.in_channels, 4, 8, 8)
    with torch.no_grad():
        assert (model.res3.nl0.eval()(x) - x).abs().max() > 1e-5  # exactly 0 while the block is the identity
    assert report["videos"] == 32


@pytest.mark.slow
def test_a_failing_network_stops_the_demo_at_once_with_one_error_line(tmp_path, capsys):
    # the sorted path computes only the concatenation: the gaussian network fails as it is built, while the
    # baseline (no block) would train for minutes and concatenation waits for a free process
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--iterations",
            "3000",
            "--no-progress",
            "--jobs",
            "2",
            "data.test_size=16",
            "data.train_size=64",
            "train.batch_size=8",
            "model.options.nonlocal_options.impl=sorted",
            "--variants",
            "baseline",
            "gaussian",
            "concatenation",
        ]
    )
    assert code == 2
    assert "error: impl 'sorted' does not compute mode 'gaussian'" in capsys.readouterr().err
    assert not (out / "baseline" / "model_final.safetensors").exists()  # stopped, not trained to the end
    assert not (out / "concatenation").exists()  # never started


def test_train_amp_picks_bfloat16_where_the_device_computes_it_else_float16(monkeypatch):
    from nonlocalnet.engine.trainer import amp_dtype

    cpu = torch.device("cpu")
    assert [amp_dtype(cpu, a) for a in (False, True, "bf16", "fp16")] == [
        None,
        torch.bfloat16,
        torch.bfloat16,
        torch.float16,
    ]
    # a GPU without bfloat16 (before Ampere): true falls back to float16, bf16 is refused by name
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    assert amp_dtype(torch.device("cuda"), True) == torch.float16
    with pytest.raises(ValueError, match="Tesla V100-SXM2-16GB.*does not compute bfloat16"):
        amp_dtype(torch.device("cuda"), "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(torch.device("cuda"), True) == torch.bfloat16


@pytest.mark.parametrize("amp,scaled", [("bf16", False), ("fp16", True)])
def test_train_amp_runs_in_its_dtype_with_a_grad_scaler_only_for_float16(amp, scaled, tmp_path, monkeypatch):
    seen = []
    real = torch.autocast

    def recording(*args, **kwargs):  # what the training step asks autocast for
        seen.append((kwargs.get("dtype"), kwargs.get("enabled", True)))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording)
    overrides = QUICK + [
        "train.iterations=2",
        f"train.amp={amp}",
        "train.checkpoint_every=2",
        "train.precise_bn_batches=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    train(load_config(TINY, overrides))
    want = torch.float16 if amp == "fp16" else torch.bfloat16
    assert (want, True) in seen and not any(enabled and dtype != want for dtype, enabled in seen)
    state = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_000000002.pt", weights_only=True)
    assert bool(state["scaler"]) == scaled  # a GradScaler's state (its scale) only where float16 needs one
