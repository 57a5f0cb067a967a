"""Training video classifiers: the video classification task of the one training loop (:mod:`.loop`).

    result = train(cfg)                      # cfg from load_config(...); returns the final test report
    report = test(cfg, checkpoint="runs/x/model_final.safetensors")

Everything a run writes goes to ``cfg["output_dir"]``: ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/checkpoint_<iteration>.pt`` (the last ``train.keep_checkpoints``),
``model_final.safetensors`` (weights after precise BN) and ``test_metrics.json``.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import ShardedSampler, build_dataset, is_multi_label
from ..io import atomic_path
from ..layers import NonLocalBlock
from ..models import create_model
from ..models.batchnorm import freeze_batchnorm
from ..models.checkpoints.pretrained import load_pretrained
from ..models.checkpoints.weights import save_weights
from ..viz.diagnostics import warn_inactive_blocks
from .checkpoint import CheckpointError
from .classes import check_num_classes, resolve_num_classes
from .config import to_plain
from .distributed import DistInfo, all_reduce_mean, init_distributed, resolve_device, unwrap_model
from .evaluation import device_clips, evaluate, make_loader, model_options, skipped_ids, test
from .loop import LoopSettings, RunContext, TrainingDiverged, train_loop
from .optim import build_optimizer
from .precise_bn import update_bn_stats
from .precision import amp_dtype, apply_memory_format, autocast
from .resume import process_seed
from .rundir import RESUMABLE_KEYS

__all__ = [
    "TrainingDiverged",
    "VideoClassification",
    "amp_dtype",
    "build_model",
    "evaluate",
    "precise_bn_copy",
    "resolve_num_classes",
    "seed_everything",
    "test",
    "train",
    "training_data",
]


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """The config's model: a registered name with its options, pretrained weights loaded, BN frozen if asked."""
    model = create_model(cfg["model"]["name"], **model_options(cfg))
    if cfg["model"].get("pretrained"):
        load_pretrained(model, cfg["model"]["pretrained"])
    if cfg["train"]["freeze_bn"]:
        # the backbone's BN is frozen; a non-local block's own BN (γ = 0 at init) stays trainable, or the block
        # would stay the identity forever
        model = freeze_batchnorm(model, exclude=(NonLocalBlock,))
    return model


def train(
    cfg: Mapping[str, Any],
    resume: bool | str | os.PathLike = False,
    stop_after: int | None = None,
    on_iteration: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    log_lines: bool = True,
) -> dict[str, Any]:
    """Trains the config's model and tests it; returns the test report (the main process's copy).

    Args:
        cfg: a resolved config (:func:`~nonlocalnet.engine.config.load_config`).
        resume, stop_after, on_iteration, allow_config_change: as :func:`~nonlocalnet.engine.loop.train_loop`.
        log_lines: print the log line every ``train.log_every`` iterations (:class:`~.loop.RunContext`).

    Returns:
        The test report of :func:`evaluate` plus ``train_seconds`` and ``skipped_videos_train``, or
        ``{"stopped_at": iteration}``.
    """
    cfg = resolve_num_classes(cfg)
    device = resolve_device(cfg["device"])
    ctx = RunContext(cfg, device, init_distributed(device), Path(cfg["output_dir"]), bool(cfg["progress"]), log_lines)
    return train_loop(
        VideoClassification(ctx),
        ctx,
        resume=resume,
        stop_after=stop_after,
        on_iteration=on_iteration,
        allow_config_change=allow_config_change,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the global stream that code outside ours may draw from)
    torch.manual_seed(seed)


