"""Training and evaluation of video classifiers: one process or many under torchrun.

    result = train(cfg)                      # cfg from load_config(...); returns the final test report
    report = test(cfg, checkpoint="runs/x/model_final.safetensors")

Everything a run writes goes to ``cfg["output_dir"]``: ``config.yaml`` (the resolved config), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/checkpoint_<iteration>.pt`` (the last ``train.keep_checkpoints``),
``model_final.safetensors`` (weights after precise BN) and ``test_metrics.json``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import ShardedSampler, build_dataset, collate, is_multi_label
from ..data.transforms import normalize
from ..io import atomic_path, write_text_atomic
from ..layers import NonLocalBlock
from ..models import create_model
from ..models.batchnorm import freeze_batchnorm
from ..models.pretrained import load_pretrained
from ..models.weights import load_model, save_weights
from . import metrics as M
from .checkpoint import (CheckpointError, checkpoint_iteration, latest_checkpoint, list_checkpoints,
                         load_checkpoint, newest_readable_checkpoint, remove_debris, restore_training_state,
                         save_checkpoint, set_aside)
from .config import save_config, to_plain
from .distributed import (DistInfo, all_gather_cat, all_reduce_mean, barrier, check_same_config,
                          gather_rng_states, init_distributed, resolve_device, unwrap_model)
from .logger import MetricLogger
from .optim import build_optimizer, set_lr, step_lr
from .precise_bn import update_bn_stats
from .signals import check_interrupted
from .rundir import (RunDirectoryError, RunIdentity, check_resume_config, check_unused, claim_run,
                     lock_run_directory, record_run, truncate_jsonl)

log = logging.getLogger("nonlocalnet")


# --- the model -------------------------------------------------------------------------------------------------

def model_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config's model options, its classifier sized to ``data.num_classes`` unless they say otherwise."""
    return {"num_classes": cfg["data"]["num_classes"], **cfg["model"]["options"]}


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


# --- a training run --------------------------------------------------------------------------------------------

