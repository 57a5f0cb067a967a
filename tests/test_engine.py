"""Training / evaluation machinery: configs, schedule, optimiser groups, checkpoints, metrics, sampler, data."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nonlocalnet.data import LongRangeShapes, ShardedSampler
from nonlocalnet.data.synthetic import shape_mask
from nonlocalnet.engine import ConfigError, build_model, evaluate, load_config, metrics
from nonlocalnet.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nonlocalnet.engine.optim import build_optimizer, parameter_groups, step_lr
from nonlocalnet.engine.precise_bn import update_bn_stats

TINY = "configs/synthetic/nl_c2d_tiny.yaml"


# --- configs ---------------------------------------------------------------------------------------------------


def test_config_extends_its_base_and_takes_overrides():
    cfg = load_config(TINY, ["train.lr=0.02", "train.lr_steps=[5, 9]", "model.options.nonlocal_options.mode=gaussian"])
    assert cfg["model"]["name"] == "nl_c2d_tiny"  # from the file
    assert cfg["data"]["image_size"] == 32 and cfg["train"]["batch_size"] == 32  # from its base
    assert cfg["train"]["lr"] == 0.02 and cfg["train"]["lr_steps"] == [5, 9]
    assert cfg["model"]["options"] == {"nonlocal_options": {"mode": "gaussian"}}
    assert cfg["train"]["momentum"] == 0.9  # from the defaults


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.lr", "key=value"),
        ("data.type=imagenet", "data.type must be"),
        ("train.batch_size=0", "train.batch_size must be at least 1; got 0"),
        ("train.lr=abc", "train.lr must be a finite number; got 'abc'"),
        ("train.lr=.inf", "train.lr must be a finite number; got inf"),
        ("train.checkpoint_every=0", "train.checkpoint_every must be at least 1; got 0"),
        ("train.iterations=2.5", "train.iterations must be an integer; got 2.5"),
        ("train.amp=yes please", "train.amp must be auto, false, bf16, fp16 or true"),
        ("train.amp=2", "train.amp must be auto, false, bf16, fp16 or true"),
        ("train.clip_grad_norm=-1", "train.clip_grad_norm must be a positive number or null; got -1"),
        ("data.workers=-1", "data.workers must not be negative"),
        ("data.train_scale=256", "data.train_scale must be a list; got 256"),
        ("train.lr_steps=[a]", r"train.lr_steps\[0\] must be an integer; got 'a'"),
        ("train=5", "config section 'train' must be a mapping of keys"),
        ("train.lr_steps=[9, 5]", "increasing"),
        ("data.type=kinetics", "needs data.root"),
        ("data.decoder=ffmpeg", "data.decoder must be one of pyav, torchcodec; got 'ffmpeg'"),
    ],
)
def test_bad_config_names_the_key(override, message):
    """Each of these started training before (a traceback mid-run) or trained with a nonsense value."""
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


SHIPPED = sorted(str(p) for p in Path("configs").glob("*/*.yaml") if p.parent.name != "coco")


def test_the_papers_recipes_are_shipped():
    names = {Path(p).stem for p in SHIPPED}
    assert {"c2d_r50_32x2", "nl_c2d_r50_8x8", "nl_i3d_r50_32x2", "nl_i3d_r50_128x1", "nl_c2d_tiny"} <= names
    eight = load_config("configs/kinetics/nl_i3d_r50_8x8.yaml")  # its own keys on top of base.yaml's
    assert (eight["data"]["root"], eight["data"]["frames"], eight["data"]["sampling_rate"]) == ("data/kinetics", 8, 8)
    long = load_config("configs/kinetics/nl_i3d_r50_128x1.yaml")
    assert long["train"]["freeze_bn"] and long["train"]["lr"] == 0.0025 and long["data"]["frames"] == 128
    charades = load_config("configs/charades/nl_i3d_r50_32x2.yaml")
    assert charades["data"]["type"] == "charades" and charades["train"]["lr_steps"] == [75000, 150000]


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_loads_and_builds_on_meta(path):
    cfg = load_config(path, ["model.pretrained=null"])
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_classes == cfg["data"]["num_classes"]


def test_one_loader_serves_any_schema_with_base_files_and_the_same_overrides(tmp_path):
    from nonlocalnet.engine.config import ConfigSchema, build_config

    def check(cfg):
        if cfg["run"]["name"] == "bad":
            raise ConfigError("run.name must not be 'bad'")

    schema = ConfigSchema(
        {"net": {}, "run": {"steps": 10, "lr": 0.1, "name": "x", "steps_at": [1]}},
        free=("net",),
        positive=("run.steps",),
        non_negative=("run.lr",),
        check=check,
    )
    (tmp_path / "base.yaml").write_text("net: {depth: 2, block: {kind: a}}\nrun: {steps: 5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nnet: {width: 3}\nrun: {lr: 0.5}\n")
    cfg = load_config(tmp_path / "child.yaml", ["net.block.size=4", "run.steps_at=[2, 3]"], schema=schema)
    assert cfg == {
        "net": {"depth": 2, "width": 3, "block": {"kind": "a", "size": 4}},
        "run": {"steps": 5, "lr": 0.5, "name": "x", "steps_at": [2, 3]},
    }
    assert build_config(cfg, schema=schema) == cfg  # a complete config gives itself back
    for override, message in [
        ("run.step=1", "unknown config key 'run.step'; known keys of 'run'"),
        ("run.steps=0", "run.steps must be at least 1"),
        ("run.lr=-1", "run.lr must not be negative"),
        ("run.steps=ten", "run.steps must be an integer; got 'ten'"),
        ("run.name=bad", "run.name must not be 'bad'"),
        ("run", "override 'run' must look like key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config({}, [override], schema)
    # the video schema is the default, unchanged
    assert load_config(TINY) == load_config(TINY, schema=None)


def test_model_options_take_the_override_syntax_of_the_configs():
    from nonlocalnet.engine.config import options_from_overrides, parse_override

    assert parse_override("train.lr_steps=[100, 200]") == ("train.lr_steps", [100, 200])
    assert parse_override("a=") == ("a", "") and parse_override("a=null") == ("a", None)
    options = options_from_overrides(
        [
            "width=8",
            "layers=[1,1,1,1]",
            "nonlocal_locations={res4: [0]}",
            "nonlocal_options.mode=gaussian",
            "clip=8x8",
            "dropout=0.5",
        ]
    )
    assert options == {
        "width": 8,
        "layers": [1, 1, 1, 1],
        "nonlocal_locations": {"res4": [0]},
        "nonlocal_options": {"mode": "gaussian"},
        "clip": "8x8",
        "dropout": 0.5,
    }
    # the same options as a video config's model.options
    cfg = load_config(TINY, ["model.options.width=8", "model.options.layers=[1,1,1,1]"])
    assert {k: cfg["model"]["options"][k] for k in ("width", "layers")} == options_from_overrides(
        ["width=8", "layers=[1,1,1,1]"]
    )
    with pytest.raises(ConfigError, match="override 'width' must look like key=value"):
        options_from_overrides(["width"])
    with pytest.raises(ConfigError, match="'2x' is not an option name"):
        options_from_overrides(["2x=1"])
    with pytest.raises(ConfigError, match="option 'width' is not a mapping"):
        options_from_overrides(["width=8", "width.x=1"])
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        options_from_overrides(["layers=[1,"])
    with pytest.raises(ConfigError, match=r"'layers=\(3,4\)': write a sequence as a YAML list, \[3,4\]"):
        options_from_overrides(["layers=(3,4)"])


# --- optimiser and schedule ------------------------------------------------------------------------------------


def test_step_schedule_with_warmup():
    assert step_lr(0, 0.01, [150000, 300000]) == 0.01
    assert step_lr(149999, 0.01, [150000, 300000]) == 0.01
    assert step_lr(150000, 0.01, [150000, 300000]) == pytest.approx(0.001)
    assert step_lr(300000, 0.01, [150000, 300000]) == pytest.approx(0.0001)
    assert step_lr(0, 0.1, [], warmup_iterations=10, warmup_factor=0.1) == pytest.approx(0.01)
    assert step_lr(5, 0.1, [], warmup_iterations=10, warmup_factor=0.1) == pytest.approx(0.055)
    assert step_lr(10, 0.1, [], warmup_iterations=10) == pytest.approx(0.1)


def test_no_weight_decay_on_norm_parameters():
    model = build_model(load_config(TINY))
    groups = parameter_groups(model, 1e-4, 0.0)
    decayed = {id(p) for p in groups[0]["params"]}
    bn = model.res3.nl0.norm
    assert id(bn.weight) not in decayed and id(bn.bias) not in decayed
    assert id(model.res3.nl0.theta.weight) in decayed and id(model.head.fc.weight) in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, load_config(TINY)["train"])
    assert opt.defaults["nesterov"] and opt.param_groups[1]["weight_decay"] == 0.0


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_only_the_last_k_kept(tmp_path):
    for it in (10, 20, 30, 40):
        save_checkpoint({"iteration": it, "w": torch.full((2,), float(it))}, tmp_path, it, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000000030.pt", "checkpoint_000000040.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000000030.pt", "checkpoint_000000040.pt"]
    (tmp_path / ".checkpoint_000000050.pt.x7.tmp").write_bytes(b"half written")  # a crash mid-write
    assert latest_checkpoint(tmp_path).name == "checkpoint_000000040.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path))["w"].tolist() == [40.0, 40.0]


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    from nonlocalnet.io import atomic_path, write_text_atomic

    target = tmp_path / "sub" / "report.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # a normal file, not mkstemp's private 0600


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint_000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*: truncated, or not a file torch.save"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_restore_training_state_gives_back_weights_optimizer_schedule_and_this_processs_random_state():
    from nonlocalnet.engine.checkpoint import restore_training_state
    from nonlocalnet.engine.distributed import DistInfo, gather_rng_states

    def parts(seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
        return model, optimizer, scheduler

    model, optimizer, scheduler = parts(0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "rng_per_rank": gather_rng_states(torch.device("cpu")),
    }
    expected = torch.rand(3)
    other, other_optimizer, other_scheduler = parts(1)
    assert restore_training_state(
        state,
        "run/checkpoint.pth",
        other,
        other_optimizer,
        torch.device("cpu"),
        DistInfo(),
        lr_scheduler=other_scheduler,
    )
    assert torch.equal(torch.rand(3), expected)  # the random stream goes on where the checkpoint left it
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert other_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    # a checkpoint of a run of another size: no random state for this process (the caller seeds it)
    assert not restore_training_state(state, "x", *parts(1)[:2], torch.device("cpu"), DistInfo(1, 2))
    with pytest.raises(CheckpointError, match="run/checkpoint.pth holds weights of another detector: .*size"):
        restore_training_state(
            state,
            "run/checkpoint.pth",
            nn.Linear(3, 5),
            other_optimizer,
            torch.device("cpu"),
            DistInfo(),
            mismatch="holds weights of another detector",
        )


def test_metric_logger_writes_rows_as_they_are_to_the_file_named(tmp_path):
    from nonlocalnet.engine.logger import MetricLogger

    logger = MetricLogger(tmp_path, tensorboard=False, filename="log.jsonl")
    logger.write({"epoch": 0, "losses": {"loss": 1.5}})
    logger.log(3, {"loss": 0.5})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 0, "losses": {"loss": 1.5}}, {"step": 3, "split": "train", "loss": 0.5}]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    quiet = MetricLogger(None)  # a run without a directory writes nothing
    quiet.write({"epoch": 0})
    quiet.log(1, {"loss": 1.0})
    assert not quiet.enabled


# --- metrics ---------------------------------------------------------------------------------------------------


def test_views_are_averaged_per_video():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]])
    videos = torch.tensor([0, 0, 2, 2])
    mean, ids = metrics.aggregate_views(scores, videos)
    assert ids.tolist() == [0, 2]
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.5], [0.4, 0.6]]))


def test_topk_confusion_and_per_class_accuracy():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 1])
    report = metrics.classification_report(scores, labels, 3)
    assert report["top1"] == 0.5 and report["top5"] == 1.0  # top-5 capped at 3 classes
    assert metrics.topk_accuracy(scores, labels, (2,))[2] == 0.75
    assert report["confusion_matrix"] == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert report["per_class_accuracy"][:2] == [1.0, pytest.approx(1 / 3)]
    assert math.isnan(report["per_class_accuracy"][2])  # no videos of class 2
    assert report["mean_class_accuracy"] == pytest.approx(2 / 3)


def test_views_report_on_known_scores_with_more_classes_than_top5():
    from nonlocalnet.engine.metrics import views_report

    # 7 classes, 4 videos of 2 views each; per video, the averaged scores rank the label 1st, 2nd, 6th, 1st
    ranks = {0: [0, 1, 2, 3, 4, 5, 6], 1: [2, 1, 0, 3, 4, 5, 6], 2: [0, 1, 3, 4, 5, 6, 2], 3: [3, 0, 1, 2, 4, 5, 6]}
    labels_of = {0: 0, 1: 1, 2: 2, 3: 3}
    scores, videos, labels = [], [], []
    for video, order in ranks.items():
        averaged = torch.zeros(7)
        averaged[torch.tensor(order)] = torch.linspace(0.3, 0.01, 7)
        for sign in (1, -1):  # two views whose mean is `averaged`; the first view alone ranks like it
            noise = torch.linspace(-0.005, 0.005, 7).flip(0) * sign
            scores.append(averaged + noise)
            videos.append(video)
            labels.append(labels_of[video])
    report = views_report(torch.stack(scores), torch.tensor(videos), torch.tensor(labels), num_classes=7)
    assert report["videos"] == 4 and report["views"] == 8
    assert report["top1"] == pytest.approx(2 / 4) and report["top5"] == pytest.approx(3 / 4)
    assert report["per_class_accuracy"][:4] == [1.0, 0.0, 0.0, 1.0]
    assert report["mean_class_accuracy"] == pytest.approx(2 / 4)  # classes 4-6 have no video: left out
    confusion = [[0] * 7 for _ in range(7)]
    for video, order in ranks.items():
        confusion[labels_of[video]][order[0]] += 1
    assert report["confusion_matrix"] == confusion


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]])
    ap = metrics.average_precision(scores, targets)
    # class 0: positives ranked 1st and 3rd: (1/1 + 2/3) / 2; class 1: the only positive ranked 1st
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2) and ap[1].item() == pytest.approx(1.0)
    assert math.isnan(metrics.average_precision(scores, torch.zeros(4, 2, dtype=torch.long))[0].item())
    assert metrics.multilabel_report(scores, targets)["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


# --- sampler ---------------------------------------------------------------------------------------------------


def test_sharded_sampler_splits_an_epoch_and_resumes_mid_epoch():
    shards = [ShardedSampler(10, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))
    shards[0].set_epoch(1, start=2)
    assert list(shards[0]) == a[2:]
    shards[0].set_epoch(2)
    assert list(shards[0]) != a  # a new epoch, a new order
    plain = ShardedSampler(5, rank=1, world_size=2, shuffle=False, pad=False)
    assert list(plain) == [1, 3]


# --- the built-in data -----------------------------------------------------------------------------------------


def test_long_range_shapes_label_and_objects():
    data = LongRangeShapes(16, num_classes=3, seed=5)
    for i in range(16):
        item = data[i]
        clip, objects = item["clip"], item["objects"]
        assert clip.shape == (3, 8, 32, 32)
        (ta, ya, xa, _, _), (tb, yb, xb, _, _) = objects.tolist()
        assert ta < 4 <= tb  # a in the first half of the clip, b in the second
        assert (xa < 16) != (xb < 16)  # in different halves of the picture
        rgb = clip * 57.375 + 114.75
        shapes = []
        for t, y, x in ((ta, ya, xa), (tb, yb, xb)):
            patch = rgb[:, t, y : y + 7, x : x + 7]
            # the shape's pixels share one colour: the first mask whose pixels are uniform (square is tried
            # first because every other mask is uniform inside a square too)
            inside = {
                k: (patch[:, shape_mask(n)].std(dim=1).max().item()) for k, n in enumerate(("square", "plus", "cross"))
            }
            shapes.append(min(inside, key=inside.get))
            assert min(inside.values()) < 1e-3
        assert int(item["label"]) == sum(shapes) % 3


def test_long_range_shapes_are_reproducible_and_epochs_differ():
    a, b = LongRangeShapes(4, seed=1), LongRangeShapes(4, seed=1)
    torch.testing.assert_close(a[2]["clip"], b[2]["clip"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["clip"], b[2]["clip"])
    test_a, test_b = LongRangeShapes(4, split="test", seed=1), LongRangeShapes(4, split="test", seed=1)
    test_b.set_epoch(7)  # test clips never change
    torch.testing.assert_close(test_a[3]["clip"], test_b[3]["clip"])
    assert not torch.equal(test_a[0]["clip"], a[0]["clip"])  # splits are disjoint streams


def test_long_range_shapes_labels_balanced_and_other_frames_empty():
    data = LongRangeShapes(400, seed=0)
    labels = torch.stack([data[i]["label"] for i in range(400)])
    assert 0.4 < labels.float().mean().item() < 0.6
    item = data[0]
    rgb = item["clip"] * 57.375 + 114.75
    with_objects = set(item["objects"][:, 0].tolist())
    # frames without a shape are noise around one background colour: no pixel far from the frame's mean
    for t in range(8):
        spread = (rgb[:, t] - rgb[:, t].mean(dim=(1, 2), keepdim=True)).abs().amax().item()
        assert (spread > 60) == (t in with_objects)  # noise stays within ~4 sigma = 48 of the grey


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"frames": 7}, "even"),
        ({"image_size": 8}, "at least 16"),
        ({"num_classes": 9}, "between 2 and"),
        ({"split": "dev"}, "split"),
    ],
)
def test_long_range_shapes_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongRangeShapes(4, **kwargs)


# --- precise BN and evaluation ---------------------------------------------------------------------------------


def test_precise_bn_gives_the_population_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Dropout(0.5))
    batches = [torch.randn(4, 2, 5) * (i + 1) for i in range(6)]
    used = update_bn_stats(model, iter(batches), num_batches=6)
    features = [model[0](b).transpose(0, 1).reshape(3, -1) for b in batches]
    expected_mean = torch.stack([f.mean(1) for f in features]).mean(0)  # mean of the batch means
    expected_var = torch.stack([f.var(1, unbiased=True) for f in features]).mean(0)  # of the batch variances
    torch.testing.assert_close(model[1].running_mean, expected_mean.detach())
    torch.testing.assert_close(model[1].running_var, expected_var.detach())
    assert used == 6 and model[1].momentum == 0.1 and model.training  # modes restored


def _precise_bn_rank(rank: int, init: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))
    batches = [torch.randn(4, 2, 5) * (2 * i + rank + 1) + rank for i in range(3)]  # each rank its own batches
    update_bn_stats(model, iter(batches), num_batches=3)
    results[rank] = (model[1].running_mean.clone(), model[1].running_var.clone())
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_precise_bn_under_two_processes_averages_both_ranks_batches(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_precise_bn_rank, args=(f"file://{tmp_path / 'init'}", results), nprocs=2)
    stats = []
    for rank in (0, 1):  # the same weights and batches as each rank, the statistics by hand
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))
        batches = [torch.randn(4, 2, 5) * (2 * i + rank + 1) + rank for i in range(3)]
        with torch.no_grad():
            features = [model[0](b).transpose(0, 1).reshape(3, -1) for b in batches]
        stats.append(
            (
                torch.stack([f.mean(1) for f in features]).mean(0),
                torch.stack([f.var(1, unbiased=True) for f in features]).mean(0),
            )
        )
    for rank in (0, 1):  # every rank ends with the average over both ranks' batches
        torch.testing.assert_close(results[rank][0], (stats[0][0] + stats[1][0]) / 2)
        torch.testing.assert_close(results[rank][1], (stats[0][1] + stats[1][1]) / 2)
    assert not torch.allclose(stats[0][0], stats[1][0])  # the ranks did see different batches


def test_evaluate_aggregates_views_and_reports(tmp_path):
    cfg = load_config(TINY, ["data.test_size=20", "progress=false", "test.batch_size=8"])
    from nonlocalnet.data import build_dataset

    model = build_model(cfg).eval()
    test_set = build_dataset(cfg["data"], "test", cfg["seed"])
    clips = torch.stack([test_set[i]["clip"] for i in range(len(test_set))])
    with torch.no_grad():  # a classifier whose decision splits the clips, so that both classes are predicted
        margin = model(clips) @ torch.tensor([1.0, -1.0])
        model.head.fc.bias[0] -= margin.median()
    report = evaluate(model, cfg)
    assert report["videos"] == report["views"] == 20 and report["skipped_videos"] == 0
    # the same scores computed item by item, without the loader, the sampler or the aggregation
    with torch.no_grad():
        predictions = [int(model(test_set[i]["clip"][None]).argmax()) for i in range(len(test_set))]
    labels = [int(test_set[i]["label"]) for i in range(len(test_set))]
    assert 0 < sum(predictions) < 20  # both classes predicted: the comparison below can fail
    assert report["top1"] == pytest.approx(np.mean(np.array(predictions) == np.array(labels)))
    confusion = np.zeros((2, 2), int)
    np.add.at(confusion, (labels, predictions), 1)
    assert report["confusion_matrix"] == confusion.tolist()
    json.dumps(report)  # the report is plain JSON


def test_views_report_gives_video_and_clip_level_accuracy():
    from nonlocalnet.engine.metrics import views_report

    # video 0 (label 0): one right view of three, right once averaged; video 1 (label 1): two of three, right;
    # video 2 (label 2) has only two views, both wrong
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],
            [0.4, 0.6, 0.0],
            [0.4, 0.6, 0.0],
            [0.2, 0.8, 0.0],
            [0.6, 0.4, 0.0],
            [0.3, 0.7, 0.0],
            [0.5, 0.3, 0.2],
            [0.3, 0.5, 0.2],
        ]
    )
    videos = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    report = views_report(scores, videos, labels, num_classes=3)
    assert report["top1"] == pytest.approx(2 / 3) and report["clip_top1"] == pytest.approx(3 / 8)
    assert report["videos"] == 3 and report["views"] == 8
    assert report["views_per_video"] == {"mean": pytest.approx(8 / 3, abs=1e-3), "min": 2, "max": 3}
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]  # video 2 averaged: [0.4, 0.4, 0.2]
    # multi-label: a clip-level mAP beside the video-level one
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    ml = views_report(
        torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.2, 0.8], [0.3, 0.6]]),
        torch.tensor([0, 0, 1, 1]),
        targets,
        num_classes=2,
        multi_label=True,
    )
    # clip level, class 0: ranked 0.9(+), 0.3(-), 0.2(-), 0.1(+) -> AP (1 + 2/4) / 2; class 1: 0.8(+), 0.6(+) first
    assert ml["clip_mAP"] == pytest.approx(((1 + 0.5) / 2 + 1.0) / 2) and ml["mAP"] == pytest.approx(1.0)


def test_fully_convolutional_evaluation_leaves_the_model_as_it_was():
    from nonlocalnet.engine import build_model, load_config
    from nonlocalnet.engine.trainer import evaluate

    cfg = load_config(
        "configs/synthetic/nl_c2d_tiny.yaml", ["progress=false", "data.test_size=4", "test.fully_convolutional=true"]
    )
    model = build_model(cfg)
    model.score_activation = None  # raw logits, as a caller may have set; evaluation scores with softmax
    report = evaluate(model, cfg)
    assert report["videos"] == 4
    assert (model.fully_convolutional, model.score_activation) == (False, None)  # both restored


def test_precise_bn_reads_each_processes_own_shard():
    # under two processes each rank must measure other batches (and the ranks' statistics are then averaged);
    # before, every rank recomputed the same ones
    from nonlocalnet.data import build_dataset
    from nonlocalnet.engine import build_model, load_config
    from nonlocalnet.engine.distributed import DistInfo
    from nonlocalnet.engine.loop import RunContext
    from nonlocalnet.engine.trainer import precise_bn_copy

    cfg = load_config(
        "configs/synthetic/c2d_tiny.yaml",
        ["progress=false", "data.train_size=64", "train.batch_size=8", "train.precise_bn_batches=2"],
    )
    model = build_model(cfg)
    dataset = build_dataset(cfg["data"], "train", cfg["seed"])
    stats = [
        precise_bn_copy(
            model, dataset, RunContext(cfg, torch.device("cpu"), DistInfo(rank=r, world_size=2))
        ).bn1.running_mean
        for r in (0, 1)
    ]
    alone = precise_bn_copy(model, dataset, RunContext(cfg, torch.device("cpu"))).bn1.running_mean
    assert not torch.equal(stats[0], stats[1])
    assert not torch.equal(stats[1], alone)  # rank 1 does not measure the single process's batches either
