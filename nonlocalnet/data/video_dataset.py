"""The dataset of real videos from a list file (Kinetics / Charades style), decoded with PyAV (or torchcodec, see
:mod:`nonlocalnet.data.decoders`) into the paper's clips.

List files (read by :mod:`nonlocalnet.data.video_list`; one video a line, blank lines and lines starting with
``#`` ignored):

* single label (Kinetics, the mmaction2 / PySlowFast format): ``relative/path.mp4 label`` where ``label`` is an
  integer in ``[0, num_classes)``; the path may contain spaces (the label is the last field);
* multi-label (Charades, ``multi_label=True``): ``relative/path.mp4 3,17,42`` (comma-separated labels) or
  ``relative/path.mp4 3 17 42`` (mmaction2's space-separated variant); the path is the first field.

Paths are relative to ``root`` (an absolute path is kept as it is). A malformed line or a label out of range is
an error naming the list file and the line number. Missing video files are all reported in one error at
construction (the first 20 and the count), or dropped with a warning when ``skip_missing=True``.

Items are dicts that ``default_collate`` stacks:

* ``clip``: (3, T, H, W) float32, RGB 0-255 normalised with ``(x - 114.75) / 57.375``; with
  ``normalize=False`` the uint8 RGB clip itself, laid out (T, H, W, 3) in memory (:func:`transforms.frames_last
  <nonlocalnet.data.transforms.frames_last>`), for normalising on the device after a 4x smaller copy (the
  trainer does; :func:`transforms.normalize <nonlocalnet.data.transforms.normalize>` gives the same values, on
  CUDA within one unit in the last place);
* ``label``: int64 scalar (single label) or float32 multi-hot (num_classes,);
* ``video``: int64, the index in the list of the video the clip was actually taken from;
* ``skipped``: int64, how many corrupt videos were skipped while producing this item.
* ``skipped_ids``: int64 ``(max_retries + 1,)``, their indices (padded with -1).

Train split: one item per video; a clip at a random temporal position (see
:func:`~nonlocalnet.data.transforms.train_clip_indices`), short side scaled to a random value in ``train_scale``,
a random ``crop_size``² crop and a random horizontal flip, taken as the matching square of the decoded frame so
that only it is converted, copied and scaled (:func:`~nonlocalnet.data.transforms.random_scaled_crop`; the same
distribution of crops up to whole source pixels). The random choices of item ``index`` come from
generators seeded with ``(seed, epoch, index, attempt)`` (call :meth:`VideoListDataset.set_epoch` each epoch), so
an item is the same in every run, in every DataLoader worker and after a resume.

Test split: ``len = videos × test_clips × test_crops``; item ``i`` is view ``(video, clip k, crop j)`` with
``video, rest = divmod(i, test_clips * test_crops)`` and ``k, j = divmod(rest, test_crops)``: clip ``k`` of
``test_clips`` evenly spaced in time, short side ``test_scale``, crop ``j`` of ``test_crops`` along the long side
(left / centre / right, or top / centre / bottom for portrait frames; one crop is the centre crop), or the full
frame when ``crop_size=None`` (fully-convolutional testing; frames of different sizes then need batch size 1).

Short videos: frame indices past the end repeat the last frame (PySlowFast's clamping). A video that cannot be
opened or has no decodable frame is *corrupt*: it is logged (a warning with its path, once per process),
counted in the item's ``skipped`` and replaced:

* in training by another video drawn from the item's generator (so the replacement is reproducible too);
* at test time by the next video in the list (``(video + 1) % len(videos)``) with the same clip and crop index.
  The item's ``video`` then names the replacement, so scores aggregated by ``video`` stay honest: the corrupt
  video gets no view at all (the evaluator sees fewer videos than the list has), and the replacement gets
  some views twice, which the per-video averaging of scores absorbs.

Each item says which corrupt videos it passed over (``skipped_ids``), so a run counts distinct corrupt videos,
not attempts. An error is raised only when every video of the list is corrupt, or in training when
``max_retries + 1`` draws in a row fail (the item's own and ``max_retries`` replacements), naming the last ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from nonlocalnet.data import transforms

from .decode_errors import VideoDecodeError
from .decoders import check_decoder, read_frames
from .regions import Region
from .video_list import read_video_list

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
MISSING_SHOWN = 20


class CorruptData(ValueError):
    """So many corrupt videos that an item cannot be made: every video of the list, or ``max_retries + 1``
    training draws in a row."""


class VideoListDataset(Dataset):
    """Clips of the videos of a list file, with the paper's sampling and transforms (see the module docstring).

    Args:
        list_file: ``path label`` lines (or ``path 3,17,42`` with ``multi_label``); or the list's entries
            themselves, ``(path, label)`` pairs as :func:`read_video_list` gives them (``nonlocalnet predict`` passes
            the videos it is given so).
        root: folder the paths are relative to.
        split: ``"train"`` (one random clip per video) or ``"test"`` (``test_clips × test_crops`` views per video).
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        multi_label: Charades-style lists; labels become multi-hot float vectors.
        frames: frames per clip (T).
        sampling_rate: keep one frame every this many (32×2: frames=32, sampling_rate=2).
        train_scale: (low, high) range of the random short side in training.
        crop_size: side of the square crop; None (test only) keeps full frames.
        test_scale: short side at test time.
        test_clips: K clips evenly spaced in time per test video.
        test_crops: crops per test clip: 1 (centre) or 3 (left / centre / right along the long side).
        max_retries: replacements tried for a corrupt video before giving up.
        seed: base seed of the random choices of training items.
        skip_missing: drop missing files with a warning instead of failing.
        seek: allow seeking in the videos (False always decodes from the first frame; PyAV only).
        decoder: ``"pyav"`` or ``"torchcodec"`` (the same frames and pixels where the container's frame count is
            right; see :func:`read_frames` and :func:`check_decoder`).
        normalize: items hold normalised float32 clips; False: the uint8 clips (see the module docstring).
    """

    def __init__(
        self,
        list_file: str | Path | Sequence[tuple[str, int | tuple[int, ...]]],
        root: str | Path,
        *,
        split: str = "train",
        num_classes: int,
        multi_label: bool = False,
        frames: int = 8,
        sampling_rate: int = 8,
        train_scale: tuple[int, int] = (256, 320),
        crop_size: int | None = 224,
        test_scale: int = 256,
        test_clips: int = 10,
        test_crops: int = 3,
        max_retries: int = 10,
        seed: int = 0,
        skip_missing: bool = False,
        seek: bool = True,
        decoder: str = "pyav",
        normalize: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive; got {num_classes}")
        for name, value in (
            ("frames", frames),
            ("sampling_rate", sampling_rate),
            ("test_scale", test_scale),
            ("test_clips", test_clips),
            ("test_crops", test_crops),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value}")
        check_decoder(decoder)
        if max_retries < 0 or seed < 0:
            raise ValueError(f"max_retries and seed must be >= 0; got {max_retries}, {seed}")
        low, high = train_scale
        if not 1 <= low <= high:
            raise ValueError(f"train_scale must be (low, high) with 1 <= low <= high; got {train_scale}")
        if crop_size is None:
            if split == "train":
                raise ValueError(
                    "crop_size=None (data.crop_size=null: full frames) is for testing only; training "
                    "needs a crop size (data.crop_size=224), and `nonlocalnet test` takes the null"
                )
            if test_crops != 1:
                raise ValueError(f"crop_size=None (full frames) takes test_crops=1; got {test_crops}")
        elif crop_size < 1:
            raise ValueError(f"crop_size must be positive or None; got {crop_size}")
        elif split == "train" and crop_size > low:
            raise ValueError(f"crop_size {crop_size} is larger than the smallest train scale {low}")
        elif split == "test" and crop_size > test_scale:
            raise ValueError(f"crop_size {crop_size} is larger than test_scale {test_scale}")

        given = not isinstance(list_file, (str, Path))
        # where the videos come from, in messages: the list file, or the given entries
        self.list_file, self.root = "the given videos" if given else Path(list_file), Path(root)
        self.split, self.num_classes, self.multi_label = split, num_classes, multi_label
        self.frames, self.sampling_rate = frames, sampling_rate
        self.train_scale, self.crop_size, self.test_scale = (low, high), crop_size, test_scale
        self.test_clips, self.test_crops = test_clips, test_crops
        self.max_retries, self.seed, self.seek, self.decoder = max_retries, seed, seek, decoder
        self.normalize = normalize
        self.epoch = 0

        entries = (
            [(str(path), label) for path, label in list_file]
            if given
            else read_video_list(self.list_file, num_classes=num_classes, multi_label=multi_label)
        )
        if not entries:
            raise ValueError("no video given")
        paths = [self.root / rel for rel, _ in entries]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            shown = "\n  ".join(str(paths[i]) for i in missing[:MISSING_SHOWN])
            more = f"\n  ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            message = (
                f"{len(missing)} of {len(paths)} videos listed in {self.list_file} are missing "
                f"(root {self.root}):\n  {shown}{more}"
            )
            if not skip_missing:
                raise FileNotFoundError(
                    message + "\n(to drop them: data.skip_missing=true in a config or on the "
                    "command line, skip_missing=True in Python)"
                )
            logger.warning("%s\ndropping them (skip_missing=True)", message)
            gone = set(missing)
            entries = [e for i, e in enumerate(entries) if i not in gone]
            paths = [p for i, p in enumerate(paths) if i not in gone]
            if not entries:
                raise FileNotFoundError(f"every video listed in {self.list_file} is missing (root {self.root})")
        self.paths: list[Path] = paths
        self.labels: list[int | tuple[int, ...]] = [label for _, label in entries]

        # per process: videos known to be corrupt, and the last decoded and scaled test clip (3 crops share it)
        self._corrupt: dict[int, str] = {}
        self._test_cache: tuple[int, int, Tensor] | None = None

    # -- sizes and bookkeeping ------------------------------------------------------------------------------------

    @property
    def num_videos(self) -> int:
        return len(self.paths)

    @property
    def views_per_video(self) -> int:
        """Items per video: 1 in training, ``test_clips * test_crops`` at test time."""
        return 1 if self.split == "train" else self.test_clips * self.test_crops

    def __len__(self) -> int:
        return self.num_videos * self.views_per_video

    def set_epoch(self, epoch: int) -> None:
        """Make the random choices of training items those of ``epoch`` (call it before every epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        self.epoch = int(epoch)

    def view(self, index: int) -> tuple[int, int, int]:
        """(video, clip, crop) of item ``index`` (clip and crop are 0 in training)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.split == "train":
            return index, 0, 0
        video, rest = divmod(index, self.views_per_video)
        clip, crop = divmod(rest, self.test_crops)
        return video, clip, crop

    @property
    def targets(self) -> Tensor:
        """Labels of every video: (N,) int64, or (N, num_classes) float32 multi-hot."""
        return torch.stack([self._label(v) for v in range(self.num_videos)])

    def _label(self, video: int) -> Tensor:
        label = self.labels[video]
        if self.multi_label:
            hot = torch.zeros(self.num_classes, dtype=torch.float32)
            hot[list(label)] = 1.0
            return hot
        return torch.tensor(label, dtype=torch.int64)

    # -- items ------------------------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        video, clip_index, crop_index = self.view(index)
        skipped: list[int] = []
        attempts = self.max_retries + 1 if self.split == "train" else self.num_videos
        for attempt in range(attempts):
            time_seed, space_seed, choice_seed = self._seeds(index, attempt)
            try:
                if self.split == "train":
                    clip = self._train_clip(video, time_seed, space_seed)
                else:
                    clip = self._test_clip(video, clip_index, crop_index)
                ids = (skipped + [-1] * self.skip_width)[: self.skip_width]
                return {
                    "clip": clip,
                    "label": self._label(video),
                    "video": torch.tensor(video, dtype=torch.int64),
                    "skipped": torch.tensor(len(set(skipped)), dtype=torch.int64),
                    "skipped_ids": torch.tensor(ids, dtype=torch.int64),
                }
            except VideoDecodeError as err:
                skipped.append(video)
                if video not in self._corrupt:
                    self._corrupt[video] = str(err)
                    logger.warning("skipping corrupt video %s (%s)", self.paths[video], err)
                if self.split == "train":
                    video = int(
                        torch.randint(self.num_videos, (1,), generator=torch.Generator().manual_seed(choice_seed))
                    )
                else:
                    # at test time the next video in the list, as far as it takes: a run of corrupt files
                    # costs their views, not the test
                    video = (video + 1) % self.num_videos
        last = [self._corrupt[v] for v in skipped[-3:]]
        if self.split != "train" or len(self._corrupt) == self.num_videos:
            raise CorruptData(
                f"every video listed in {self.list_file} failed to decode ({self.num_videos} "
                f"videos); the last ones: " + "; ".join(last)
            )
        raise CorruptData(
            f"item {index} of {self.list_file}: {self.max_retries + 1} videos in a row failed to "
            f"decode (max_retries={self.max_retries}); the last ones: " + "; ".join(last)
        )

    def _seeds(self, index: int, attempt: int) -> tuple[int, int, int]:
        """The (time, space, replacement) seeds of a training item's ``attempt``-th draw in this epoch."""
        return tuple(
            int(s)
            for s in np.random.SeedSequence([self.seed, self.epoch, index, attempt]).generate_state(3, dtype=np.uint64)
        )

    def clip_indices(self, index: int, num_frames: int) -> Tensor:
        """The frame indices item ``index`` takes from its video if that video has ``num_frames`` frames (in this
        epoch; a training item's first draw), e.g. to decode the same frames with another reader."""
        _, clip_index, _ = self.view(index)
        if self.split == "train":
            return self._train_indices(num_frames, self._seeds(index, 0)[0])
        return self._test_indices(num_frames, clip_index)

    def _train_indices(self, count: int, time_seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(time_seed)  # the same indices whenever asked again
        return transforms.train_clip_indices(count, self.frames, self.sampling_rate, generator)

    def _test_indices(self, count: int, clip_index: int) -> Tensor:
        return transforms.uniform_clip_indices(count, self.frames, self.sampling_rate, clip_index, self.test_clips)

    @property
    def skip_width(self) -> int:
        """The length of an item's ``skipped_ids`` (the ids of the corrupt videos it passed over, -1 padded).

        A test item lists its own video first, so every corrupt video is named by its own views, however long a
        run of corrupt files the replacement walked past.
        """
        return self.max_retries + 1

    def _decode(self, video: int, sample: Callable[[int], Tensor], region: Region | None = None) -> Tensor:
        """(3, T, H, W) uint8 clip of ``video`` (of the region); known corrupt videos fail at once."""
        if video in self._corrupt:
            raise VideoDecodeError(self._corrupt[video])
        frames, _ = read_frames(self.paths[video], sample, seek=self.seek, region=region, decoder=self.decoder)
        return transforms.to_channels_first(torch.from_numpy(frames))  # (T, H, W, 3) -> (3, T, H, W)

    def _train_clip(self, video: int, time_seed: int, space_seed: int) -> Tensor:
        def region(height: int, width: int) -> tuple[slice, slice]:
            generator = torch.Generator().manual_seed(space_seed)  # same region if called again
            return transforms.random_scaled_crop(height, width, self.train_scale, self.crop_size, generator)

        # only the square that becomes the crop is converted, copied (mirrored) and scaled, in uint8
        clip = self._decode(video, lambda count: self._train_indices(count, time_seed), region)
        return self._finish(transforms.resize(clip, self.crop_size, self.crop_size))

    def _finish(self, clip: Tensor) -> Tensor:
        """A uint8 clip as an item holds it: normalised float32, contiguous, or uint8 laid out frames-last."""
        return transforms.normalize(clip) if self.normalize else transforms.frames_last(clip)

    def _test_clip(self, video: int, clip_index: int, crop_index: int) -> Tensor:
        cache = self._test_cache
        if cache is not None and cache[:2] == (video, clip_index):
            scaled = cache[2]
        else:
            clip = self._decode(video, lambda count: self._test_indices(count, clip_index))
            scaled = transforms.short_side_resize(clip, self.test_scale)
            self._test_cache = (video, clip_index, scaled)
        if self.crop_size is not None:
            scaled = transforms.spatial_crop(scaled, self.crop_size, crop_index, self.test_crops)
        return self._finish(scaled)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.list_file}, split={self.split!r}, videos={self.num_videos}, "
            f"items={len(self)}, clip={self.frames}x{self.sampling_rate})"
        )
