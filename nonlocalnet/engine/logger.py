"""Metrics to a JSON-lines file and TensorBoard (main process only)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


class MetricLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors the numbers to TensorBoard.

    Args:
        directory: the run directory.
        enabled: False in non-main processes (then every call is a no-op).
        tensorboard: also write TensorBoard event files under ``directory/tensorboard``.
        purge_step: a resumed run's first step: TensorBoard hides the events an interrupted attempt logged from
            this step on (``metrics.jsonl`` is cut by the trainer itself).
    """

    def __init__(self, directory: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(directory) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(os.fspath(Path(directory) / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, values: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