# --- the training data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    """The training set and this process's sampler of it.

    Attributes:
        dataset: the training clips.
        sampler: this process's shard of each epoch's order.
        iterations_per_epoch: steps of the global batch (``train.batch_size`` x processes) in an epoch.
    """

    dataset: Dataset
    sampler: ShardedSampler
    iterations_per_epoch: int

    def epoch_of_step(self, iteration: int) -> int:
        """The epoch of the training step that brought the run to ``iteration``."""
        return (iteration - 1) // self.iterations_per_epoch


def training_data(cfg: Mapping[str, Any], info: DistInfo) -> TrainingData:
    """The config's training set, sharded over the processes.

    Raises:
        ValueError: the set holds less than one global batch.
    """
    dataset = build_dataset(cfg["data"], "train", cfg["seed"], normalize=False)  # uint8: see device_clips
    batch_size = cfg["train"]["batch_size"]
    per_step = batch_size * info.world_size
    if len(dataset) < per_step:
        raise ValueError(
            f"the training set has {len(dataset)} clips, fewer than one global batch of {per_step} "
            f"(train.batch_size {batch_size} x {info.world_size} processes)"
        )
    sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=True, seed=cfg["seed"])
    return TrainingData(dataset, sampler, len(dataset) // per_step)


def precise_bn_copy(model: nn.Module, dataset: Dataset, ctx: RunContext, epoch: int | None = None) -> nn.Module:
    """A copy of the model with precise BN statistics from training batches (the model itself is untouched).

    Each process reads its own shard of the batches; the statistics are then averaged over the processes.
    ``epoch`` fixes which epoch's items are read (datasets that draw new items per epoch): the epoch of the last
    training step, so that a run resumed from its final checkpoint, whose loop never set the dataset's epoch,
    measures what the uninterrupted run measured. None keeps the dataset's current epoch.
    """
    cfg, info = ctx.cfg, ctx.info
    final = copy.deepcopy(unwrap_model(model))
    n = cfg["train"]["precise_bn_batches"]
    if n > 0:
        if epoch is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        rng = torch.get_rng_state()  # the training run's dropout stream must not depend on evaluations
        sampler = ShardedSampler(
            len(dataset), rank=info.rank, world_size=info.world_size, shuffle=True, seed=cfg["seed"] + 7919
        )
        loader = make_loader(dataset, sampler, cfg["train"]["batch_size"], cfg["data"]["workers"], True, cfg["seed"])
        with autocast(ctx.device, cfg["train"]["amp"]):
            update_bn_stats(final, (device_clips(batch, ctx.device) for batch in loader), n)
        torch.set_rng_state(rng)
    return final


def _loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


# --- the task --------------------------------------------------------------------------------------------------


class VideoClassification:
    """Video classification as a task of :func:`~nonlocalnet.engine.loop.train_loop`: the config's registered
    model, its video (or built-in) data, cross-entropy (binary for multi-label data), precise BN before testing,
    the multi-view test."""

    unit = "clips"
    resumable_keys = RESUMABLE_KEYS
    skipped_name = "skipped_videos"
    report_sections = False

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.name = ctx.cfg["model"]["name"]
        self.multi_label = is_multi_label(ctx.cfg["data"])
        self.data: TrainingData | None = None

    def setup(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        cfg, info = self.cfg, self.ctx.info
        seed_everything(cfg["seed"])  # the same initial weights in every process
        model = apply_memory_format(
            build_model(cfg).to(self.ctx.device), self.ctx.device, cfg["train"]["memory_format"]
        )
        if cfg["train"]["compile"]:
            model.compile()  # in place: the state dict's keys stay the model's own
        if cfg["train"]["sync_bn"] and self.ctx.device.type != "cuda":
            raise ValueError(
                "train.sync_bn needs CUDA devices (torch's SyncBatchNorm runs only on GPU); on CPU "
                "processes (gloo) leave it false and each process keeps its own BN statistics"
            )
        if cfg["train"]["sync_bn"] and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = build_optimizer(model, cfg["train"])
        self.data = training_data(cfg, info)
        check_num_classes(cfg)  # after the list's own errors (a missing video, a bad line)
        # each process its own dropout stream (the data order is per rank already, through the sampler); process 0
        # goes on with the stream the initialisation left, as a single-process run does
        if info.rank:
            torch.manual_seed(process_seed(cfg["seed"], info.rank))
        return model, optimizer

    def settings(self) -> LoopSettings:
        t = self.cfg["train"]
        return LoopSettings(
            iterations=t["iterations"],
            lr=t["lr"],
            lr_steps=tuple(t["lr_steps"]),
            lr_gamma=t["lr_gamma"],
            warmup_iterations=t["warmup_iterations"],
            warmup_factor=t["warmup_factor"],
            amp=t["amp"],
            clip_grad_norm=t["clip_grad_norm"],
            log_every=t["log_every"],
            checkpoint_every=t["checkpoint_every"],
            keep_checkpoints=t["keep_checkpoints"],
            eval_every=t["eval_every"],
            test_at_end=self.cfg["test"]["at_end"],
            check_blocks_after=t["check_blocks_after"],
        )

    def batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches from ``start`` on, epoch after epoch; item choices depend only on (seed, epoch, index)."""
        data, cfg = self.data, self.cfg
        batch_size = cfg["train"]["batch_size"]
        iteration = start
        while True:
            epoch, offset = divmod(iteration, data.iterations_per_epoch)
            data.sampler.set_epoch(epoch, start=offset * batch_size)
            if hasattr(data.dataset, "set_epoch"):
                data.dataset.set_epoch(epoch)
            loader = make_loader(
                data.dataset, data.sampler, batch_size, cfg["data"]["workers"], True, cfg["seed"] + epoch
            )
            for batch in loader:
                yield batch
                iteration += 1
                if iteration % data.iterations_per_epoch == 0:
                    break

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(device_clips(batch, self.ctx.device))

    def loss(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["label"].to(self.ctx.device, non_blocking=True)
        loss = _loss(logits, labels, self.multi_label)
        correct = 0 if self.multi_label else int((logits.argmax(1) == labels).sum())
        return loss, {"correct": correct}

    def items(self, batch: Mapping[str, torch.Tensor]) -> int:
        return len(batch["clip"])

    def check_blocks(self, model: nn.Module, batch: Mapping[str, torch.Tensor], iteration: int) -> None:
        warn_inactive_blocks(model, device_clips(batch, self.ctx.device)[:1], iteration)

    def skipped_ids(self, batch: Mapping[str, torch.Tensor]) -> list[int]:
        return skipped_ids(batch)

    def window_values(self, sums: Mapping[str, float], steps: int, items: int) -> dict[str, float]:
        if self.multi_label:
            return {}
        return {"train_accuracy": float(all_reduce_mean(torch.tensor(sums["correct"] / items, device=self.ctx.device)))}

    def evaluate(self, model: nn.Module, iteration: int) -> dict[str, Any]:
        return evaluate(self.final_model(model, iteration), self.cfg, device=self.ctx.device, info=self.ctx.info)

    def final_model(self, model: nn.Module, iteration: int) -> nn.Module:
        return precise_bn_copy(model, self.data.dataset, self.ctx, self.data.epoch_of_step(iteration))

    def save_weights(self, model: nn.Module, path: Path) -> None:
        # the metadata `nonlocalnet visualize` (nonlocalnet.viz.load_model) reads to rebuild the model
        with atomic_path(path) as tmp:
            save_weights(
                model,
                tmp,
                metadata={
                    "model": self.cfg["model"]["name"],
                    "model_options": json.dumps(self.cfg["model"]["options"]),
                },
            )

    def test(self, model: nn.Module) -> dict[str, Any]:
        return evaluate(model, self.cfg, device=self.ctx.device, info=self.ctx.info)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"model_name": self.cfg["model"]["name"], "model_options": to_plain(self.cfg["model"]["options"])}

    def check_checkpoint(self, state: Mapping[str, Any], source: Path) -> None:
        if state.get("task", "video") != "video":
            raise CheckpointError(f"{source} is a checkpoint of `nonlocalnet detect-train`, not of a video run")
