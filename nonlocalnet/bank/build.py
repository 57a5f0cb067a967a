"""Building a feature bank: run a trained video model over every clip of every video and keep pooled features.

The clips and the features are those of ``nonlocalnet extract`` (:mod:`nonlocalnet.engine.extract`): the same clip
tiling (:func:`~nonlocalnet.data.transforms.clip_starts`) and the same feature path
(:func:`~nonlocalnet.models.features.batched_clip_features`); ``extract``'s safetensors output is a feature bank file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.transforms import clip_starts
from ..models.features import batched_clip_features, clip_features
from .store import FeatureBank

__all__ = ["clip_starts", "pooled_features", "build_feature_bank"]


def pooled_features(model: nn.Module, clips: Tensor) -> Tensor:
    """The model's clip features, averaged over every remaining spatial axis: (B, C)
    (:func:`~nonlocalnet.models.features.clip_features`, the one feature path of the bank and ``extract``)."""
    return clip_features(model, clips)


@torch.no_grad()
def build_feature_bank(
    model: nn.Module,
    videos: Iterable[tuple[str, Tensor]],
    *,
    clip_frames: int,
    frame_stride: int = 1,
    step: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    out: str | Path | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> FeatureBank:
    """Runs ``model`` over all clips of every video and collects pooled features into a :class:`FeatureBank`.

    Args:
        model: a trained video model; run in eval mode (its train/eval flag is restored afterwards).
        videos: (video id, frames) pairs, frames a network input (C, F, H, W) for the whole video, already
            normalised as the model expects. A sized iterable gives the progress bar a total.
        clip_frames: frames per clip the model takes.
        frame_stride: temporal subsampling inside a clip (2 for the paper's 32x2 clips).
        step: frames between clip starts (default: clips side by side).
        batch_size: clips per forward pass.
        device: where to run (default: the model's device).
        out: if given, the bank is also written there (safetensors).
        metadata: extra facts stored with the bank (strings).
        progress: show tqdm progress bars.

    Returns:
        The bank: per video (L, C) features and (L,) clip starts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    bank = FeatureBank(
        metadata={
            "clip_frames": str(clip_frames),
            "frame_stride": str(frame_stride),
            "step": str(step if step is not None else (clip_frames - 1) * frame_stride + 1),
            **(metadata or {}),
        }
    )
    total = len(videos) if isinstance(videos, Sized) else None
    try:
        for vid, frames in tqdm(videos, total=total, desc="feature bank", unit="video", disable=not progress):
            if vid in bank.features:
                raise ValueError(f"video id {vid!r} appears twice")
            if frames.dim() != 4:
                raise ValueError(f"video {vid!r}: frames must be (C, F, H, W); got {tuple(frames.shape)}")
            starts = clip_starts(frames.shape[1], clip_frames, frame_stride, step)
            span = (clip_frames - 1) * frame_stride + 1
            clips = [frames[:, s : s + span : frame_stride] for s in starts]  # views (C, T, H, W), no copies
            bank.features[vid] = batched_clip_features(model, clips, batch_size=batch_size, device=device)  # (L, C)
            bank.starts[vid] = torch.tensor(starts, dtype=torch.long)
    finally:
        model.train(was_training)
    bank.validate()
    if out is not None:
        bank.save(out)
    return bank
