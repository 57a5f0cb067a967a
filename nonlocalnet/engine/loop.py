"""One training loop for every task (video classification, detection): the task supplies its model, data, loss and
evaluation (:class:`Task`); the loop owns everything a run guarantees.

One file because it is the one loop: the settings, the run context, the task protocol and the steps are read together,
and splitting them would scatter the guarantees listed below.

    report = train_loop(task, context, resume=True)

What the loop owns, for every task alike: the learning-rate schedule (:func:`~nonlocalnet.engine.optim.step_lr`,
set before every step), the precision policy (:mod:`~nonlocalnet.engine.precision`), the non-finite-loss rule
(:class:`TrainingDiverged` in every process), the run folder (one run per folder, locked while it runs, its identity
in ``run.json``, every checkpoint and log row, resume from the newest readable checkpoint or a named one, a config
change or another run's checkpoint refused, :mod:`~nonlocalnet.engine.rundir`), one config in every process of a
torchrun job, a SIGINT / SIGTERM honoured at every step (:mod:`~nonlocalnet.engine.signals`), the checkpoints
(``checkpoints/checkpoint_<iteration>.pt``, the last ``keep_checkpoints``), ``metrics.jsonl`` and TensorBoard, the
plain log line every ``log_every`` iterations, and the end of a run: ``model_final.safetensors``, the final test,
``test_metrics.json``. Evaluations during training leave training's random stream as it was, so a run's trajectory
does not depend on when it evaluates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..io import write_text_atomic
from .checkpoint import list_checkpoints
from .distributed import DistInfo, all_gather_cat, all_reduce_mean, barrier, check_same_config, unwrap_model
from .logger import MetricLogger
from .optim import set_lr, step_lr
from .precision import autocast, grad_scaler
from .resume import check_resumable, load_training_state, prepare_directory, resume_source, save_training_state
from .rundir import RunIdentity, check_unused, claim_run, lock_run_directory
from .signals import check_interrupted

log = logging.getLogger("nonlocalnet")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know of a task's config, in iterations.

    Attributes:
        iterations: training steps of the whole run.
        lr, lr_steps, lr_gamma, warmup_iterations, warmup_factor: the step schedule of
            :func:`~nonlocalnet.engine.optim.step_lr` (``lr`` at the global batch the run trains with).
        amp: ``train.amp`` (:func:`~nonlocalnet.engine.precision.amp_dtype`).
        clip_grad_norm: clip the gradients' global norm to this (None: no clipping).
        log_every: iterations between log rows and log lines (and one at the last iteration).
        checkpoint_every: iterations between checkpoints (and one at the last iteration).
        keep_checkpoints: how many checkpoints are kept (0: all).
        eval_every: iterations between evaluations before the last iteration (0: only the final test).
        test_at_end: run the final test (and write ``test_metrics.json``) when training ends.
        check_blocks_after: the iteration after which :meth:`Task.check_blocks` looks once whether the non-local
            blocks still sit at the identity or at uniform attention (0: never).
    """

    iterations: int
    lr: float
    lr_steps: tuple[int, ...]
    lr_gamma: float
    warmup_iterations: int
    warmup_factor: float
    amp: bool | str
    clip_grad_norm: float | None
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    test_at_end: bool = True
    check_blocks_after: int = 0

    def lr_at(self, iteration: int) -> float:
        return step_lr(iteration, self.lr, self.lr_steps, self.lr_gamma, self.warmup_iterations, self.warmup_factor)


@dataclass
class RunContext:
    """What travels with a run through every function: its config, device, processes and folder.

    Attributes:
        cfg: the resolved config of the task's schema.
        device: the device this process computes on.
        info: this process's place among the run's processes.
        out: the run folder.
        progress: show progress bars (the log line is printed either way).
        log_lines: print the plain log line every ``log_every`` iterations (main process; off for a caller that
            shows the run's progress itself, as the demo does for its networks trained side by side).
    """

    cfg: Mapping[str, Any]
    device: torch.device
    info: DistInfo = field(default_factory=DistInfo)
    out: Path = Path(".")
    progress: bool = True
    log_lines: bool = True

    def autocast(self):
        """The run's autocast context (``train.amp`` on this device)."""
        return autocast(self.device, self.cfg["train"]["amp"])


