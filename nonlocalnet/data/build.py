"""Datasets from the ``data`` section of a run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from .synthetic import LongRangeShapes
from .video_dataset import VideoListDataset


def build_dataset(data: Mapping[str, Any], split: str, seed: int = 0, *, normalize: bool = True) -> Dataset:
    """The training ("train") or evaluation ("test") dataset a config describes.

    Args:
        data: the config's ``data`` section.
        split: "train" or "test".
        seed: the run's seed (the built-in data's clips and the training clips' random choices).
        normalize: False: real videos' items hold uint8 clips, to normalise on the device (the built-in data's
            clips are float either way).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if data["type"] == "synthetic":
        return LongRangeShapes(
            data["train_size"] if split == "train" else data["test_size"],
            split=split,
            frames=data["frames"],
            image_size=data["image_size"],
            num_classes=data["num_classes"],
            seed=seed,
        )
    return VideoListDataset(
        data["train_list"] if split == "train" else data["test_list"],
        data["root"],
        split=split,
        num_classes=data["num_classes"],
        multi_label=data["type"] == "charades",
        frames=data["frames"],
        sampling_rate=data["sampling_rate"],
        train_scale=tuple(data["train_scale"]),
        crop_size=data["crop_size"],
        test_scale=data["test_scale"],
        test_clips=data["test_clips"],
        test_crops=data["test_crops"],
        seed=seed,
        skip_missing=data["skip_missing"],
        decoder=data["decoder"],
        normalize=normalize,
    )


def is_multi_label(data: Mapping[str, Any]) -> bool:
    return data["type"] == "charades"
