"""What the visualiser reads: a trained model from its checkpoint, and one clip from a video file (PyAV)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import transforms
from ..data.transforms import MEAN as PIXEL_MEAN  # the paper's pixel normalisation
from ..data.transforms import STD as PIXEL_STD

__all__ = ["load_model", "read_video", "read_clip", "PIXEL_MEAN", "PIXEL_STD"]


def load_model(
    checkpoint: str | Path,
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict]:
    """Builds a registered model and fills it from a checkpoint (:func:`nonlocalnet.models.load_model`).

    Args:
        checkpoint: a safetensors state dict (its metadata may name the model: "model", and give options as
            JSON: "model_options"), or a torch file holding a state dict or a dict with one under "model" /
            "state_dict" (a training checkpoint; "model_name" / "model_options" entries are used if present).
        name: registered model name; default: the one the checkpoint names.
        overrides: model options on top of the registered ones (and of the checkpoint's).
        num_classes: classifier outputs; default: the checkpoint's classifier size.

    Returns:
        (model in eval mode, {"model": name, "options": the options used}).

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: no model name anywhere, or the file holds no state dict.
        ValueError: the weights do not fit the model (names or shapes).
    """
    from ..models.checkpoints.weights import load_model as load_recorded

    model = load_recorded(checkpoint, name, num_classes=num_classes, **dict(overrides or {}))
    return model, model.nonlocalnet_record


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file: (F, H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be decoded or has no video frames.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode {path}: {err}") from err
    if not frames:
        raise ValueError(f"{path} has no decodable video frames")
    return np.stack(frames)


def read_clip(
    path: str | Path,
    *,
    frames: int,
    sampling_rate: int = 1,
    start: int | None = None,
    size: int | None = None,
    crop: int | None = None,
) -> tuple[np.ndarray, Tensor]:
    """One clip of a video as the model takes it at test time, and the same frames for drawing.

    The frames are scaled and cropped by the test loader's own transforms
    (:func:`~nonlocalnet.data.transforms.short_side_resize` then the centre
    :func:`~nonlocalnet.data.transforms.spatial_crop`), so with ``size`` = the run's ``test_scale`` and ``crop`` =
    its ``crop_size`` the clip is the one-crop test view of the same frames, to the pixel.

    Args:
        path: the video file.
        frames: frames in the clip.
        sampling_rate: keep one frame every this many.
        start: first video frame of the clip; default: the clip is centred in the video. Frames past the end
            repeat the last frame.
        size: scale so that the short side has this many pixels; None keeps the decoded size.
        crop: centre crop of this size (square); None keeps the full frame.

    Returns:
        (frames (T, H, W, 3) uint8 after scaling and cropping, the normalised clip (3, T, H, W)).
    """
    if frames < 1 or sampling_rate < 1:
        raise ValueError(f"frames and sampling_rate must be positive; got {frames}, {sampling_rate}")
    video = read_video(path)
    span = (frames - 1) * sampling_rate + 1
    if start is None:
        start = max(0, (len(video) - span) // 2)
    if not 0 <= start < len(video):
        raise ValueError(f"start frame {start} is outside the video's {len(video)} frames")
    index = np.minimum(np.arange(start, start + span, sampling_rate), len(video) - 1)
    clip = transforms.to_channels_first(torch.from_numpy(video[index]))  # (T, H, W, 3) -> (3, T, H, W) uint8
    if size is not None:
        clip = transforms.short_side_resize(clip, size)
    if crop is not None:
        clip = transforms.spatial_crop(clip, crop, position=0, num_crops=1)
    raw = clip.permute(1, 2, 3, 0).numpy()  # (3, T, H, W) -> (T, H, W, 3)
    return raw, transforms.normalize(clip)
