"""``nonlocalnet convert-caffe2 in.pkl out.safetensors``: ``nonlocalnet convert --from caffe2`` (kept as an alias)."""

from __future__ import annotations

import argparse

from .convert import add_arguments as _add_arguments
from .convert import run  # noqa: F401  (the alias runs convert's run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser, source_format="caffe2")
