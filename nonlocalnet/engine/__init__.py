"""Training and evaluation: configs, the one training loop (:mod:`.loop`) and its video task (:mod:`.trainer`),
testing (:mod:`.evaluation`), checkpoints and resumption, metrics, torchrun plumbing."""

from __future__ import annotations

from .config import ConfigError, load_config, save_config
from .evaluation import evaluate, test
from .trainer import build_model, train

__all__ = ["ConfigError", "build_model", "evaluate", "load_config", "save_config", "test", "train"]
