"""A built-in video dataset in which only long-range spatio-temporal dependency decides the label.

Every clip shows two shapes on a noisy background: shape ``a`` for one frame in the first half of the clip and
in one half of the picture, shape ``b`` for one frame in the second half of the clip and in the other half of
the picture. The label is ``(a + b) mod K``. No frame holds both shapes, so a C2D network (no temporal kernels)
sees each shape separately, and what its global average pooling and linear classifier compute is a sum of a
score of ``a`` and a score of ``b``; no such sum gives ``(a + b) mod K`` for every pair (already for K = 2 it is
XOR). A non-local block lets the feature at one shape look at the other shape, far away in space and time, and
the network can then solve the task. The data are generated on the fly from ``(seed, split, epoch, index)``,
so every run of the same seed sees the same clips and nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import MEAN, STD

# 7x7 binary masks of the shapes; their class is their index
_SHAPES = {
    "square": ["#######", "#######", "#######", "#######", "#######", "#######", "#######"],
    "plus": ["...#...", "...#...", "...#...", "#######", "...#...", "...#...", "...#..."],
    "cross": ["#.....#", ".#...#.", "..#.#..", "...#...", "..#.#..", ".#...#.", "#.....#"],
    "ring": ["#######", "#.....#", "#.....#", "#.....#", "#.....#", "#.....#", "#######"],
    "triangle": ["...#...", "..###..", "..###..", ".#####.", ".#####.", "#######", "#######"],
    "bar": ["##.....", "##.....", "##.....", "##.....", "##.....", "##.....", "##....."],
}
SHAPE_NAMES = tuple(_SHAPES)
SPLITS = ("train", "val", "test")
BACKGROUND = 90.0


def shape_mask(name: str) -> np.ndarray:
    """The (7, 7) boolean mask of a shape."""
    return np.array([[c == "#" for c in row] for row in _SHAPES[name]], dtype=bool)


class LongRangeShapes(Dataset):
    """Clips whose label is ``(a + b) mod num_classes`` for two shapes far apart in space and time.

    Args:
        size: number of clips per epoch.
        split: "train", "val" or "test": disjoint streams of clips.
        frames: T, clip length (even, at least 2).
        image_size: height and width of the frames (at least 16).
        num_classes: K, the number of shapes and of classes (2 to 6).
        seed: the random stream; the same seed gives the same clips.
        noise: standard deviation of the background noise, in 0-255 pixel units.

    Items are dicts with "clip" (3, T, H, W) float normalised like the video datasets ((x - 114.75) / 57.375),
    "label" (int64), "video" (the index), "skipped" (always 0: nothing here can be corrupt), "skipped_ids"
    ([-1]) and "objects"
    (2, 5) int64 rows (frame, y0, x0, y1, x1) of shape a and shape b in clip pixels, end-exclusive.

    Training clips change with :meth:`set_epoch` (an endless stream of fresh clips); val/test clips do not.
    """

    def __init__(
        self,
        size: int = 4096,
        *,
        split: str = "train",
        frames: int = 8,
        image_size: int = 32,
        num_classes: int = 2,
        seed: int = 0,
        noise: float = 12.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if size < 1:
            raise ValueError(f"size must be positive; got {size}")
        if frames < 2 or frames % 2:
            raise ValueError(f"frames must be even and at least 2 (one shape per half); got {frames}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 to hold two 7x7 shapes apart; got {image_size}")
        if not 2 <= num_classes <= len(_SHAPES):
            raise ValueError(f"num_classes must be between 2 and {len(_SHAPES)}; got {num_classes}")
        self.size = size
        self.split = split
        self.frames = frames
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.noise = noise
        self.epoch = 0
        self.masks = [shape_mask(name) for name in SHAPE_NAMES[:num_classes]]

    def set_epoch(self, epoch: int) -> None:
        """Selects the training clips of this epoch (val/test clips never change)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} clips")
        epoch = self.epoch if self.split == "train" else 0
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), epoch, index])
        clip, objects, label = self.render(rng)
        clip = (torch.from_numpy(clip).permute(3, 0, 1, 2).float() - MEAN) / STD  # (T,H,W,3) -> (3,T,H,W)
        return {
            "clip": clip,
            "label": torch.tensor(label),
            "video": torch.tensor(index),
            "skipped": torch.tensor(0),
            "skipped_ids": torch.tensor([-1]),
            "objects": torch.from_numpy(objects),
        }

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One clip from a random generator: uint8 frames (T, H, W, 3), objects (2, 5) and the label."""
        t, s, k = self.frames, self.image_size, self.num_classes
        # a fixed grey background with noise: the clip-to-clip variation is in the shapes, not the backdrop
        clip = BACKGROUND + rng.normal(0, self.noise, size=(t, s, s, 3))
        shapes = rng.integers(0, k, size=2)
        side = rng.integers(0, 2)  # shape a in the left (0) or right (1) half, shape b in the other
        objects = np.zeros((2, 5), dtype=np.int64)
        for i, shape in enumerate(shapes):
            frame = rng.integers(0, t // 2) + i * (t // 2)  # a in the first half of the clip, b in the second
            half = side if i == 0 else 1 - side
            y = rng.integers(0, s - 7 + 1)
            x = rng.integers(half * s // 2, (half + 1) * s // 2 - 7 + 1)
            color = rng.uniform(170, 255, size=3)  # bright, well apart from the background
            patch = clip[frame, y : y + 7, x : x + 7]
            patch[self.masks[shape]] = color
            objects[i] = (frame, y, x, y + 7, x + 7)
        label = int(shapes.sum() % k)
        return np.clip(clip, 0, 255).round().astype(np.uint8), objects, label
