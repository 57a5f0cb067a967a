"""Training and testing torchvision's detectors with NL blocks: detection as a task of the one training loop.

    report = train(load_config("tiny_shapes", ["output_dir=runs/shapes"]))
    summary = test("runs/shapes/model_final.safetensors")

:class:`Detection` supplies the detector, the COCO (or built-in) data, the sum of torchvision's losses and the
COCOeval evaluation to :func:`~nonlocalnet.engine.loop.train_loop`, which owns what every run shares with video
training: the step schedule, the precision policy, the non-finite-loss rule, the run folder (``config.yaml``,
``metrics.jsonl``, ``checkpoints/checkpoint_<iteration>.pt``, ``model_final.safetensors``, ``test_metrics.json``),
resume and the log line. Epochs only count iterations here: an epoch is one pass over the training images (or
``train.max_iters_per_epoch`` steps of it), ``train.lr_steps`` and ``train.eval_every`` count epochs, and a
checkpoint is written at the end of every epoch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checkpoint import CheckpointError, load_checkpoint
from ..engine.config import to_plain
from ..engine.distributed import all_reduce_mean, init_distributed, is_main_process, resolve_device
from ..engine.loop import LoopSettings, RunContext, train_loop
from ..engine.optim import fused_sgd
from ..engine.rundir import RESUMABLE_KEYS
from ..io import atomic_path
from ..models.checkpoints.weights import load_state_dict_or_raise, read_state_dict, save_weights
from .builders import build_detector
from .config import complete_config
from .evaluate import evaluate, format_summary, iou_types_for
from .loaders import build_datasets, make_loader
from .transforms import RandomHorizontalFlip

# config keys a resumed run may change: those of a video run, where the data are, how many loader processes
RESUMABLE_DETECTION_KEYS = (*RESUMABLE_KEYS, "data.root", "train.workers")


def train(
    cfg: Mapping[str, Any],
    resume: bool | str | os.PathLike = False,
    stop_after: int | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains a detector as the config says into ``cfg["output_dir"]`` and evaluates it on the val set; returns
    the final evaluation ({iou_type: {"AP": ...}}) and ``train_seconds``.

    Args:
        cfg: a complete config (:func:`~nonlocalnet.detection.config.load_config`).
        resume, stop_after, allow_config_change: as :func:`~nonlocalnet.engine.loop.train_loop` (True: the run
            folder's newest readable checkpoint; a path: that checkpoint).
    """
    device = resolve_device(cfg["device"])
    ctx = RunContext(cfg, device, init_distributed(device), Path(cfg["output_dir"]), bool(cfg["progress"]))
    return train_loop(
        Detection(ctx), ctx, resume=resume, stop_after=stop_after, allow_config_change=allow_config_change
    )


