"""Checkpoints and resumption for the training loop (:mod:`.loop`): what a checkpoint holds, which one a resume
reads, what it refuses, and how the run folder is made ready for the run that goes on."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    checkpoint_iteration,
    latest_checkpoint,
    load_checkpoint,
    newest_readable_checkpoint,
    remove_debris,
    restore_training_state,
    save_checkpoint,
    set_aside,
)
from .config import save_config, to_plain
from .distributed import barrier, gather_rng_states, unwrap_model
from .rundir import RunDirectoryError, RunIdentity, check_resume_config, record_run, truncate_jsonl

if TYPE_CHECKING:
    from .loop import RunContext

log = logging.getLogger("nonlocalnet")


def process_seed(seed: int, rank: int) -> int:
    """The seed of the random stream (dropout) of process ``rank`` > 0: distinct for every process and seed.
    (Process 0 keeps the stream the model's initialisation left, as a single-process run does.)"""
    return (seed + 1_000_003 * rank) % 2**63


def save_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    iteration: int,
    ctx: RunContext,
    keep: int,
    extra: Mapping[str, Any],
    skipped: list[int] = (),
    run: RunIdentity | None = None,
) -> None:
    """Writes ``checkpoints/checkpoint_<iteration>.pt`` (main process), keeping the last ``keep``: what a resumed
    run needs to go on exactly as an uninterrupted one, every process's random state included, and the run's
    identity (``run``), by which a resume tells the folder's own checkpoints from another run's."""
    rng = gather_rng_states(ctx.device)  # a collective: every process takes part
    if ctx.info.is_main:
        state = {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iteration": iteration,
            "skipped_videos": len(skipped),
            "skipped_video_ids": list(skipped),
            "config": to_plain(ctx.cfg),
            "world_size": ctx.info.world_size,
            **extra,
            "rng": rng[0],
            "rng_per_rank": rng,
            "run": run.as_dict() if run else None,
        }
        save_checkpoint(state, ctx.out / "checkpoints", iteration, keep=keep)
    barrier()


def load_training_state(
    state: Mapping[str, Any],
    source: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx: RunContext,
) -> tuple[int, set[int]]:
    """Restores what :func:`save_training_state` wrote; returns the iteration to go on from and the unreadable
    items passed over so far.

    Raises:
        CheckpointError: ``source`` is no training checkpoint, or holds weights of another model.
    """
    for key in ("model", "optimizer", "scaler", "iteration", "rng"):
        if key not in state:
            raise CheckpointError(
                f"{source} is not a training checkpoint of `nonlocalnet train` (no {key!r}); a "
                f"weights file goes to model.pretrained, not --resume"
            )
    if not restore_training_state(state, source, model, optimizer, ctx.device, ctx.info, scaler=scaler):
        # resumed by more processes than wrote the checkpoint (allowed by --allow-config-change)
        torch.manual_seed(process_seed(int(state["iteration"]) + 1, ctx.info.rank))
    return state["iteration"], set(int(v) for v in state.get("skipped_video_ids", []))


def resume_source(
    resume: bool | str | os.PathLike, checkpoint_dir: Path
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """(checkpoint path, its state, unreadable newer checkpoints passed over) for a ``resume`` argument."""
    if not resume:
        return None, None, []
    if resume is True:
        source, state, unreadable = newest_readable_checkpoint(checkpoint_dir)
        for _path, reason in unreadable:
            log.warning("%s; %s", reason, f"falling back to {source}" if source else "no older checkpoint reads")
        if source is None and unreadable:
            raise RunDirectoryError(
                f"--resume: no checkpoint in {checkpoint_dir} can be read "
                f"({len(unreadable)} tried); resume from a copy with --resume FILE or start "
                f"anew in another output_dir"
            )
        return source, state, unreadable
    source = Path(resume)
    state = load_checkpoint(source)
    newest = latest_checkpoint(checkpoint_dir)
    if (
        newest is not None
        and checkpoint_iteration(newest) > int(state.get("iteration", 0))
        and newest.resolve() != source.resolve()
    ):
        raise RunDirectoryError(
            f"--resume {source}: {checkpoint_dir} already holds a later checkpoint ({newest.name}) of a run that "
            f"went further; continuing from an earlier point there would mix two runs. Resume into another "
            f"output_dir"
        )
    return source, state, []


def check_resumable(
    state: Mapping[str, Any], source: Path, ctx: RunContext, allowed: tuple[str, ...], allow_change: bool
) -> None:
    """Refuses a checkpoint of another config, or of another number of processes, unless ``allow_change``."""
    check_resume_config(
        state.get("config"), ctx.cfg, source, allow_change=allow_change, warn=log.warning, allowed=allowed
    )
    world_size = ctx.info.world_size
    if state.get("world_size", world_size) != world_size and not allow_change:
        raise RunDirectoryError(
            f"--resume {source}: the checkpoint was trained by {state['world_size']} processes, this run has "
            f"{world_size}; the global batch and the data order would change. Pass --allow-config-change "
            f"to resume anyway"
        )


def prepare_directory(
    ctx: RunContext, total: int, start: int, unreadable: list[tuple[Path, str]], resumed: bool, run: RunIdentity
) -> None:
    """Main process, after every check passed: clear debris, set unreadable checkpoints aside, cut the replayed
    steps from the metrics, write the config and the run's identity (``run.json``)."""
    out = ctx.out
    for directory in (out, out / "checkpoints"):
        for path in remove_debris(directory):
            log.info("removed %s (left by an interrupted write)", path)
    for path, _ in unreadable:
        log.warning("kept the unreadable checkpoint as %s", set_aside(path))
    # rows up to the checkpoint stay; the final evaluation is redone when resuming a finished run
    dropped = truncate_jsonl(
        out / "metrics.jsonl",
        lambda row: (
            row.get("step", 0) < start
            or (row.get("step") == start and not (start >= total and row.get("split") == "test"))
        ),
    )
    if dropped and resumed:
        log.info("metrics.jsonl: dropped %d row(s) logged after iteration %d (replayed now)", dropped, start)
    out.mkdir(parents=True, exist_ok=True)
    save_config(ctx.cfg, out / "config.yaml")
    record_run(out, run)
