"""``nonlocalnet`` with faults injected, for tests/test_faults.py (run under torchrun: ``torchrun ... _fault_runner.py
train ...``).

NONLOCALNET_FAULT_KILL_WRITE=N   rank 0 writes half of checkpoint N, then SIGKILLs the whole job (torchrun,
                                 every rank, every DataLoader worker): a power cut mid-write.
NONLOCALNET_FAULT_NAN=R:N        process R's training loss is NaN at its N-th step (1-based).
NONLOCALNET_DUMP_FINAL=DIR       every process saves the weights it evaluates as DIR/rank<R>.pt (the last
                                 ones written are the final weights), to compare the processes' copies.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

import nonlocalnet.engine.trainer as trainer
from nonlocalnet.cli import main


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each worker in its own session, so no process group holds
    the whole job)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_job(root: int) -> None:
    """SIGKILL ``root`` and everything below it at once: the launcher, every rank, every DataLoader worker."""
    for pid in [root, *descendants(root)]:
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_during_write(iteration: int) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == iteration and hasattr(f, "write"):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            kill_job(os.getppid())  # the torchrun agent, the other ranks, the loader workers
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _nan_at(rank: int, step: int) -> None:
    real_loss = trainer._loss
    calls = [0]

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        calls[0] += 1
        if int(os.environ.get("RANK", 0)) == rank and calls[0] == step:
            return value * float("nan")
        return value

    trainer._loss = loss


def _dump_final(directory: str) -> None:
    real_precise = trainer.precise_bn_copy

    def precise(*args, **kwargs):
        model = real_precise(*args, **kwargs)
        torch.save(model.state_dict(), os.path.join(directory, f"rank{os.environ.get('RANK', 0)}.pt"))
        return model

    trainer.precise_bn_copy = precise


if __name__ == "__main__":
    if os.environ.get("NONLOCALNET_DUMP_FINAL"):
        _dump_final(os.environ["NONLOCALNET_DUMP_FINAL"])
    if os.environ.get("NONLOCALNET_FAULT_KILL_WRITE"):
        _kill_during_write(int(os.environ["NONLOCALNET_FAULT_KILL_WRITE"]))
    if os.environ.get("NONLOCALNET_FAULT_NAN"):
        rank, step = os.environ["NONLOCALNET_FAULT_NAN"].split(":")
        _nan_at(int(rank), int(step))
    sys.exit(main(sys.argv[1:]))
