"""Video data: the built-in long-range dataset, Kinetics / Charades lists decoded with PyAV, the transforms."""

from __future__ import annotations

from .build import build_dataset, is_multi_label
from .collate import collate
from .decode_errors import VideoDecodeError
from .sampler import ShardedSampler
from .synthetic import LongRangeShapes
from .video_dataset import VideoListDataset
from .video_list import read_video_list

__all__ = [
    "LongRangeShapes",
    "ShardedSampler",
    "VideoDecodeError",
    "VideoListDataset",
    "build_dataset",
    "collate",
    "is_multi_label",
    "read_video_list",
]