def train(cfg: Mapping[str, Any], resume: bool | str | os.PathLike = False,
          stop_after: int | None = None, on_iteration: Callable[[int], None] | None = None,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Trains the config's model and evaluates it; returns the test report (the main process's copy).

    A run directory belongs to one run: a fresh start into a directory that holds a run's files refuses, and a
    resume refuses a config other than the checkpoint's (see :mod:`~nonlocalnet.engine.rundir`). The config is
    written only once everything has been checked.

    Args:
        cfg: a resolved config (:func:`~nonlocalnet.engine.config.load_config`).
        resume: True = continue from the newest readable checkpoint in the run's directory (a fresh start if
            there is none; unreadable newer ones are set aside with a warning); a path = continue from that
            checkpoint; False = start from scratch in an unused directory.
        stop_after: stop (after checkpointing) at this iteration without evaluating, as if interrupted; for
            tests of exact resumption.
        on_iteration: called with the iteration count after every training step (progress for a caller that
            shows it elsewhere, such as the comparison's parent process).
        allow_config_change: resume even when the config differs from the checkpoint's (the changes are logged).

    Returns:
        The test report of :func:`evaluate` plus ``train_seconds``, or ``{"stopped_at": iteration}``.
    """
    device = resolve_device(cfg["device"])
    info = init_distributed(device)
    check_same_config(cfg)  # every process of a torchrun job trains one config
    lock = lock_run_directory(cfg["output_dir"]) if info.is_main else None  # one run at a time in the directory
    try:
        return _train(cfg, device, info, resume, stop_after, on_iteration, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Mapping[str, Any], device: torch.device, info: DistInfo, resume: bool | str | os.PathLike,
           stop_after: int | None, on_iteration: Callable[[int], None] | None, allow_config_change: bool
           ) -> dict[str, Any]:
    """:func:`train` once the run directory is this process's."""
    out = Path(cfg["output_dir"])
    if not resume:
        check_unused(out)
    source, state, unreadable = _resume_source(resume, out / "checkpoints")
    if state is not None:
        _check_resumable(state, source, cfg, info, allow_config_change)
    run = None
    if info.is_main:  # which run this is: the directory's own, or a new one (refusing to mix two)
        run = claim_run(out, cfg, state, source, has_checkpoints=bool(list_checkpoints(out / "checkpoints")),
                        explicit=resume is not True and bool(resume), say=log.warning)

    seed_everything(cfg["seed"])  # the same initial weights in every process
    model = _training_model(cfg, device, info)
    optimizer = build_optimizer(model, cfg["train"])
    scaler = _grad_scaler(device, cfg["train"]["amp"], info)
    data = training_data(cfg, info)
    # each process its own dropout stream (the data order is per rank already, through the sampler); process 0
    # goes on with the stream the initialisation left, as a single-process run does
    if info.rank:
        torch.manual_seed(process_seed(cfg["seed"], info.rank))
    start, skipped = 0, set()  # skipped: the corrupt videos this process passed over so far
    if state is not None:
        start, skipped = load_training_state(state, source, model, optimizer, scaler, device, info)

    barrier()  # every process has read what it needs before the main process changes the directory
    if info.is_main:
        _prepare_directory(out, cfg, start, unreadable, resumed=state is not None)
        record_run(out, run)
        if state is not None:
            log.info("resumed from %s at iteration %d", source, start)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model
    logger = MetricLogger(out, enabled=info.is_main, purge_step=start + 1 if start else None,
                          run_id=run.run_id if run else None)
    total = cfg["train"]["iterations"]
    end = total if stop_after is None else min(total, stop_after)
    iteration, skipped_all, train_seconds = train_iterations(ddp, optimizer, scaler, data, cfg, device, info,
                                                             logger, start, end, skipped, on_iteration, run)
    if iteration < total:
        logger.close()
        return {"stopped_at": iteration}

    final = _precise(model, data.dataset, cfg, device, info, data.epoch_of_step(iteration))
    if info.is_main:
        _atomic_save_weights(final, out / "model_final.safetensors", cfg)
    report = evaluate(final, cfg, device=device, info=info)
    report["train_seconds"] = train_seconds
    report["skipped_videos_train"] = len(skipped_all)  # the loop united them at its last iteration
    logger.log(iteration, _scalars(report), prefix="test")
    logger.close()
    if info.is_main:
        _write_json(report, out / "test_metrics.json")
    barrier()
    return report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int) -> int:
    """The seed of the random stream (dropout) of process ``rank`` > 0: distinct for every process and seed.
    (Process 0 keeps the stream the model's initialisation left, as a single-process run does.)"""
    return (seed + 1_000_003 * rank) % 2 ** 63


