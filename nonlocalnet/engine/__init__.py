"""Training and evaluation: configs, the train / test loops, checkpoints, metrics, torchrun plumbing."""
from .config import ConfigError, load_config, save_config
from .trainer import build_model, evaluate, test, train

__all__ = ["ConfigError", "build_model", "evaluate", "load_config", "save_config", "test", "train"]
