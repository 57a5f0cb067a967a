"""Pure tensor functions for video clips: frame-index sampling, short-side scaling, crops, flip, normalisation.

Clips are ``(C, T, H, W)`` tensors (channels first, as the networks take them). Every random choice is drawn
from a ``torch.Generator`` passed in, never from the global RNG, so a dataset can make each item reproducible
from ``(seed, epoch, index)``.

The recipe of the paper (Wang et al., 2018, section 4 and the official Caffe2 repository):

* a training clip of ``frames`` frames taken every ``sampling_rate`` frames from a window of
  ``frames * sampling_rate`` consecutive frames at a random position (32×2: 64 consecutive frames, every other
  one kept; 8×8: 64 frames, one in eight kept);
* at test time K clips whose windows are evenly spaced from the start to the end of the video;
* short side scaled to a random integer in [256, 320], a random 224×224 crop and a random horizontal flip in
  training; short side 256 and 3 crops along the long side (or the full frame) at test time;
* RGB in 0-255 normalised with ``(x - 114.75) / 57.375``.

Frames past the end of a short video repeat the last frame (indices are clamped, as PySlowFast does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MEAN",
    "STD",
    "train_clip_indices",
    "uniform_clip_indices",
    "clip_starts",
    "tiling_clip_indices",
    "random_short_side",
    "short_side_resize",
    "crop",
    "random_crop",
    "spatial_crop_offset",
    "spatial_crop",
    "horizontal_flip",
    "random_horizontal_flip",
    "normalize",
    "to_channels_first",
]

# the official code feeds RGB in 0-255 as (x - 114.75) / 57.375
MEAN = 114.75
STD = 57.375


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")


def train_clip_indices(num_frames: int, frames: int, sampling_rate: int, generator: torch.Generator) -> Tensor:
    """Frame indices of one training clip at a random temporal position.

    The clip's window is ``frames * sampling_rate`` consecutive frames starting at ``start``, drawn uniformly in
    ``[0, max(num_frames - frames * sampling_rate, 0)]``; the clip keeps frames ``start + k * sampling_rate``,
    k = 0..frames-1. Indices past the end of a short video are clamped to its last frame.

    Args:
        num_frames: frames in the video (at least 1).
        frames: frames in the clip (T).
        sampling_rate: keep one frame every this many.
        generator: source of the random start.

    Returns:
        (frames,) int64 indices, non-decreasing, in ``[0, num_frames - 1]``.
    """
    _check_positive(num_frames=num_frames, frames=frames, sampling_rate=sampling_rate)
    delta = max(num_frames - frames * sampling_rate, 0)
    start = int(torch.randint(delta + 1, (1,), generator=generator))
    return _clip_from_start(start, num_frames, frames, sampling_rate)


def uniform_clip_indices(num_frames: int, frames: int, sampling_rate: int, clip: int, num_clips: int) -> Tensor:
    """Frame indices of test clip ``clip`` of ``num_clips`` evenly spaced in time.

    The windows of the K clips start at ``round(k * delta / (K - 1))`` with
    ``delta = max(num_frames - frames * sampling_rate, 0)``, so the first clip starts at frame 0 and the last
    ends at the last frame; a single clip (K = 1) is centred (start ``ceil(delta / 2)``). Indices past the end
    of a short video are clamped to its last frame.

    Args:
        num_frames: frames in the video (at least 1).
        frames: frames in the clip (T).
        sampling_rate: keep one frame every this many.
        clip: which clip, 0..num_clips-1.
        num_clips: K, the number of clips per video.

    Returns:
        (frames,) int64 indices.
    """
    _check_positive(num_frames=num_frames, frames=frames, sampling_rate=sampling_rate, num_clips=num_clips)
    if not 0 <= clip < num_clips:
        raise ValueError(f"clip must be in [0, {num_clips - 1}]; got {clip}")
    delta = max(num_frames - frames * sampling_rate, 0)
    start = _even_offset(delta, clip, num_clips)
    return _clip_from_start(start, num_frames, frames, sampling_rate)


def clip_starts(
    num_frames: int, clip_frames: int, frame_stride: int = 1, step: int | None = None, *, allow_short: bool = False
) -> list[int]:
    """First frames of the clips that tile a video (the feature bank's and ``nonlocalnet extract``'s clips).

    A clip takes ``clip_frames`` frames, one every ``frame_stride``: it spans ``(clip_frames - 1) * frame_stride + 1``
    frames of the video; clips start every ``step`` frames from frame 0 as long as they fit.

    Args:
        num_frames: frames in the video.
        clip_frames: frames per clip (after temporal subsampling).
        frame_stride: take every ``frame_stride``-th frame.
        step: frames between consecutive clip starts; default = one clip's span (clips side by side).
        allow_short: a video shorter than one clip gives one clip at frame 0 (its indices past the end repeat
            the last frame, see :func:`tiling_clip_indices`) instead of an error.

    Raises:
        ValueError: the video is shorter than one clip (unless ``allow_short``), or a non-positive argument.
    """
    if clip_frames < 1 or frame_stride < 1:
        raise ValueError(f"clip_frames and frame_stride must be positive; got {clip_frames}, {frame_stride}")
    span = (clip_frames - 1) * frame_stride + 1
    step = span if step is None else step
    if step < 1:
        raise ValueError(f"step must be positive; got {step}")
    if num_frames < span:
        if allow_short and num_frames >= 1:
            return [0]
        raise ValueError(
            f"a video of {num_frames} frames is shorter than one clip ({clip_frames} frames with "
            f"stride {frame_stride} span {span})"
        )
    return list(range(0, num_frames - span + 1, step))


def tiling_clip_indices(num_frames: int, starts: list[int], clip_frames: int, frame_stride: int) -> Tensor:
    """The frame indices of the clips starting at ``starts``, clip after clip: (len(starts) * clip_frames,) int64,
    indices past the end of the video clamped to its last frame."""
    offsets = torch.arange(clip_frames, dtype=torch.int64) * frame_stride  # (T,)
    index = torch.tensor(starts, dtype=torch.int64)[:, None] + offsets  # (L, 1) + (T,) -> (L, T)
    return index.clamp_(max=num_frames - 1).flatten()  # (L, T) -> (L * T,)


def _clip_from_start(start: int, num_frames: int, frames: int, sampling_rate: int) -> Tensor:
    index = start + torch.arange(frames, dtype=torch.int64) * sampling_rate  # (T,)
    return index.clamp_(max=num_frames - 1)


def _even_offset(delta: int, position: int, count: int) -> int:
    """``round(position * delta / (count - 1))`` (halves up), in integers; ``ceil(delta / 2)`` when count is 1."""
    if count == 1:
        return (delta + 1) // 2
    return (2 * delta * position + count - 1) // (2 * (count - 1))


def random_short_side(scale: tuple[int, int], generator: torch.Generator) -> int:
    """A short-side length drawn uniformly among the integers of ``[scale[0], scale[1]]`` (both included)."""
    low, high = scale
    if not 1 <= low <= high:
        raise ValueError(f"scale must be (low, high) with 1 <= low <= high; got {scale}")
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def short_side_resize(clip: Tensor, size: int) -> Tensor:
    """Scale every frame so that its short side is ``size`` pixels, keeping the aspect ratio.

    The long side becomes ``floor(long * size / short)`` (PySlowFast's rule). Bilinear interpolation with
    ``align_corners=False``, anti-aliased (which changes nothing when enlarging and avoids aliasing when
    shrinking large videos). A uint8 clip is scaled in uint8: it trades rounding to the nearest level (within 1
    of the float result) for torch's faster uint8 CPU kernel; any other clip is scaled in float32. The clip is
    returned unchanged when its short side is already ``size``.

    Args:
        clip: (C, T, H, W) clip, uint8 or float.
        size: the new short side.

    Returns:
        (C, T, H', W') clip with ``min(H', W') == size``, uint8 if the input was, else float.
    """
    _check_positive(size=size)
    height, width = clip.shape[-2:]
    if height <= width:
        return resize(clip, size, int(math.floor(width * size / height)))
    return resize(clip, int(math.floor(height * size / width)), size)


def resize(clip: Tensor, height: int, width: int) -> Tensor:
    """Every frame scaled to ``height`` x ``width``: bilinear, ``align_corners=False``, anti-aliased, in uint8 for
    a uint8 clip (see :func:`short_side_resize`), else in float32; unchanged if it has that size already."""
    _check_positive(height=height, width=width)
    if clip.dtype != torch.uint8 and not clip.is_floating_point():
        clip = clip.float()
    if tuple(clip.shape[-2:]) == (height, width):
        return clip
    # (C, T, H, W) -> (T, C, H, W); decoded frames (T, H, W, C) permuted to (C, T, H, W) are channels-last here
    frames = clip.transpose(0, 1)
    if clip.dtype == torch.uint8:
        frames = frames.contiguous(memory_format=torch.channels_last)  # the fast uint8 kernel's layout
    frames = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return frames.transpose(0, 1)  # (T, C, H', W') -> (C, T, H', W')


def crop(clip: Tensor, top: int, left: int, size: int) -> Tensor:
    """The ``size``×``size`` square of every frame whose top-left corner is ``(top, left)``."""
    height, width = clip.shape[-2:]
    if size > height or size > width:
        raise ValueError(f"crop of {size}x{size} does not fit in frames of {height}x{width}")
    if not (0 <= top <= height - size and 0 <= left <= width - size):
        raise ValueError(f"crop at ({top}, {left}) of size {size} leaves frames of {height}x{width}")
    return clip[..., top : top + size, left : left + size]


def random_crop(clip: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A ``size``×``size`` crop at a uniformly random position, the same for every frame."""
    height, width = clip.shape[-2:]
    if size > height or size > width:
        raise ValueError(f"crop of {size}x{size} does not fit in frames of {height}x{width}")
    top = int(torch.randint(height - size + 1, (1,), generator=generator))
    left = int(torch.randint(width - size + 1, (1,), generator=generator))
    return crop(clip, top, left, size)


def random_scaled_crop(
    height: int, width: int, scale: tuple[int, int], size: int, generator: torch.Generator, p: float = 0.5
) -> tuple[slice, slice]:
    """A training crop, as the region of a ``height`` x ``width`` frame that becomes it.

    The paper's augmentation scales the frame to a random short side ``s`` in ``scale``, takes a random
    ``size``² square and mirrors it with probability ``p``. Here the square is chosen in the frame's own pixels,
    a square of side ``round(size * short / s)`` (at most the short side) at a uniformly random position, so that
    only it is converted and scaled to ``size``² (:func:`resize`): the same distribution of crops, up to the
    rounding of the side to whole pixels (an error in scale under half a pixel in ``size * short / s``). The
    draws (short side, top, left, mirror) come from ``generator`` in that order.

    Returns:
        (rows, columns) slices; a mirrored crop's columns run backwards (step -1).
    """
    _check_positive(height=height, width=width, size=size)
    short = min(height, width)
    side = min(short, max(1, round(size * short / random_short_side(scale, generator))))
    top = int(torch.randint(height - side + 1, (1,), generator=generator))
    left = int(torch.randint(width - side + 1, (1,), generator=generator))
    columns = slice(left, left + side)
    if float(torch.rand((1,), generator=generator)) < p:
        columns = slice(left + side - 1, left - 1 if left else None, -1)
    return slice(top, top + side), columns


def spatial_crop_offset(height: int, width: int, size: int, position: int, num_crops: int) -> tuple[int, int]:
    """Top-left corner of test crop ``position`` of ``num_crops`` evenly spaced along the long side.

    With 3 crops this gives left / centre / right for landscape frames and top / centre / bottom for portrait
    ones (PySlowFast's ``uniform_crop``); along the short side the crop is centred. One crop is the centre crop.
    A centre offset ``(L - size) / 2`` that is not an integer is rounded up.

    Args:
        height: frame height.
        width: frame width.
        size: crop side.
        position: which crop, 0..num_crops-1 (0 is left / top).
        num_crops: number of crops per clip.

    Returns:
        (top, left).
    """
    _check_positive(size=size, num_crops=num_crops)
    if not 0 <= position < num_crops:
        raise ValueError(f"position must be in [0, {num_crops - 1}]; got {position}")
    if size > height or size > width:
        raise ValueError(f"crop of {size}x{size} does not fit in frames of {height}x{width}")
    if height > width:
        return _even_offset(height - size, position, num_crops), _even_offset(width - size, 0, 1)
    return _even_offset(height - size, 0, 1), _even_offset(width - size, position, num_crops)


def spatial_crop(clip: Tensor, size: int, position: int, num_crops: int) -> Tensor:
    """Test crop ``position`` of ``num_crops`` (see :func:`spatial_crop_offset`)."""
    top, left = spatial_crop_offset(clip.shape[-2], clip.shape[-1], size, position, num_crops)
    return crop(clip, top, left, size)


def horizontal_flip(clip: Tensor) -> Tensor:
    """Mirror every frame left-right."""
    return clip.flip(-1)


def random_horizontal_flip(clip: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror every frame left-right with probability ``p`` (one draw for the whole clip)."""
    if float(torch.rand((1,), generator=generator)) < p:
        return horizontal_flip(clip)
    return clip


def normalize(clip: Tensor, mean: float = MEAN, std: float = STD) -> Tensor:
    """``(x - mean) / std`` of a 0-255 clip, as a contiguous float32 tensor (the paper's constants by default).

    One float32 allocation, whatever the clip's layout: the conversion writes it in contiguous order, the
    subtraction and the division run in place (the same operations in the same order as ``(x.float() - mean) /
    std``, so the same values); a clip of 32 frames at 224² is 19 MB a copy.
    """
    out = torch.empty(clip.shape, dtype=torch.float32, device=clip.device)
    return out.copy_(clip).sub_(mean).div_(std)


def frames_last(clip: Tensor) -> Tensor:
    """A (C, T, H, W) clip whose memory runs (T, H, W, C), densely: the layout decoded and scaled frames have, so
    that a batch of them stacks as plain copies (:func:`nonlocalnet.data.collate.collate`). A view when the clip
    is laid out so already (a scaled training crop), else one copy (a test view cropped from wider frames)."""
    return clip.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def to_channels_first(frames: Tensor) -> Tensor:
    """Decoded frames (T, H, W, C) -> clip (C, T, H, W)."""
    return frames.permute(3, 0, 1, 2)