def _training_model(cfg: Mapping[str, Any], device: torch.device, info: DistInfo) -> nn.Module:
    """The config's model on ``device``, its BN synchronised over the processes with ``train.sync_bn``."""
    model = build_model(cfg).to(device)
    if cfg["train"]["sync_bn"] and device.type != "cuda":
        raise ValueError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm runs only on GPU); on CPU "
                         "processes (gloo) leave it false and each process keeps its own BN statistics")
    if cfg["train"]["sync_bn"] and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: no autocast).

    "bf16": bfloat16, float32's range with 8 significant bits: no loss scaling needed. "fp16": float16, with a
    GradScaler (its range ends at 65504, small gradients underflow without scaling). true: bfloat16 where the
    device computes it (CPUs, CUDA GPUs from Ampere on), float16 otherwise. The non-local blocks' pairwise step
    follows its own policy inside autocast (:mod:`nonlocalnet.layers.pairwise`).
    """
    if amp is False:
        return None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16_ok:
        raise ValueError(f"train.amp=bf16: this GPU ({torch.cuda.get_device_name(device)}) does not compute "
                         f"bfloat16; use fp16 (or true, which picks it)")
    if amp == "fp16" or (amp is True and not bf16_ok):
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, amp: bool | str):
    dtype = amp_dtype(device, amp)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _grad_scaler(device: torch.device, amp: bool | str, info: DistInfo) -> torch.amp.GradScaler:
    """The loss scaler of ``train.amp``, enabled for float16 only (see :func:`amp_dtype`); says which precision
    the run computes in."""
    precision = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    if info.is_main and precision is not None:
        log.info("mixed precision: %s autocast%s", precision, " with a GradScaler" if scaler.is_enabled() else "")
    return scaler


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
        raise ValueError(f"the training set has {len(dataset)} clips, fewer than one global batch of {per_step} "
                         f"(train.batch_size {batch_size} x {info.world_size} processes)")
    sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=True,
                             seed=cfg["seed"])
    return TrainingData(dataset, sampler, len(dataset) // per_step)


def _loader(dataset: Dataset, sampler: ShardedSampler, batch_size: int, workers: int, drop_last: bool,
            seed: int) -> DataLoader:
    # the loader's own generator keeps worker seeding from consuming the global RNG (dropout's), so a resumed
    # run draws the same dropout masks as an uninterrupted one
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=False, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False, collate_fn=collate)


def device_clips(batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch's clips on ``device``, normalised there when the dataset left them uint8.

    Real videos' training and test items hold uint8 clips (``build_dataset(..., normalize=False)``): a quarter
    of the bytes to pass from DataLoader workers and to copy to a GPU, and no float pass over every pixel in the
    loader; ``normalize`` on the device gives the values the dataset would have given (on a CPU exactly; CUDA
    divides by a number through its reciprocal, so there within one unit in the last place).
    """
    clips = batch["clip"].to(device, non_blocking=True)
    return normalize(clips) if clips.dtype == torch.uint8 else clips


