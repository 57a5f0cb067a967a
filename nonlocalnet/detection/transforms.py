"""What happens to a detection sample between the dataset and the detector: the training flip and the collate.

A sample is ``(image, target)``: image (3, H, W) float; target a dict of tensors as torchvision's detectors take it
(``boxes`` (N, 4) xyxy in pixels, ``labels``, optionally ``masks`` (N, H, W) and ``keypoints`` (N, K, 3)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Target = dict[str, Tensor]


class RandomHorizontalFlip:
    """Mirror an image and its target with probability ``p``: boxes, masks, and keypoints (whose left/right
    labels are swapped by ``keypoint_permutation``, e.g. :meth:`CocoDetection.flip_permutation`)."""

    def __init__(
        self,
        p: float = 0.5,
        keypoint_permutation: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.p = p
        self.keypoint_permutation = list(keypoint_permutation) if keypoint_permutation is not None else None
        self.generator = generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if torch.rand((), generator=self.generator).item() >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "keypoints" in target:
            if self.keypoint_permutation is None:
                raise ValueError("flipping keypoints needs keypoint_permutation (which keypoint is whose mirror)")
            kps = target["keypoints"][:, self.keypoint_permutation].clone()  # (N, K, 3), left <-> right
            # pixel centres: x in continuous coordinates maps to width - x
            visible = kps[..., 2] > 0
            kps[..., 0] = torch.where(visible, width - kps[..., 0], kps[..., 0])
            target["keypoints"] = kps
        return image, target


def collate(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Detectors take lists of images of different sizes: keep them as lists."""
    images, targets = zip(*batch)
    return list(images), list(targets)
