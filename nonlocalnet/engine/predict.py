"""Class scores of video files, multi-view as at test time (``nonlocalnet predict``).

Each video is read as the test split reads it (:class:`~nonlocalnet.data.VideoListDataset`: ``test_clips``
clips evenly spaced in time x ``test_crops`` crops of the frames scaled to ``test_scale``), every view is scored
(softmax, or sigmoid for multi-label classifiers; in the fully-convolutional mode, the per-position scores
averaged) and the views of each video are averaged (:func:`~nonlocalnet.engine.metrics.aggregate_views`), as
:func:`~nonlocalnet.engine.trainer.evaluate` does.

A video that cannot be decoded gets no scores: it is reported with the decoder's message, the others are scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import VideoListDataset, collate
from ..data.decode_errors import VideoDecodeError
from ..data.decoders import read_frames
from ..data.inputs import VideoInput
from ..data.transforms import normalize
from ..data.video_dataset import CorruptData
from .metrics import aggregate_views
from .precision import autocast, inference_layout

__all__ = ["VideoScores", "predict_videos", "top_classes"]


@dataclass
class VideoScores:
    """What :func:`predict_videos` made of one video.

    Attributes:
        video: the input.
        scores: (K,) the views' averaged scores; None for a video that could not be decoded.
        views: how many views were averaged.
        error: why the video has no scores (the decoder's message), else None.
    """

    video: VideoInput
    scores: Tensor | None
    views: int
    error: str | None = None


@torch.no_grad()
def predict_videos(
    model: nn.Module,
    videos: Sequence[VideoInput],
    data: Mapping[str, Any],
    *,
    multi_label: bool = False,
    fully_convolutional: bool = False,
    batch_size: int = 8,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    amp: bool | str = "auto",
    memory_format: str = "auto",
) -> list[VideoScores]:
    """Scores every video, its test views averaged.

    Args:
        model: the classifier (switched to eval mode for the pass, its mode restored after).
        videos: the video files.
        data: a config's ``data`` section: ``frames``, ``sampling_rate``, ``test_scale``, ``crop_size`` (None: the
            full frame, which needs ``batch_size`` 1 for videos of different sizes), ``test_clips``,
            ``test_crops``, ``decoder``.
        multi_label: sigmoid scores (Charades); else softmax.
        fully_convolutional: the classifier runs at every res5 position, the positions' scores averaged.
        batch_size: views per forward pass.
        workers: DataLoader worker processes decoding videos.
        device: where the model runs.
        progress: a progress bar (views) on stderr.
        amp, memory_format: the precision and layout the model runs in, as ``train.amp`` and
            ``train.memory_format`` (:mod:`nonlocalnet.engine.precision`; "auto": the faster on this device).

    Returns:
        One :class:`VideoScores` per video, in order.
    """
    device = torch.device(device)
    dataset = VideoListDataset(
        [(str(v.path.resolve()), 0) for v in videos],
        "/",
        split="test",
        num_classes=1,
        frames=data["frames"],
        sampling_rate=data["sampling_rate"],
        crop_size=data["crop_size"],
        test_scale=data["test_scale"],
        test_clips=data["test_clips"],
        test_crops=data["test_crops"],
        decoder=data["decoder"],
        normalize=False,
        max_retries=0,
    )
    per_video = dataset.views_per_video
    net = model
    previous = (getattr(net, "fully_convolutional", None), getattr(net, "score_activation", None))
    if fully_convolutional:
        if previous[0] is None:
            raise ValueError(f"fully-convolutional testing: {type(net).__name__} has no fully-convolutional mode")
        net.fully_convolutional, net.score_activation = True, "sigmoid" if multi_label else "softmax"
    was_training = net.training
    net.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False)
    scores, owners = [], []
    layout = contextlib.ExitStack()  # closed by the finally below, with the model's mode
    try:
        layout.enter_context(inference_layout(net, device, memory_format))
        position = 0
        for batch in tqdm(
            loader,
            desc="predict",
            unit="view",
            total=len(loader),
            leave=False,
            dynamic_ncols=True,
            disable=not progress,
        ):
            clips = batch["clip"].to(device)
            with autocast(device, amp):
                out = net(normalize_clips(clips)).float()
            if not fully_convolutional:
                out = out.sigmoid() if multi_label else out.softmax(dim=1)
            wanted = torch.arange(position, position + len(out)) // per_video  # (b,) the video each view is of
            position += len(out)
            keep = batch["video"] == wanted  # views a corrupt video's replacement gave are not its views
            scores.append(out.cpu()[keep])
            owners.append(wanted[keep])
    except CorruptData:  # every video failed to decode
        scores, owners = [], []
    finally:
        layout.close()
        net.train(was_training)
        if fully_convolutional:
            net.fully_convolutional, net.score_activation = previous
    results = []
    if scores and sum(len(s) for s in scores):
        averaged, ids = aggregate_views(torch.cat(scores), torch.cat(owners), len(videos))
        by_id = dict(zip(ids.tolist(), averaged))
        counts = torch.bincount(torch.cat(owners), minlength=len(videos)).tolist()
    else:
        by_id, counts = {}, [0] * len(videos)
    for i, video in enumerate(videos):
        if i in by_id:
            results.append(VideoScores(video, by_id[i], counts[i]))
        else:
            results.append(VideoScores(video, None, 0, decode_error(video)))
    return results


def normalize_clips(clips: Tensor) -> Tensor:
    """A batch of uint8 clips normalised as the networks take them (float clips are left as they are)."""
    return normalize(clips) if clips.dtype == torch.uint8 else clips


def decode_error(video: VideoInput) -> str:
    """Why a video cannot be read: the decoder's message (the file is tried once more, for its first frame)."""
    try:
        read_frames(video.path, lambda count: torch.zeros(1, dtype=torch.int64))
    except VideoDecodeError as err:
        return str(err)
    return f"{video.path}: no view could be decoded"


def top_classes(scores: Tensor, k: int, names: Sequence[str] | None) -> list[dict[str, Any]]:
    """The ``k`` highest scores, highest first: ``{"class": index, "name": name or None, "score": float}``."""
    values, indices = scores.topk(min(k, scores.numel()))
    return [
        {"class": int(i), "name": names[int(i)] if names is not None else None, "score": float(v)}
        for v, i in zip(values, indices)
    ]