def _train_batches(data: TrainingData, cfg: Mapping[str, Any], start: int) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches from ``start`` on, epoch after epoch; item choices depend only on (seed, epoch, index)."""
    batch_size = cfg["train"]["batch_size"]
    iteration = start
    while True:
        epoch, offset = divmod(iteration, data.iterations_per_epoch)
        data.sampler.set_epoch(epoch, start=offset * batch_size)
        if hasattr(data.dataset, "set_epoch"):
            data.dataset.set_epoch(epoch)
        loader = _loader(data.dataset, data.sampler, batch_size, cfg["data"]["workers"], True, cfg["seed"] + epoch)
        for batch in loader:
            check_interrupted()  # the workers' start is where a signal's exception gets swallowed
            yield batch
            iteration += 1
            if iteration % data.iterations_per_epoch == 0:
                break


# --- the training loop -----------------------------------------------------------------------------------------

def train_iterations(ddp: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     data: TrainingData, cfg: Mapping[str, Any], device: torch.device, info: DistInfo,
                     logger: MetricLogger, start: int, end: int, skipped: set[int],
                     on_iteration: Callable[[int], None] | None = None, run: RunIdentity | None = None
                     ) -> tuple[int, list[int], float]:
    """Trains from iteration ``start`` to ``end``: logs every ``train.log_every`` steps, checkpoints every
    ``train.checkpoint_every`` steps, both at ``end`` too, and evaluates (with precise BN) every
    ``train.eval_every`` steps before the last.

    Args:
        ddp: the model, in DistributedDataParallel under several processes.
        skipped: the corrupt videos this process passed over before ``start``; updated in place.
        on_iteration: called with the iteration count after every step.
        run: the run's identity, written into every checkpoint (main process).

    Returns:
        The iteration reached; the corrupt videos all processes passed over in the whole run, as of the last log
        or checkpoint; the seconds it took.
    """
    train_cfg = cfg["train"]
    model = unwrap_model(ddp)
    bar = tqdm(total=end, initial=start, desc=f"train {cfg['model']['name']}", unit="it", dynamic_ncols=True,
               disable=not (info.is_main and cfg["progress"]), leave=False)
    window = _Window()
    skipped_all = sorted(skipped)
    began = time.perf_counter()
    ddp.train()
    iteration = start
    batches = _train_batches(data, cfg, start)
    while iteration < end:
        check_interrupted()  # a SIGINT / SIGTERM whose exception was swallowed (see engine.signals)
        batch = next(batches)
        lr = step_lr(iteration, train_cfg["lr"], train_cfg["lr_steps"], train_cfg["lr_gamma"],
                     train_cfg["warmup_iterations"], train_cfg["warmup_factor"])
        loss, correct = train_one_step(ddp, optimizer, scaler, batch, lr, iteration, cfg, device, info)
        iteration += 1
        window.add(loss, correct, len(batch["clip"]))
        skipped.update(_skipped_ids(batch))
        bar.update(1)
        if on_iteration is not None:
            on_iteration(iteration)

        log_now = iteration % train_cfg["log_every"] == 0 or iteration == end
        checkpoint_now = iteration % train_cfg["checkpoint_every"] == 0 or iteration == end
        if log_now or checkpoint_now:  # every process takes part in the union
            skipped_all = _union(skipped, device)
        if log_now:
            values = window.row(lr, len(skipped_all), time.perf_counter() - began, device, is_multi_label(cfg["data"]))
            logger.log(iteration, values)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}", skipped=values["skipped_videos"])
            window = _Window()
        if checkpoint_now:
            save_training_state(model, optimizer, scaler, iteration, device, Path(cfg["output_dir"]) / "checkpoints",
                                cfg, info, skipped_videos=skipped_all, run=run)
        if train_cfg["eval_every"] and iteration % train_cfg["eval_every"] == 0 and iteration < train_cfg["iterations"]:
            report = evaluate(_precise(model, data.dataset, cfg, device, info, data.epoch_of_step(iteration)),
                              cfg, device=device, info=info)
            logger.log(iteration, _scalars(report), prefix="test")
    bar.close()
    return iteration, skipped_all, time.perf_counter() - began


def train_one_step(ddp: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   batch: Mapping[str, torch.Tensor], lr: float, iteration: int, cfg: Mapping[str, Any],
                   device: torch.device, info: DistInfo) -> tuple[float, int]:
    """One optimiser step on ``batch`` at learning rate ``lr``.

    Returns:
        The batch's loss and its correct top-1 predictions (0 for multi-label data).

    Raises:
        TrainingDiverged: the loss is not finite (in any process).
    """
    train_cfg = cfg["train"]
    multi_label = is_multi_label(cfg["data"])
    set_lr(optimizer, lr)
    clip = device_clips(batch, device)
    labels = batch["label"].to(device, non_blocking=True)
    with _autocast(device, train_cfg["amp"]):
        logits = ddp(clip)
    loss = _loss(logits, labels, multi_label)
    _check_finite(loss, iteration, lr, device, info)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if train_cfg["clip_grad_norm"]:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(unwrap_model(ddp).parameters(), train_cfg["clip_grad_norm"])
    scaler.step(optimizer)
    scaler.update()
    correct = 0 if multi_label else int((logits.argmax(1) == labels).sum())
    return loss.item(), correct


def _loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _check_finite(loss: torch.Tensor, iteration: int, lr: float, device: torch.device, info: DistInfo) -> None:
    """Raises :class:`TrainingDiverged` in every process when the loss is not finite in any of them (a check
    in one process alone would leave the others waiting forever in the next all-reduce)."""
    finite = bool(torch.isfinite(loss))
    if info.enabled:
        flags = all_gather_cat(torch.tensor([0 if finite else 1], device=device)).cpu().tolist()
        bad = [rank for rank, flag in enumerate(flags) if flag]
    else:
        bad = [] if finite else [0]
    if bad:
        where = f" in process(es) {', '.join(map(str, bad))} of {info.world_size}" if info.enabled else ""
        raise TrainingDiverged(f"training loss is not finite at iteration {iteration}{where} (lr {lr:g}); lower "
                               f"train.lr or enable train.clip_grad_norm")


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (raised in every process of the run)."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


@dataclass
class _Window:
    """The training steps since the last log row: their summed loss, correct predictions and clips."""

    loss: float = 0.0
    correct: int = 0
    steps: int = 0
    clips: int = 0

    def add(self, loss: float, correct: int, clips: int) -> None:
        self.loss += loss
        self.correct += correct
        self.steps += 1
        self.clips += clips

    def row(self, lr: float, skipped_videos: int, seconds: float, device: torch.device,
            multi_label: bool) -> dict[str, float]:
        """The log row: mean loss (and top-1 accuracy) over the window and the processes, and the run's state."""
        # reduced over processes on the training device (nccl cannot reduce CPU tensors)
        values = {"loss": float(all_reduce_mean(torch.tensor(self.loss / self.steps, device=device))),
                  "lr": lr, "skipped_videos": skipped_videos, "seconds": seconds}
        if not multi_label:
            values["train_accuracy"] = float(all_reduce_mean(torch.tensor(self.correct / self.clips, device=device)))
        return values


