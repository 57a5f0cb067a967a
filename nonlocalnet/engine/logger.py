"""Metrics to a JSON-lines file and TensorBoard (main process only)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MetricLogger:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors the numbers to TensorBoard.

    Args:
        directory: the run directory; None: a run without one (every call is a no-op).
        enabled: False in non-main processes (then every call is a no-op).
        tensorboard: also write TensorBoard event files under ``directory/tensorboard``.
        purge_step: a resumed run's first step: TensorBoard hides the events an interrupted attempt logged from
            this step on (the JSON-lines file is cut by the training loop itself).
        filename: the JSON-lines file in ``directory``.
        run_id: the run's identity (:class:`~nonlocalnet.engine.rundir.RunIdentity`), written into every row as
            ``run`` (None: rows without it).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None,
        enabled: bool = True,
        tensorboard: bool = True,
        purge_step: int | None = None,
        filename: str = "metrics.jsonl",
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled and directory is not None
        self.run_id = run_id
        self.path = Path(directory) / filename if directory is not None else None
        self.writer = None
        if not self.enabled:
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
        """One row ``{"step": step, "split": prefix, **values}``; the numbers also go to TensorBoard."""
        if not self.enabled:
            return
        self.write({"step": step, "split": prefix, **values})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def write(self, record: Mapping[str, Any]) -> None:
        """One row as it is (nothing added, nothing mirrored to TensorBoard)."""
        if not self.enabled:
            return
        if self.run_id is not None:
            record = {**record, "run": self.run_id}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