class Detection:
    """Detection as a task of :func:`~nonlocalnet.engine.loop.train_loop`: torchvision's Mask R-CNN / Keypoint
    R-CNN with NL blocks, SGD at ``train.lr`` scaled linearly with the global batch, the sum of the detector's
    losses, COCOeval on the val set."""

    unit = "images"
    resumable_keys = RESUMABLE_DETECTION_KEYS
    skipped_name = None
    report_sections = True

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.kind = ctx.cfg["model"].get("task")
        self.name = f"{self.kind} {ctx.cfg['model'].get('arch', '')}".strip()
        # set by setup(), from the data
        self.iterations_per_epoch = 0
        self.lr = 0.0
        self.train_set = self.val_set = self.val_loader = None
        self.meta: dict[str, Any] = {}

    def setup(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        cfg, info, device = self.cfg, self.ctx.info, self.ctx.device
        t = cfg["train"]
        torch.manual_seed(t["seed"] + info.rank)
        train_set, val_set = build_datasets(cfg["data"], self.kind)
        if t["hflip"]:
            perm = train_set.flip_permutation() if self.kind == "keypoint" else None
            train_set.transform = RandomHorizontalFlip(t["hflip"], keypoint_permutation=perm)
        model = build_detector(
            cfg["model"], num_classes=train_set.num_classes, num_keypoints=train_set.num_keypoints or None
        )
        model.to(device)
        if t["sync_bn"] and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.lr = t["lr"] * t["batch_size"] * info.world_size / t["lr_reference_batch"]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=t["momentum"], weight_decay=t["weight_decay"], fused=fused_sgd(params) or None
        )
        self.train_set, self.val_set = train_set, val_set
        # batches of this process's share of an epoch (DistributedSampler pads the share to ceil(N / processes))
        whole = math.ceil(math.ceil(len(train_set) / info.world_size) / t["batch_size"])
        cut = t["max_iters_per_epoch"]
        self.iterations_per_epoch = whole if cut is None else min(cut, whole)
        self.val_loader = make_loader(val_set, t["batch_size"], t["workers"], train=False)
        self.meta = {
            "category_ids": train_set.category_ids,
            "num_classes": train_set.num_classes,
            "keypoint_names": list(train_set.keypoint_names),
        }
        if info.is_main:
            print(
                f"detector: {self.name} on {len(train_set)} train / {len(val_set)} val images, "
                f"{info.world_size} process(es) x {t['batch_size']} images, lr {self.lr:g}, {t['epochs']} epochs "
                f"of {self.iterations_per_epoch} iterations, device {device}",
                flush=True,
            )
        return model, optimizer

    def settings(self) -> LoopSettings:
        t, per_epoch = self.cfg["train"], self.iterations_per_epoch
        return LoopSettings(
            iterations=t["epochs"] * per_epoch,
            lr=self.lr,
            lr_steps=tuple(int(s) * per_epoch for s in t["lr_steps"]),
            lr_gamma=t["lr_gamma"],
            warmup_iterations=t["warmup_iters"],
            warmup_factor=t["warmup_factor"],
            amp=t["amp"],
            clip_grad_norm=None,
            log_every=t["log_every"],
            checkpoint_every=per_epoch,
            keep_checkpoints=t["keep_checkpoints"],
            eval_every=t["eval_every"] * per_epoch,
            test_at_end=self.cfg["test"]["at_end"],
        )

    def batches(self, start: int) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        """Epoch after epoch from iteration ``start``: each epoch's order from (seed, epoch) alone, cut to
        ``iterations_per_epoch`` steps."""
        t, per_epoch = self.cfg["train"], self.iterations_per_epoch
        epoch, offset = divmod(start, per_epoch)
        while True:
            loader = make_loader(
                self.train_set,
                t["batch_size"],
                t["workers"],
                train=True,
                seed=t["seed"],
                epoch=epoch,
                skip=offset * t["batch_size"],
            )
            # no batch is drawn past the cut: its flips would shift the random stream of the steps after it
            yield from islice(loader, per_epoch - offset)
            epoch, offset = epoch + 1, 0

    def forward(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        device = self.ctx.device
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return model(images, targets)

    def loss(self, losses: Mapping[str, torch.Tensor], batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}

    def items(self, batch: Any) -> int:
        return len(batch[0])

    def skipped_ids(self, batch: Any) -> list[int]:
        return []

    def window_values(self, sums: Mapping[str, float], steps: int, items: int) -> dict[str, float]:
        names = sorted(sums)
        if not names:
            return {}
        means = all_reduce_mean(torch.tensor([sums[k] / steps for k in names], device=self.ctx.device))
        return dict(zip(names, means.tolist()))

    def evaluate(self, model: nn.Module, iteration: int) -> dict[str, Any]:
        summary = evaluate(
            model,
            self.val_loader,
            self.ctx.device,
            iou_types_for(self.kind),
            kpt_oks_sigmas=self.cfg["data"]["kpt_oks_sigmas"],
            progress=self.ctx.progress,
        )
        if self.ctx.info.is_main:
            print(f"epoch {iteration // self.iterations_per_epoch - 1}\n{format_summary(summary)}", flush=True)
        return summary

    def final_model(self, model: nn.Module, iteration: int) -> nn.Module:
        return model

    def save_weights(self, model: nn.Module, path: Path) -> None:
        # what `nonlocalnet detect-test --checkpoint` needs to rebuild the detector and read its categories
        with atomic_path(path) as tmp:
            save_weights(
                model,
                tmp,
                metadata={"task": "detection", "config": json.dumps(to_plain(self.cfg)), "meta": json.dumps(self.meta)},
            )

    def test(self, model: nn.Module) -> dict[str, Any]:
        return self.evaluate(model, self.cfg["train"]["epochs"] * self.iterations_per_epoch)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"task": "detection", "meta": self.meta}

    def check_checkpoint(self, state: Mapping[str, Any], source: Path) -> None:
        if state.get("task") != "detection":
            raise CheckpointError(f"{source} is not a checkpoint of `nonlocalnet detect-train`")


def test(
    checkpoint: str | os.PathLike,
    *,
    config: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    results_file: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates a detect-train run's weights on the val set of its config (or of ``config``).

    Args:
        checkpoint: the run's ``model_final.safetensors`` or one of its ``checkpoints/checkpoint_<iteration>.pt``.
        config: the config to evaluate with; None: the one the file recorded.
        overrides: ``key=value`` changes of that config (e.g. ``data.num_val=200``).
        results_file: also write the detections (COCO results format) as json.
    """
    weights, recorded, meta = _read_detection_weights(Path(checkpoint))
    config = complete_config(config if config is not None else recorded, overrides)
    device = resolve_device(config["device"])
    init_distributed(device)
    task = config["model"].get("task")
    _, val_set = build_datasets(config["data"], task, train=False)
    if meta.get("category_ids") and list(meta["category_ids"]) != val_set.category_ids:
        raise ValueError(
            f"the checkpoint was trained on categories {meta['category_ids']}; the val set lists {val_set.category_ids}"
        )
    model_cfg = {k: v for k, v in config["model"].items() if k != "backbone_weights"}  # the checkpoint has them
    model = build_detector(
        model_cfg,
        num_classes=meta.get("num_classes", val_set.num_classes),
        num_keypoints=len(meta.get("keypoint_names", ())) or val_set.num_keypoints or None,
    )
    load_state_dict_or_raise(
        model, weights, f"{checkpoint} does not fit the config's detector", CheckpointError, source=str(checkpoint)
    )
    model.to(device)
    loader = make_loader(val_set, config["train"]["batch_size"], config["train"]["workers"], train=False)
    summary = evaluate(
        model,
        loader,
        device,
        iou_types_for(task),
        kpt_oks_sigmas=config["data"]["kpt_oks_sigmas"],
        results_file=results_file,
        progress=config["progress"],
    )
    if is_main_process():
        print(format_summary(summary))
    return summary


def _read_detection_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, the config they were trained with, their categories) of a detect-train file."""
    if path.suffix == ".safetensors":
        from ..models.checkpoints.weights import read_metadata

        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        metadata = read_metadata(path)
        if metadata.get("task") != "detection" or "config" not in metadata:
            raise CheckpointError(
                f"{path} is not the weights of a detect-train run (its metadata names no detection config)"
            )
        weights, _ = read_state_dict(path)
        return weights, json.loads(metadata["config"]), json.loads(metadata.get("meta", "{}"))
    state = load_checkpoint(path)
    if state.get("task") != "detection" or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of `nonlocalnet detect-train` (needs 'model' and 'config')")
    return state["model"], state["config"], state.get("meta", {})