class Task(Protocol):
    """What a task supplies to :func:`train_loop`.

    Attributes:
        name: shown on the progress bar ("nl_c2d_r50", "mask resnet_tiny").
        unit: what the items of a batch are, for the log line's speed ("clips", "images").
        resumable_keys: config keys a resumed run may change (:func:`~nonlocalnet.engine.rundir.config_changes`).
        skipped_name: the log row's name for the count of unreadable items passed over (None: the task has none).
        report_sections: the test report holds sections of numbers ({"bbox": {"AP": ...}}), logged as
            ``section/key``.
    """

    name: str
    unit: str
    resumable_keys: tuple[str, ...]
    skipped_name: str | None
    report_sections: bool

    def setup(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Seeds, builds the model (on the device, not wrapped) and its optimizer, and the training data."""

    def settings(self) -> LoopSettings:
        """The loop's settings (after :meth:`setup`: some count iterations of the data)."""

    def batches(self, start: int) -> Iterator[Any]:
        """Training batches from iteration ``start`` on, endlessly; the order depends on the seed and the
        iteration alone, so a resumed run reads what the uninterrupted one read."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        """The model's output on ``batch`` (run inside the loop's autocast)."""

    def loss(self, output: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and the step's other numbers to sum into the log row (outside autocast)."""

    def items(self, batch: Any) -> int:
        """How many items (clips, images) ``batch`` holds."""

    def skipped_ids(self, batch: Any) -> list[int]:
        """The unreadable items ``batch`` passed over."""

    def window_values(self, sums: Mapping[str, float], steps: int, items: int) -> dict[str, float]:
        """The task's values of a log row from the sums of :meth:`loss`'s numbers over ``steps`` steps and
        ``items`` items (reduced over the processes here)."""

    def evaluate(self, model: nn.Module, iteration: int) -> dict[str, Any]:
        """An evaluation during training at ``iteration`` (the weights are not changed; the loop puts the model back
        in training mode and restores the random stream after it)."""

    def final_model(self, model: nn.Module, iteration: int) -> nn.Module:
        """The model the run keeps after its last step (a copy with precise BN statistics, or itself)."""

    def save_weights(self, model: nn.Module, path: Path) -> None:
        """Writes ``model``'s weights as safetensors with what rebuilds it (main process)."""

    def test(self, model: nn.Module) -> dict[str, Any]:
        """The final test's report (every process takes part; JSON-able, NaN where a number is undefined, which
        ``test_metrics.json`` writes as null)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """What the task adds to a checkpoint (the model's name and options, the data's categories)."""

    def check_checkpoint(self, state: Mapping[str, Any], source: Path) -> None:
        """Raises :class:`~nonlocalnet.engine.checkpoint.CheckpointError` for a checkpoint of another task."""

    def check_blocks(self, model: nn.Module, batch: Any, iteration: int) -> None:
        """Warns once if the model's non-local blocks still do nothing (main process; called only where
        :attr:`LoopSettings.check_blocks_after` is set)."""


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite (raised in every process of the run)."""

    all_processes = True  # raised alike by every process of a torchrun job: the CLI says it once


# --- the run ---------------------------------------------------------------------------------------------------


