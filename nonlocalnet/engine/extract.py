"""Features of video files, clip by clip (``nonlocalnet extract``), written so that an interrupted run resumes.

Each video is tiled by clips of ``frames`` frames taken every ``sampling_rate`` frames, a clip starting every
``stride`` frames (default: clips side by side; :func:`~nonlocalnet.data.transforms.clip_starts`; a video shorter
than one clip gives one clip whose last frame repeats). Only the frames the clips take are decoded; they are
scaled to the short side ``scale`` and centre-cropped to ``crop`` (None: the full frame), the test transforms.
Each clip's features are ``model.forward_features`` or a named layer's output, averaged over time and space
(:func:`~nonlocalnet.models.features.batched_clip_features`, the feature bank's path too).

Outputs:

* ``.safetensors``: a feature bank file (:class:`~nonlocalnet.bank.store.FeatureBank`): per video
  ``features/<id>`` (L, C) float32 and ``starts/<id>`` (L,) int64 first frames; with ``per_video`` L is 1, the
  mean over the video's clips, and its start is 0. The metadata records the settings.
* ``.npy``: (N, C) float32, one row per video in input order, the mean over its clips (``per_video`` only); a
  video that could not be decoded has a row of NaN.

Resumption: every finished video is written at once to ``<out>.parts/<index>.safetensors`` (atomically), beside
``<out>.parts/settings.json``; a run that finds that folder goes on with the videos it lacks (refusing other
settings), and the last step writes ``out`` (atomically) from the parts and removes the folder. A video that could
not be decoded has no part, so a resumed run tries it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..bank.store import FeatureBank
from ..data import transforms
from ..data.decode_errors import VideoDecodeError
from ..data.decoders import read_frames
from ..data.inputs import VideoInput
from ..io import atomic_path, write_text_atomic
from ..models.features import batched_clip_features
from .precision import autocast, inference_layout

__all__ = ["ExtractSettings", "ExtractResult", "VideoClips", "extract_features", "parts_folder"]

log = logging.getLogger("nonlocalnet")
OUTPUT_SUFFIXES = (".safetensors", ".npy")


@dataclass(frozen=True)
class ExtractSettings:
    """How the clips are cut and which features are taken (recorded with the output; a resumed run must match).

    Attributes:
        frames: frames per clip.
        sampling_rate: one frame of the video every this many in a clip.
        stride: frames between clip starts; None: one clip's span (clips side by side).
        scale: short side of the frames fed to the model.
        crop: side of the centre crop; None: the full frame.
        layer: the named layer whose output is taken; None: ``forward_features``.
        per_video: one feature per video, the mean over its clips.
        model: the model's name (recorded).
        checkpoint: the weights file (recorded).
        decoder: "pyav" or "torchcodec".
    """

    frames: int
    sampling_rate: int
    stride: int | None = None
    scale: int = 256
    crop: int | None = 224
    layer: str | None = None
    per_video: bool = False
    model: str = ""
    checkpoint: str = ""
    decoder: str = "pyav"

    def __post_init__(self) -> None:
        for name in ("frames", "sampling_rate", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("stride", "crop"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None; got {value}")
        if self.crop is not None and self.crop > self.scale:
            raise ValueError(f"crop {self.crop} is larger than the short side {self.scale} it is cut from")

    def record(self) -> dict[str, str]:
        """The settings as string metadata (safetensors), ``None`` written as ""."""
        return {k: "" if v is None else str(v) for k, v in self.__dict__.items()}


@dataclass
class ExtractResult:
    """What :func:`extract_features` did.

    Attributes:
        output: the file written.
        videos: videos with features (resumed ones included).
        resumed: videos whose features a previous run had written.
        failed: id -> why, for the videos that could not be decoded.
        channels: C, the features' channels.
    """

    output: Path
    videos: int
    resumed: int
    failed: dict[str, str] = field(default_factory=dict)
    channels: int = 0


class VideoClips(Dataset):
    """The clips of each video as :func:`extract_features` feeds them: item ``i`` is a dict of ``index`` (i),
    ``clips`` (L, 3, T, H, W) uint8, ``starts`` (L,) int64 and ``error`` ("" or why video ``i`` cannot be read,
    its clips then empty)."""

    def __init__(self, videos: Sequence[VideoInput], settings: ExtractSettings, indices: Sequence[int]) -> None:
        self.videos, self.settings, self.indices = list(videos), settings, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self.indices[item]
        s = self.settings
        chosen: list[int] = []

        def sample(count: int) -> Tensor:  # may be called twice (a wrong frame count): the last call counts
            chosen[:] = transforms.clip_starts(count, s.frames, s.sampling_rate, s.stride, allow_short=True)
            return transforms.tiling_clip_indices(count, chosen, s.frames, s.sampling_rate)

        try:
            frames, _ = read_frames(self.videos[index].path, sample, decoder=s.decoder)  # (L * T, H, W, 3)
        except VideoDecodeError as err:
            return {
                "index": index,
                "clips": torch.empty(0, dtype=torch.uint8),
                "starts": torch.empty(0),
                "error": str(err),
            }
        clip = transforms.to_channels_first(torch.from_numpy(frames))  # (L * T, H, W, 3) -> (3, L * T, H, W)
        clip = transforms.short_side_resize(clip, s.scale)
        if s.crop is not None:
            clip = transforms.spatial_crop(clip, s.crop, 0, 1)  # the centre crop, the one-crop test view's
        clips = clip.unflatten(1, (len(chosen), s.frames)).transpose(0, 1)  # (3, L, T, H, W) -> (L, 3, T, H, W)
        return {
            "index": index,
            "clips": clips.contiguous(),
            "starts": torch.tensor(chosen, dtype=torch.int64),
            "error": "",
        }


def parts_folder(output: str | Path) -> Path:
    """Where the finished videos of an extraction into ``output`` wait: ``<output>.parts``."""
    output = Path(output)
    return output.with_name(output.name + ".parts")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    videos: Sequence[VideoInput],
    output: str | Path,
    settings: ExtractSettings,
    *,
    batch_size: int = 8,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
    amp: bool | str = "auto",
    memory_format: str = "auto",
) -> ExtractResult:
    """Extracts the features of every video into ``output`` (see the module docstring), resuming a run that was
    interrupted.

    Args:
        model: the network (run in eval mode; its mode is restored after).
        videos: the video files; their ids key the output.
        output: a ``.safetensors`` or ``.npy`` file.
        settings: the clips and the features.
        batch_size: clips per forward pass.
        workers: DataLoader worker processes decoding videos (one video an item).
        device: where the model runs.
        progress: a progress bar (videos) on stderr.
        stop_after: stop after this many videos of this run, leaving the parts (as an interruption would).
        amp, memory_format: the precision and layout the model runs in, as ``train.amp`` and
            ``train.memory_format`` (:mod:`nonlocalnet.engine.precision`; "auto": the faster on this device).

    Returns:
        What was written, or, with ``stop_after`` reached before the end, the state of the parts (output not
        written yet).

    Raises:
        ValueError: an output of another kind, an existing output, a parts folder of other settings or videos,
            ``.npy`` without ``per_video``, or no video decodable at all.
    """
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"the output {output} must end in .safetensors (a feature bank file) or .npy")
    if output.suffix == ".npy" and not settings.per_video:
        raise ValueError(
            f"{output}: a .npy output holds one row per video: pass per-video features (--per-video), "
            f"or write .safetensors for the clips' features"
        )
    if output.exists():
        raise ValueError(f"{output} exists already (a finished extraction); remove it or choose another output")
    parts = parts_folder(output)
    record = {"settings": settings.record(), "videos": [v.id for v in videos]}
    done = _resume_parts(parts, record)
    todo = [i for i in range(len(videos)) if i not in done]
    device = torch.device(device)
    was_training = model.training
    model.eval()
    layout = contextlib.ExitStack()  # closed by the finally below, with the model's mode
    failed: dict[str, str] = {}
    loader = DataLoader(VideoClips(videos, settings, todo), batch_size=None, num_workers=workers, shuffle=False)
    try:
        layout.enter_context(inference_layout(model, device, memory_format))
        for count, item in enumerate(
            tqdm(
                loader,
                desc="extract",
                unit="video",
                total=len(todo),
                leave=False,
                dynamic_ncols=True,
                disable=not progress,
            ),
            start=1,
        ):
            index = item["index"]
            if item["error"]:
                failed[videos[index].id] = item["error"]
            else:
                with autocast(device, amp):
                    features = batched_clip_features(
                        model,
                        item["clips"],
                        batch_size=batch_size,
                        device=device,
                        layer=settings.layer,
                        prepare=transforms.normalize,
                    )  # (L, C)
                starts = item["starts"]
                if settings.per_video:
                    features, starts = features.mean(dim=0, keepdim=True), starts.new_zeros(1)  # (1, C), (1,)
                _write_part(parts, index, videos[index].id, features, starts)
                done.add(index)
            if stop_after is not None and count >= stop_after and len(done) + len(failed) < len(videos):
                return ExtractResult(parts, len(done), len(videos) - len(todo), failed)
    finally:
        layout.close()
        model.train(was_training)
    if not done:
        raise ValueError(f"no video could be decoded ({len(failed)} tried): " + "; ".join(list(failed.values())[:3]))
    return _assemble(parts, output, videos, settings, done, failed, resumed=len(videos) - len(todo))


def _resume_parts(parts: Path, record: Mapping[str, Any]) -> set[int]:
    """The videos an earlier run of the same settings finished (their parts readable); writes the settings of a
    fresh run."""
    settings_file = parts / "settings.json"
    if not settings_file.is_file():
        parts.mkdir(parents=True, exist_ok=True)
        write_text_atomic(settings_file, json.dumps(record, indent=1))
        return set()
    try:
        earlier = json.loads(settings_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{settings_file}: unreadable ({e}); remove {parts} to start afresh") from None
    changed = [k for k in record["settings"] if earlier.get("settings", {}).get(k) != record["settings"][k]]
    if changed:
        shown = ", ".join(f"{k} {earlier.get('settings', {}).get(k)!r} -> {record['settings'][k]!r}" for k in changed)
        raise ValueError(
            f"{parts} holds an interrupted extraction with other settings ({shown}); rerun it with "
            f"its settings, or remove {parts} to start afresh"
        )
    if earlier.get("videos") != record["videos"]:
        raise ValueError(
            f"{parts} holds an interrupted extraction of other videos (another list or order); rerun "
            f"it with its videos, or remove {parts} to start afresh"
        )
    done = set()
    for index in range(len(record["videos"])):
        path = _part_path(parts, index)
        if path.is_file():
            try:
                load_file(str(path))
                done.add(index)
            except Exception:  # noqa: BLE001 - a part cut short by the interruption: done again
                path.unlink()
    log.info("resuming the extraction in %s: %d of %d videos done", parts, len(done), len(record["videos"]))
    return done


def _part_path(parts: Path, index: int) -> Path:
    return parts / f"{index:07d}.safetensors"


def _write_part(parts: Path, index: int, video_id: str, features: Tensor, starts: Tensor) -> None:
    with atomic_path(_part_path(parts, index)) as tmp:
        save_file(
            {"features": features.contiguous(), "starts": starts.contiguous()}, str(tmp), metadata={"video": video_id}
        )


def _assemble(
    parts: Path,
    output: Path,
    videos: Sequence[VideoInput],
    settings: ExtractSettings,
    done: set[int],
    failed: dict[str, str],
    resumed: int,
) -> ExtractResult:
    """Writes ``output`` from the parts (atomically), then removes the parts folder."""
    features: dict[str, Tensor] = {}
    starts: dict[str, Tensor] = {}
    for index in sorted(done):
        part = load_file(str(_part_path(parts, index)))
        features[videos[index].id], starts[videos[index].id] = part["features"], part["starts"]
    channels = next(iter(features.values())).shape[1]
    if output.suffix == ".npy":
        rows = np.full((len(videos), channels), np.nan, dtype=np.float32)
        for index, video in enumerate(videos):
            if video.id in features:
                rows[index] = features[video.id][0].numpy()
        with atomic_path(output) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, rows)
    else:
        span = (settings.frames - 1) * settings.sampling_rate + 1  # the bank builder's names for the tiling too
        tiling = {
            "clip_frames": str(settings.frames),
            "frame_stride": str(settings.sampling_rate),
            "step": str(settings.stride or span),
        }
        FeatureBank(features, starts, metadata={**settings.record(), **tiling}).save(output)
    shutil.rmtree(parts)
    return ExtractResult(output, len(done), resumed, failed, channels)
