"""The torchcodec decoder: the frames a clip needs through torchcodec's exact mode (an optional extra, see
:func:`~nonlocalnet.data.decoders.check_decoder`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from .decode_errors import VideoDecodeError, decode_errors
from .regions import Region, region_slices, take


def read_frames_torchcodec(
    path: str | Path, sample: Callable[[int], Tensor], *, seek: bool = True, region: Region | None = None
) -> tuple[np.ndarray, Tensor]:
    """:func:`~nonlocalnet.data.decoders.read_frames` through torchcodec: its exact mode scans the file once, so the
    frame count is the decodable frames' and the seeks land on the key frame before the first needed frame
    (``seek`` is therefore not needed and is ignored)."""
    from torchcodec.decoders import VideoDecoder  # optional: imported where it is used

    with decode_errors(path):
        decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        count = decoder.metadata.num_frames or 0
    if count == 0:
        raise VideoDecodeError(f"{path}: no decodable video frame")
    index = sample(count)
    wanted = sorted(set(index.tolist()))
    with decode_errors(path):
        frames = decoder.get_frames_at(wanted).data.numpy()  # (N, H, W, 3) uint8
    if region is not None:
        frames = take(frames, *region_slices(region, *frames.shape[1:3]))
    position = {frame: k for k, frame in enumerate(wanted)}
    return np.ascontiguousarray(frames[[position[i] for i in index.tolist()]]), index