def train_loop(
    task: Task,
    ctx: RunContext,
    resume: bool | str | os.PathLike = False,
    stop_after: int | None = None,
    on_iteration: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains ``task`` in ``ctx.out`` and tests the result; returns the test report (the main process's copy).

    A run folder belongs to one run: the main process locks it for the life of the run (a second run into it
    refuses at once), a fresh start into a folder that holds a run's files refuses, a resume refuses a config other
    than the checkpoint's and another run's checkpoint, and every process of a torchrun job must have been given
    one config. The config and the run's identity (``run.json``, also in every checkpoint and log row) are written
    only once everything has been checked. A SIGINT / SIGTERM stops the run at the next step
    (:mod:`~nonlocalnet.engine.signals`).

    Args:
        task: what is trained.
        ctx: the run's config, device, processes and folder.
        resume: True = continue from the newest readable checkpoint in the run folder (a fresh start if there is
            none); a path = continue from that checkpoint; False = start from scratch in an unused folder.
        stop_after: stop (after checkpointing) at this iteration without testing, as if interrupted.
        on_iteration: called with the iteration count after every training step.
        allow_config_change: resume even when the config differs from the checkpoint's (the changes are logged).

    Returns:
        The final test report plus ``train_seconds``; ``{"stopped_at": iteration}`` when stopped early;
        ``{"finished": True}`` without a final test (``test_at_end`` off).
    """
    check_same_config(ctx.cfg)  # every process of a torchrun job trains one config (the caller started them)
    lock = lock_run_directory(ctx.out) if ctx.info.is_main else None  # one run at a time in the folder
    try:
        return _train(task, ctx, resume, stop_after, on_iteration, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _train(
    task: Task,
    ctx: RunContext,
    resume: bool | str | os.PathLike,
    stop_after: int | None,
    on_iteration: Callable[[int], None] | None,
    allow_config_change: bool,
) -> dict[str, Any]:
    """:func:`train_loop` once the run folder is this run's."""
    out, info = ctx.out, ctx.info
    if not resume:
        check_unused(out)
    source, state, unreadable = resume_source(resume, out / "checkpoints")
    if state is not None:
        task.check_checkpoint(state, source)
        check_resumable(state, source, ctx, task.resumable_keys, allow_config_change)
    run = None
    if info.is_main:  # which run this is: the folder's own, or a new one (refusing to mix two)
        run = claim_run(
            out,
            ctx.cfg,
            state,
            source,
            has_checkpoints=bool(list_checkpoints(out / "checkpoints")),
            explicit=resume is not True and bool(resume),
            allowed=task.resumable_keys,
            say=log.warning,
        )

    model, optimizer = task.setup()
    settings = task.settings()
    scaler = grad_scaler(ctx.device, settings.amp, announce=info.is_main)
    start, skipped = 0, set()  # skipped: the unreadable items this process passed over so far
    if state is not None:
        start, skipped = load_training_state(state, source, model, optimizer, scaler, ctx)

    barrier()  # every process has read what it needs before the main process changes the folder
    if info.is_main:
        prepare_directory(ctx, settings.iterations, start, unreadable, resumed=state is not None, run=run)
        if state is not None:
            log.info("resumed from %s at iteration %d", source, start)
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if info.enabled
        else model
    )
    logger = MetricLogger(
        out, enabled=info.is_main, purge_step=start + 1 if start else None, run_id=run.run_id if run else None
    )
    total = settings.iterations
    if start >= total and info.is_main:
        log.info(
            "the run in %s had finished its %d iterations; its final steps run again from its last checkpoint (%s)",
            out,
            total,
            "final weights and test" if settings.test_at_end else "final weights",
        )
    end = total if stop_after is None else min(total, stop_after)
    loop = _Loop(task, ctx, settings, ddp, optimizer, scaler, logger, skipped, on_iteration, run)
    iteration, train_seconds = loop.run(start, end)
    if iteration < total:
        logger.close()
        return {"stopped_at": iteration}

    final = task.final_model(model, iteration)
    if info.is_main:
        task.save_weights(final, out / "model_final.safetensors")
    if not settings.test_at_end:
        logger.close()
        barrier()
        return {"finished": True, "train_seconds": train_seconds}
    report = task.test(final)
    report["train_seconds"] = train_seconds
    if task.skipped_name is not None:
        report[f"{task.skipped_name}_train"] = len(loop.skipped_all)  # united at the last iteration
    logger.log(iteration, scalars(report, task.report_sections), prefix="test")
    logger.close()
    if info.is_main:
        write_json(report, out / "test_metrics.json")
    barrier()
    return report


@dataclass
class _Window:
    """The training steps since the last log row: their summed loss and task numbers, items and data time."""

    loss: float = 0.0
    steps: int = 0
    items: int = 0
    data_seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    began: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, values: Mapping[str, float], items: int, data_seconds: float) -> None:
        self.loss += loss
        self.steps += 1
        self.items += items
        self.data_seconds += data_seconds
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value


