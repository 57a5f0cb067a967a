"""A built-in long-video task that no single clip can solve: the label depends on two events far apart in time.

Each video is ``num_clips`` consecutive clips of ``clip_frames`` frames (H x W, RGB uint8), noise and a grey
distractor square drifting through the whole video. In exactly two clips an event happens: a shape (hollow
square, plus or X, of a random bright colour) drifts through the clip. The first event is in the first half of
the video, the second at least ``num_clips // 2`` clips later. The video's label is

    label = (shape of the first event + shape of the second event) mod 3

so that, over the videos, the label is independent of what any single clip shows: a classifier that sees one
clip (or averages the scores of the clips) is at chance, 1/3, while one that sees the features of the whole
video can be right. Clips also carry a per-clip annotation (0 = no event, 1 + shape = that event), the
short-term supervision a backbone is trained with (as AVA's per-clip actions train the long-term feature bank's
backbone).

Everything is generated on the fly and is a pure function of (seed, video index, clip index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LongVideoTask", "VideoSpec", "NUM_SHAPES", "SHAPE_NAMES"]

SHAPE_NAMES = ("square", "plus", "x")
NUM_SHAPES = len(SHAPE_NAMES)
SHAPE_SIZE = 9
NOISE_STD = 18.0  # on the 0-255 scale
BACKGROUND = 40.0


def _shape_mask(shape: int) -> np.ndarray:
    """A SHAPE_SIZE x SHAPE_SIZE boolean stencil of shape ``shape``."""
    n = SHAPE_SIZE
    mask = np.zeros((n, n), dtype=bool)
    if shape == 0:  # hollow square
        mask[[0, 1, -2, -1], :] = True
        mask[:, [0, 1, -2, -1]] = True
    elif shape == 1:  # plus
        mask[n // 2 - 1 : n // 2 + 2, :] = True
        mask[:, n // 2 - 1 : n // 2 + 2] = True
    elif shape == 2:  # X
        i = np.arange(n)
        for d in (-1, 0, 1):
            j = np.clip(i + d, 0, n - 1)
            mask[i, j] = True
            mask[i, n - 1 - j] = True
    else:
        raise ValueError(f"unknown shape {shape}; expected 0..{NUM_SHAPES - 1}")
    return mask


_MASKS = [_shape_mask(s) for s in range(NUM_SHAPES)]


@dataclass(frozen=True)
class VideoSpec:
    """What happens in one video: the two event clips, their shapes and the label."""

    event_clips: tuple[int, int]
    shapes: tuple[int, int]
    label: int


@dataclass(frozen=True)
class LongVideoTask:
    """The built-in long-video task (see the module docstring).

    Attributes:
        num_videos: how many videos (indices 0 .. num_videos - 1).
        seed: the seed every video is derived from; two tasks with different seeds share no video.
        num_clips: clips per video (at least 4).
        clip_frames: frames per clip.
        size: frame height and width in pixels.
    """

    num_videos: int
    seed: int = 0
    num_clips: int = 8
    clip_frames: int = 8
    size: int = 32

    def __post_init__(self) -> None:
        if self.num_videos < 1:
            raise ValueError(f"num_videos must be positive; got {self.num_videos}")
        if self.num_clips < 4:
            raise ValueError(f"num_clips must be at least 4 (two events in different halves); got {self.num_clips}")
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be positive; got {self.clip_frames}")
        if self.size < SHAPE_SIZE + 4:
            raise ValueError(f"size must be at least {SHAPE_SIZE + 4} pixels; got {self.size}")

    @property
    def num_classes(self) -> int:
        """Classes of the video label."""
        return NUM_SHAPES

    @property
    def num_clip_classes(self) -> int:
        """Classes of the per-clip annotation: no event, or one of the shapes."""
        return NUM_SHAPES + 1

    @property
    def video_frames(self) -> int:
        """Frames per video."""
        return self.num_clips * self.clip_frames

    def spec(self, video: int) -> VideoSpec:
        """The events and label of video ``video``."""
        rng = self._rng(video)
        half = self.num_clips // 2
        first = int(rng.integers(0, self.num_clips - half))
        second = int(rng.integers(first + half, self.num_clips))
        shapes = (int(rng.integers(NUM_SHAPES)), int(rng.integers(NUM_SHAPES)))
        return VideoSpec((first, second), shapes, (shapes[0] + shapes[1]) % NUM_SHAPES)

    def label(self, video: int) -> int:
        """The video's label."""
        return self.spec(video).label

    def clip_label(self, video: int, clip: int) -> int:
        """Per-clip annotation: 0 if no event happens in the clip, else 1 + the event's shape."""
        spec = self.spec(video)
        for event_clip, shape in zip(spec.event_clips, spec.shapes):
            if clip == event_clip:
                return 1 + shape
        return 0

    def clip(self, video: int, clip: int) -> np.ndarray:
        """Frames of one clip: (clip_frames, size, size, 3) uint8."""
        self._check(video, clip)
        spec = self.spec(video)
        rng = np.random.default_rng([self.seed, video, clip, 1])
        t0 = clip * self.clip_frames
        frames = rng.normal(BACKGROUND, NOISE_STD, size=(self.clip_frames, self.size, self.size, 3))
        # the distractor: a grey 5x5 square drifting through the whole video
        video_rng = np.random.default_rng([self.seed, video, 2])  # the same for every clip of the video
        start = video_rng.uniform(0, self.size - 5, size=2)
        velocity = video_rng.uniform(-0.7, 0.7, size=2)
        for f in range(self.clip_frames):
            y, x = self._bounce(start + velocity * (t0 + f), 5)
            frames[f, y : y + 5, x : x + 5] = 150.0
        if clip in spec.event_clips:
            shape = spec.shapes[spec.event_clips.index(clip)]
            colour = rng.uniform(150, 255, size=3)
            colour[rng.integers(3)] = 255.0
            pos = rng.uniform(0, self.size - SHAPE_SIZE, size=2)
            drift = rng.uniform(-1.0, 1.0, size=2)
            for f in range(self.clip_frames):
                y, x = self._bounce(pos + drift * f, SHAPE_SIZE)
                frames[f, y : y + SHAPE_SIZE, x : x + SHAPE_SIZE][_MASKS[shape]] = colour
        return np.clip(frames, 0, 255).astype(np.uint8)

    def video(self, video: int) -> np.ndarray:
        """All frames of a video: (num_clips * clip_frames, size, size, 3) uint8."""
        return np.concatenate([self.clip(video, c) for c in range(self.num_clips)], axis=0)

    def _bounce(self, pos: np.ndarray, extent: int) -> tuple[int, int]:
        """Reflects a drifting position into the frame so an object of ``extent`` pixels stays inside."""
        span = self.size - extent
        folded = np.abs(np.mod(pos, 2 * span) - span)  # triangle wave in [0, span]
        y, x = (span - folded).round().astype(int)
        return int(y), int(x)

    def _rng(self, video: int) -> np.random.Generator:
        if not 0 <= video < self.num_videos:
            raise IndexError(f"video {video} out of range 0..{self.num_videos - 1}")
        return np.random.default_rng([self.seed, video, 0])

    def _check(self, video: int, clip: int) -> None:
        if not 0 <= video < self.num_videos:
            raise IndexError(f"video {video} out of range 0..{self.num_videos - 1}")
        if not 0 <= clip < self.num_clips:
            raise IndexError(f"clip {clip} out of range 0..{self.num_clips - 1}")