# --- checkpoints and resumption --------------------------------------------------------------------------------

def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        iteration: int, device: torch.device, directory: Path, cfg: Mapping[str, Any],
                        info: DistInfo, skipped_videos: list[int] = (), run: RunIdentity | None = None) -> None:
    """Writes ``checkpoint_<iteration>.pt`` (main process), keeping the last ``train.keep_checkpoints``: what a
    resumed run needs to go on exactly as an uninterrupted one, every process's random state included, and the
    run's identity (``run``), by which a resume tells the directory's own checkpoints from another run's."""
    rng = gather_rng_states(device)  # a collective: every process takes part
    if info.is_main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "iteration": iteration, "skipped_videos": len(skipped_videos),
                 "skipped_video_ids": list(skipped_videos), "config": to_plain(cfg),
                 "world_size": info.world_size,
                 "model_name": cfg["model"]["name"], "model_options": to_plain(cfg["model"]["options"]),
                 "rng": rng[0], "rng_per_rank": rng, "run": run.as_dict() if run else None}
        save_checkpoint(state, directory, iteration, keep=cfg["train"]["keep_checkpoints"])
    barrier()


def load_training_state(state: Mapping[str, Any], source: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                        info: DistInfo) -> tuple[int, set[int]]:
    """Restores what :func:`save_training_state` wrote; returns the iteration to go on from and the corrupt
    videos passed over so far.

    Raises:
        CheckpointError: ``source`` is no training checkpoint, or holds weights of another model.
    """
    for key in ("model", "optimizer", "scaler", "iteration", "rng"):
        if key not in state:
            raise CheckpointError(f"{source} is not a training checkpoint of `nonlocalnet train` (no {key!r}); a "
                                  f"weights file goes to model.pretrained, not --resume")
    if not restore_training_state(state, source, model, optimizer, device, info, scaler=scaler):
        # resumed by more processes than wrote the checkpoint (allowed by --allow-config-change)
        torch.manual_seed(process_seed(int(state["iteration"]) + 1, info.rank))
    return state["iteration"], set(int(v) for v in state.get("skipped_video_ids", []))


def _resume_source(resume: bool | str | os.PathLike, checkpoint_dir: Path
                   ) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """(checkpoint path, its state, unreadable newer checkpoints passed over) for a ``resume`` argument."""
    if not resume:
        return None, None, []
    if resume is True:
        source, state, unreadable = newest_readable_checkpoint(checkpoint_dir)
        for path, reason in unreadable:
            log.warning("%s; %s", reason, f"falling back to {source}" if source else "no older checkpoint reads")
        if source is None and unreadable:
            raise RunDirectoryError(f"--resume: no checkpoint in {checkpoint_dir} can be read "
                                    f"({len(unreadable)} tried); resume from a copy with --resume FILE or start "
                                    f"anew in another output_dir")
        return source, state, unreadable
    source = Path(resume)
    state = load_checkpoint(source)
    newest = latest_checkpoint(checkpoint_dir)
    if newest is not None and checkpoint_iteration(newest) > int(state.get("iteration", 0)) \
            and newest.resolve() != source.resolve():
        raise RunDirectoryError(
            f"--resume {source}: {checkpoint_dir} already holds a later checkpoint ({newest.name}) of a run that "
            f"went further; continuing from an earlier point there would mix two runs. Resume into another "
            f"output_dir")
    return source, state, []