class _Loop:
    """The steps from one iteration to another, with what happens between them (log, checkpoint, evaluation)."""

    def __init__(
        self,
        task: Task,
        ctx: RunContext,
        settings: LoopSettings,
        ddp: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        logger: MetricLogger,
        skipped: set[int],
        on_iteration: Callable[[int], None] | None,
        run: RunIdentity | None,
    ) -> None:
        self.task, self.ctx, self.settings, self.ddp = task, ctx, settings, ddp
        self.optimizer, self.scaler, self.logger = optimizer, scaler, logger
        self.skipped = skipped
        self.skipped_all = sorted(skipped)
        self.on_iteration = on_iteration
        self.run_identity = run  # written into every checkpoint (main process; None in the others)

    def run(self, start: int, end: int) -> tuple[int, float]:
        """Trains from iteration ``start`` to ``end``; returns the iteration reached and the seconds it took."""
        s, ctx, task = self.settings, self.ctx, self.task
        bar = tqdm(
            total=end,
            initial=start,
            desc=f"train {task.name}",
            unit="it",
            dynamic_ncols=True,
            disable=not (ctx.info.is_main and ctx.progress),
            leave=False,
        )
        window = _Window()
        began = time.perf_counter()
        self.ddp.train()
        iteration = start
        batches = task.batches(start)
        while iteration < end:
            check_interrupted()  # a SIGINT / SIGTERM whose exception was swallowed (see engine.signals)
            fetched = time.perf_counter()
            batch = next(batches)
            check_interrupted()  # a task's loader may have started its workers here, where a signal gets swallowed
            data_seconds = time.perf_counter() - fetched
            lr = s.lr_at(iteration)
            loss, values = self.step(batch, lr, iteration)
            iteration += 1
            window.add(loss, values, task.items(batch), data_seconds)
            self.skipped.update(task.skipped_ids(batch))
            bar.update(1)
            if self.on_iteration is not None:
                self.on_iteration(iteration)
            if iteration == s.check_blocks_after and ctx.info.is_main:
                task.check_blocks(unwrap_model(self.ddp), batch, iteration)

            log_now = iteration % s.log_every == 0 or iteration == end
            checkpoint_now = iteration % s.checkpoint_every == 0 or iteration == end
            if log_now or checkpoint_now:  # every process takes part in the union
                self.skipped_all = union(self.skipped, ctx.device)
            if log_now:
                row = self.row(window, lr, time.perf_counter() - began)
                self.logger.log(iteration, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.3g}")
                if ctx.info.is_main and ctx.log_lines:
                    done = iteration - start
                    left = (end - iteration) * (time.perf_counter() - began) / done
                    tqdm.write(
                        log_line(iteration, s.iterations, row, lr, window, task.unit, left, ctx.device), file=sys.stdout
                    )
                    sys.stdout.flush()
                window = _Window()
            if checkpoint_now:
                save_training_state(
                    self.ddp,
                    self.optimizer,
                    self.scaler,
                    iteration,
                    ctx,
                    s.keep_checkpoints,
                    task.checkpoint_extra(),
                    self.skipped_all,
                    self.run_identity,
                )
            if s.eval_every and iteration % s.eval_every == 0 and iteration < s.iterations:
                rng = _rng_state(ctx.device)  # training's random stream must not depend on evaluations
                report = task.evaluate(unwrap_model(self.ddp), iteration)
                _set_rng_state(rng, ctx.device)
                self.ddp.train()
                self.logger.log(iteration, scalars(report, task.report_sections), prefix="test")
        bar.close()
        return iteration, time.perf_counter() - began

    def step(self, batch: Any, lr: float, iteration: int) -> tuple[float, dict[str, float]]:
        """One optimiser step on ``batch`` at learning rate ``lr``; returns its loss and the task's numbers.

        Raises:
            TrainingDiverged: the loss is not finite (in any process).
        """
        set_lr(self.optimizer, lr)
        with self.ctx.autocast():
            output = self.task.forward(self.ddp, batch)
        loss, values = self.task.loss(output, batch)
        check_finite(loss, iteration, lr, self.ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(unwrap_model(self.ddp).parameters(), self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item(), values

    def row(self, window: _Window, lr: float, seconds: float) -> dict[str, float]:
        """The log row: mean loss over the window and the processes, the run's state, the task's values."""
        device = self.ctx.device  # reduced on the training device (nccl cannot reduce CPU tensors)
        values = {"loss": float(all_reduce_mean(torch.tensor(window.loss / window.steps, device=device))), "lr": lr}
        if self.task.skipped_name is not None:
            values[self.task.skipped_name] = len(self.skipped_all)
        values["seconds"] = seconds
        values.update(self.task.window_values(window.sums, window.steps, window.items))
        return values


def log_line(
    iteration: int,
    total: int,
    row: Mapping[str, float],
    lr: float,
    window: _Window,
    unit: str,
    seconds_left: float,
    device: torch.device,
) -> str:
    """The plain text line of a log row: iteration/total, loss, lr, this process's speed over the window, data
    time per step, time left, peak memory."""
    speed = window.items / max(time.perf_counter() - window.began, 1e-9)
    return (
        f"iteration {iteration}/{total}  loss {row['loss']:.4f}  lr {lr:.4g}  {speed:.1f} {unit}/s  "
        f"data {window.data_seconds / window.steps:.3f}s/it  left {timedelta(seconds=round(seconds_left))}  "
        f"memory {_memory(device)}"
    )


def _memory(device: torch.device) -> str:
    """The peak memory of this process: the accelerator's allocations on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    try:
        import resource
    except ImportError:  # not on Windows
        return "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{peak / (2**30 if sys.platform == 'darwin' else 2**20):.2f} GiB"


def check_finite(loss: torch.Tensor, iteration: int, lr: float, ctx: RunContext) -> None:
    """Raises :class:`TrainingDiverged` in every process when the loss is not finite in any of them (a check
    in one process alone would leave the others waiting forever in the next all-reduce)."""
    finite = bool(torch.isfinite(loss))
    info = ctx.info
    if info.enabled:
        flags = all_gather_cat(torch.tensor([0 if finite else 1], device=ctx.device)).cpu().tolist()
        bad = [rank for rank, flag in enumerate(flags) if flag]
    else:
        bad = [] if finite else [0]
    if bad:
        where = f" in process(es) {', '.join(map(str, bad))} of {info.world_size}" if info.enabled else ""
        raise TrainingDiverged(
            f"training loss is not finite at iteration {iteration}{where} (lr {lr:g}); lower "
            f"train.lr or enable train.clip_grad_norm"
        )


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# --- small helpers ---------------------------------------------------------------------------------------------


def union(ids: set[int], device: torch.device) -> list[int]:
    """The union of every process's set of ids, sorted."""
    mine = torch.tensor(sorted(ids), dtype=torch.int64, device=device)
    return sorted(set(all_gather_cat(mine).cpu().tolist()))


def scalars(report: Mapping[str, Any], sections: bool = False, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a report; with ``sections``, those of its sections too, as ``section/key``."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if sections and isinstance(value, Mapping):
            flat.update(scalars(value, True, f"{prefix}{key}/"))
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and not (isinstance(value, float) and not math.isfinite(value))
        ):
            flat[f"{prefix}{key}"] = value
    return flat


def write_json(data: Any, path: Path) -> None:
    """Writes ``data`` as strict JSON (atomically): NaN and infinities, which JSON has not, become null (a class
    with no test video has no accuracy)."""
    write_text_atomic(path, json.dumps(_finite(data), indent=2, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