def _check_resumable(state: Mapping[str, Any], source: Path, cfg: Mapping[str, Any], info: DistInfo,
                     allow_change: bool) -> None:
    """Refuses a checkpoint of another config, or of another number of processes, unless ``allow_change``."""
    check_resume_config(state.get("config"), cfg, source, allow_change=allow_change, warn=log.warning)
    if state.get("world_size", info.world_size) != info.world_size and not allow_change:
        raise RunDirectoryError(
            f"--resume {source}: the checkpoint was trained by {state['world_size']} processes, this run has "
            f"{info.world_size}; the global batch and the data order would change. Pass --allow-config-change "
            f"to resume anyway")


def _prepare_directory(out: Path, cfg: Mapping[str, Any], start: int, unreadable: list[tuple[Path, str]],
                       resumed: bool) -> None:
    """Main process, after every check passed: clear debris, set unreadable checkpoints aside, cut the replayed
    steps from the metrics, write the config."""
    for directory in (out, out / "checkpoints"):
        for path in remove_debris(directory):
            log.info("removed %s (left by an interrupted write)", path)
    for path, _ in unreadable:
        log.warning("kept the unreadable checkpoint as %s", set_aside(path))
    total = cfg["train"]["iterations"]
    # rows up to the checkpoint stay; the final evaluation is redone when resuming a finished run
    dropped = truncate_jsonl(out / "metrics.jsonl",
                             lambda row: row.get("step", 0) < start or (row.get("step") == start and not (
                                 start >= total and row.get("split") == "test")))
    if dropped and resumed:
        log.info("metrics.jsonl: dropped %d row(s) logged after iteration %d (replayed now)", dropped, start)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")


# --- precise BN ------------------------------------------------------------------------------------------------

def _precise(model: nn.Module, dataset: Dataset, cfg: Mapping[str, Any], device: torch.device,
             info: DistInfo | None = None, epoch: int | None = None) -> nn.Module:
    """A copy of the model with precise BN statistics from training batches (the model itself is untouched).

    Each process reads its own shard of the batches; the statistics are then averaged over the processes.
    ``epoch`` fixes which epoch's items are read (datasets that draw new items per epoch): the epoch of the last
    training step, so that a run resumed from its final checkpoint, whose loop never set the dataset's epoch,
    measures what the uninterrupted run measured. None keeps the dataset's current epoch.
    """
    info = info or DistInfo()
    final = copy.deepcopy(unwrap_model(model))
    n = cfg["train"]["precise_bn_batches"]
    if n > 0:
        if epoch is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        rng = torch.get_rng_state()  # the training run's dropout stream must not depend on evaluations
        sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=True,
                                 seed=cfg["seed"] + 7919)
        loader = _loader(dataset, sampler, cfg["train"]["batch_size"], cfg["data"]["workers"], True, cfg["seed"])
        with _autocast(device, cfg["train"]["amp"]):
            update_bn_stats(final, (device_clips(batch, device) for batch in loader), n)
        torch.set_rng_state(rng)
    return final


# --- evaluation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, cfg: Mapping[str, Any], *, device: torch.device | None = None,
             info: DistInfo | None = None, dataset: Dataset | None = None) -> dict[str, Any]:
    """Scores every test view, averages the views of each video and computes the metrics.

    Single-label: softmax scores, top-1 / top-5, per-class accuracy, confusion matrix. Multi-label (Charades):
    sigmoid scores and mAP. With ``test.fully_convolutional`` the network's classifier runs at every res5 position
    and the position scores are averaged (the paper's test).
    """
    device = device or next(model.parameters()).device
    info = info or DistInfo()
    dataset = dataset or build_dataset(cfg["data"], "test", cfg["seed"], normalize=False)
    multi_label = is_multi_label(cfg["data"])
    net = unwrap_model(model)
    fully_conv = bool(cfg["test"]["fully_convolutional"])
    previous = getattr(net, "fully_convolutional", None)
    previous_activation = getattr(net, "score_activation", None)
    if fully_conv:
        if previous is None:
            raise ValueError(f"test.fully_convolutional: {type(net).__name__} has no fully-convolutional mode")
        net.fully_convolutional = True
        net.score_activation = "sigmoid" if multi_label else "softmax"
    was_training = net.training
    net.eval()
    sampler = ShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=False, pad=False)
    loader = _loader(dataset, sampler, cfg["test"]["batch_size"], cfg["data"]["workers"], False, cfg["seed"])
    all_scores, all_videos, all_labels, skipped = [], [], [], set()
    for batch in tqdm(loader, desc="test", unit="batch", leave=False, dynamic_ncols=True,
                      disable=not (info.is_main and cfg["progress"])):
        with _autocast(device, cfg["train"]["amp"]):
            out = net(device_clips(batch, device))
        out = out.float()
        if not fully_conv:
            out = out.sigmoid() if multi_label else out.softmax(dim=1)
        all_scores.append(out.cpu())
        all_videos.append(batch["video"])
        all_labels.append(batch["label"])
        skipped.update(_skipped_ids(batch))
    net.train(was_training)
    if fully_conv:
        net.fully_convolutional = previous
        net.score_activation = previous_activation
    scores = all_gather_cat(torch.cat(all_scores).to(device)).cpu()
    videos = all_gather_cat(torch.cat(all_videos).to(device)).cpu()
    labels = all_gather_cat(torch.cat(all_labels).to(device)).cpu()
    skipped = len(_union(skipped, device))
    report = M.views_report(scores, videos, labels, cfg["data"]["num_classes"], multi_label)
    report["skipped_videos"] = skipped
    return report


def test(cfg: Mapping[str, Any], checkpoint: str | os.PathLike | None = None,
         output: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluates the config's model with weights from ``checkpoint`` (default: the run's model_final)."""
    device = resolve_device(cfg["device"])
    info = init_distributed(device)
    path = Path(checkpoint or cfg["test"]["checkpoint"] or Path(cfg["output_dir"]) / "model_final.safetensors")
    try:  # the file's recorded options (a converted zoo network's, say), the config's on top
        model = load_model(path, cfg["model"]["name"], context=f" with data.num_classes={cfg['data']['num_classes']}",
                           **model_options(cfg))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if cfg["train"]["freeze_bn"]:
        model = freeze_batchnorm(model, exclude=(NonLocalBlock,))
    model.to(device)
    report = evaluate(model, cfg, device=device, info=info)
    report["checkpoint"] = os.fspath(path)
    if info.is_main:
        _write_json(report, Path(output) if output else Path(cfg["output_dir"]) / "test_metrics.json")
    return report


# --- small helpers ---------------------------------------------------------------------------------------------

def _skipped_ids(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The corrupt videos a batch's items passed over (datasets without ``skipped_ids`` have none)."""
    ids = batch.get("skipped_ids")
    return [] if ids is None else ids[ids >= 0].tolist()


def _union(ids: set[int], device: torch.device) -> list[int]:
    """The union of every process's set of video ids, sorted."""
    mine = torch.tensor(sorted(ids), dtype=torch.int64, device=device)
    return sorted(set(all_gather_cat(mine).cpu().tolist()))


def _scalars(report: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not (isinstance(v, float) and math.isnan(v))}


def _write_json(data: Any, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def _atomic_save_weights(model: nn.Module, path: Path, cfg: Mapping[str, Any]) -> None:
    # the metadata `nonlocalnet visualize` (nonlocalnet.viz.load_model) reads to rebuild the model
    with atomic_path(path) as tmp:
        save_weights(model, tmp, metadata={"model": cfg["model"]["name"],
                                           "model_options": json.dumps(cfg["model"]["options"])})
