"""Reading COCO-format detection files: the up-front check of an annotation file and the dataset over it.

Two kinds of annotation files are read the same way: *instances* (boxes, masks, categories) for Mask R-CNN and
*person keypoints* (boxes, masks, 17 keypoints) for Keypoint R-CNN. Category ids of the file are mapped to
contiguous labels 1..K (0 is the background of torchvision's detectors) and mapped back when results are written.
A file that breaks the format where this code relies on it fails in :func:`read_coco`, naming the file, the field
and the entries, instead of mid-epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from .transforms import Target


class CocoDetection(Dataset):
    """Images and targets of a COCO-format annotation file, in the form torchvision's detectors take.

    Each item is ``(image, target)``: image (3, H, W) float in [0, 1]; target with ``boxes`` (N, 4) xyxy in
    pixels, ``labels`` (N,) contiguous in 1..K, ``masks`` (N, H, W) uint8 (when ``masks``), ``keypoints``
    (N, K, 3) float as (x, y, visibility) (when ``keypoints``), ``area``, ``iscrowd`` and ``image_id`` (the
    COCO id, a 0-dim int64 tensor). Crowd regions and degenerate boxes are left out of the targets.

    Args:
        images: folder holding the files named in the json's ``images[].file_name``.
        annotations: the COCO json file.
        masks: decode instance masks (Mask R-CNN).
        keypoints: read keypoints (Keypoint R-CNN); the file's categories must list ``keypoints`` names.
        train: keep only images with at least one usable annotation (and, with ``keypoints``, at least one
            visible keypoint), as training needs something to learn from; evaluation keeps every image.
        transform: optional callable ``(image, target) -> (image, target)`` applied last (e.g.
            :class:`~nonlocalnet.detection.transforms.RandomHorizontalFlip`).
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path,
        *,
        masks: bool = True,
        keypoints: bool = False,
        train: bool = False,
        transform: Callable[[Tensor, Target], tuple[Tensor, Target]] | None = None,
    ) -> None:
        self.images = Path(images)
        self.annotations = Path(annotations)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotations}")
        if not self.images.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.images}")
        self.coco = read_coco(self.annotations, masks=masks)
        self.masks = masks
        self.keypoints = keypoints
        self.transform = transform
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise ValueError(f"{self.annotations} lists no categories")
        self.label_of_category = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        self.keypoint_names: tuple[str, ...] = ()
        if keypoints:
            self.keypoint_names = _keypoint_names(self.coco, self.annotations)
            count = 3 * len(self.keypoint_names)
            bad = [
                a["id"]
                for a in self.coco.dataset["annotations"]
                if a.get("keypoints") is not None
                and not (
                    isinstance(a["keypoints"], list)
                    and len(a["keypoints"]) == count
                    and all(_is_number(v) for v in a["keypoints"])
                )
            ]
            if bad:
                raise CocoFormatError(
                    f"{self.annotations}: annotations whose 'keypoints' are not {count} numbers "
                    f"(x, y, visibility for each of the {count // 3} keypoints) (ids): "
                    f"{', '.join(map(str, bad[:3]))}"
                )
        ids = sorted(self.coco.getImgIds())
        if train:
            ids = [i for i in ids if self._usable(self.coco.loadAnns(self.coco.getAnnIds(imgIds=i)))]
            if not ids:
                raise ValueError(f"{self.annotations} has no image with a usable annotation to train on")
        self.ids = ids

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return len(self.category_ids) + 1

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    def flip_permutation(self) -> list[int]:
        """For each keypoint, the index of its mirror image ("left_x" <-> "right_x"; others map to themselves)."""
        index = {name: i for i, name in enumerate(self.keypoint_names)}
        perm = []
        for name in self.keypoint_names:
            if name.startswith("left_"):
                mirror = "right_" + name[len("left_") :]
            elif name.startswith("right_"):
                mirror = "left_" + name[len("right_") :]
            else:
                mirror = name
            perm.append(index.get(mirror, index[name]))
        return perm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = self.images / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {info['file_name']!r} (id {image_id}) not found in {self.images}")
        try:
            with Image.open(path) as img:
                image = pil_to_tensor(img.convert("RGB")).float().div_(255)  # (3, H, W)
        except (OSError, Image.DecompressionBombError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(
                f"image {info['file_name']!r} (id {image_id}) in {self.images} is not a readable "
                f"image: {' '.join(str(e).split())[:160]}"
            ) from None
        height, width = image.shape[1:]
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # (N, 4) xywh
        boxes[:, 2:] += boxes[:, :2]  # (N, 4) xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        target: Target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([self.label_of_category[a["category_id"]] for a in anns], dtype=torch.int64),
            "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }
        if self.masks:
            masks = [self.coco.annToMask(a) for a in anns]
            target["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            )  # (N, H, W)
        if self.keypoints:
            kps = [a.get("keypoints") or [0.0] * (3 * self.num_keypoints) for a in anns]
            target["keypoints"] = torch.tensor(kps, dtype=torch.float32).reshape(-1, self.num_keypoints, 3)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def _usable(self, anns: list[dict[str, Any]]) -> bool:
        anns = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        if self.keypoints:
            return any(a.get("num_keypoints", 0) > 0 for a in anns)
        return bool(anns)


class CocoFormatError(ValueError):
    """An annotation file that does not follow the COCO format where this code relies on it."""


def read_coco(path: str | Path, *, masks: bool = True) -> COCO:
    """A COCO annotation file, checked up front: every field training and COCOeval read is present and
    consistent, so a bad file fails here with its name and the offending entries instead of mid-epoch.

    Raises:
        CocoFormatError: naming the file, the field and (up to three of) the entries.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path} is not valid JSON: {e}") from None

    def fail(message: str, bad: list[Any] | None = None) -> None:
        if bad:
            shown = ", ".join(map(str, bad[:3])) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            message = f"{message}: {shown}"
        raise CocoFormatError(f"{path}: {message}")

    if not isinstance(data, dict):
        fail(f"holds a {type(data).__name__}, not a COCO dict with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(
                f"no {key!r} list"
                + (
                    " (every annotation file lists its categories, an evaluation file its annotations too)"
                    if key != "images"
                    else ""
                )
            )
    if not data["categories"]:
        fail("the 'categories' list is empty")
    bad = [c for c in data["categories"] if not isinstance(c, dict) or "id" not in c]
    if bad:
        fail("categories without an 'id'", bad)
    bad = [
        i.get("id", i) if isinstance(i, dict) else i
        for i in data["images"]
        if not isinstance(i, dict) or "id" not in i or "file_name" not in i
    ]
    if bad:
        fail("images without 'id' or 'file_name'", bad)
    bad = [c["id"] for c in data["categories"] if not _is_id(c["id"])]
    bad += [i["id"] for i in data["images"] if not _is_id(i["id"]) or not isinstance(i["file_name"], str)]
    if bad:
        fail("ids that are not integers, or a 'file_name' that is no string", bad)
    bad = [
        i["id"] for i in data["images"] if not all(_is_id(i.get(side)) and i[side] > 0 for side in ("height", "width"))
    ]
    if bad:
        fail("images whose 'height' or 'width' is not a positive integer (ids)", bad)
    categories = {c["id"] for c in data["categories"]}
    images = {i["id"] for i in data["images"]}
    anns = data["annotations"]
    bad = [
        a.get("id", a) if isinstance(a, dict) else a
        for a in anns
        if not isinstance(a, dict) or "id" not in a or "image_id" not in a
    ]
    if bad:
        fail("annotations without 'id' or 'image_id'", bad)
    bad = [
        a["id"] for a in anns if not _is_id(a["id"]) or not _is_id(a["image_id"]) or not _is_id(a.get("category_id", 0))
    ]
    if bad:
        fail("annotations whose 'id', 'image_id' or 'category_id' is not an integer", bad)
    bad = [
        a["id"] for a in anns if "num_keypoints" in a and not (_is_id(a["num_keypoints"]) and a["num_keypoints"] >= 0)
    ]
    if bad:
        fail("annotations whose 'num_keypoints' is not a non-negative integer (ids)", bad)
    bad = [a["id"] for a in anns if "area" in a and not _is_number(a["area"])]
    if bad:
        fail("annotations whose 'area' is not a number (ids)", bad)
    bad = [a["id"] for a in anns if "iscrowd" in a and a["iscrowd"] not in (0, 1)]
    if bad:
        fail("annotations whose 'iscrowd' is not 0 or 1 (ids)", bad)
    bad = [
        a["id"]
        for a in anns
        if "segmentation" in a and a["segmentation"] is not None and not _valid_segmentation(a["segmentation"])
    ]
    if bad:
        fail(
            "annotations whose 'segmentation' is neither polygons (lists of numbers) nor an RLE ({'size': [h, w], "
            "'counts': ...}) (ids)",
            bad,
        )
    for field in ("bbox", "category_id"):
        bad = [a["id"] for a in anns if field not in a]
        if bad:
            fail(f"annotations without {field!r} (ids)", bad)
    bad = [
        a["id"]
        for a in anns
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4 and all(_is_number(v) for v in a["bbox"]))
    ]
    if bad:
        fail("annotations whose 'bbox' is not [x, y, width, height] (ids)", bad)
    bad = [f"{a['id']} (category_id {a['category_id']})" for a in anns if a["category_id"] not in categories]
    if bad:
        fail(f"annotations of categories the file does not list ({sorted(categories)})", bad)
    bad = [f"{a['id']} (image_id {a['image_id']})" for a in anns if a["image_id"] not in images]
    if bad:
        fail("annotations of images the file does not list", bad)
    if masks:
        bad = [a["id"] for a in anns if not a.get("iscrowd", 0) and not _has_mask(a.get("segmentation"))]
        if bad:
            fail(
                "annotations without a mask ('segmentation' missing or empty; Mask R-CNN needs a polygon or RLE "
                "per object; drop them or train a box-only model) (ids)",
                bad,
            )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_segmentation(segmentation: Any) -> bool:
    """Polygons (lists of an even number of numbers), or an RLE whose size is two non-negative integers and whose
    counts are run lengths (non-negative integers summing to h x w) or pycocotools' compressed string (characters
    48..111)."""
    if isinstance(segmentation, list):
        return all(isinstance(p, list) and len(p) % 2 == 0 and all(_is_number(v) for v in p) for p in segmentation)
    if not isinstance(segmentation, dict):
        return False
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not (
        isinstance(size, list) and len(size) == 2 and all(_is_id(v) and not isinstance(v, str) and v >= 0 for v in size)
    ):
        return False
    if isinstance(counts, list):
        return all(_is_id(v) and not isinstance(v, str) and v >= 0 for v in counts) and sum(counts) == size[0] * size[1]
    if not (isinstance(counts, str) and all(48 <= ord(c) <= 111 for c in counts)):
        return False
    runs = _rle_string_counts(counts)
    return runs is not None and all(r >= 0 for r in runs) and sum(runs) == size[0] * size[1]


def _rle_string_counts(text: str) -> list[int] | None:
    """The run lengths of pycocotools' compressed RLE string (None: it ends inside a number).

    Each number is written in 5-bit groups, least significant first, as characters 48 + group, 0x20 set on every
    group but the last, 0x10 of the last one its sign; from the third number on, each is stored as the difference
    to the number two before it.
    """
    runs: list[int] = []
    at = 0
    while at < len(text):
        value, shift, more = 0, 0, True
        while more:
            if at >= len(text):
                return None
            group = ord(text[at]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            at += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _has_mask(segmentation: Any) -> bool:
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    return isinstance(segmentation, list) and any(isinstance(p, list) and len(p) >= 6 for p in segmentation)


def _keypoint_names(coco: COCO, path: Path) -> tuple[str, ...]:
    names = None
    for cat in coco.loadCats(coco.getCatIds()):
        cat_names = tuple(cat.get("keypoints") or ())
        if not cat_names:
            raise ValueError(
                f"{path}: category {cat.get('name')!r} lists no 'keypoints' names; a keypoint "
                "dataset needs them (person_keypoints_*.json has them)"
            )
        if names is not None and cat_names != names:
            raise ValueError(f"{path}: categories list different keypoints; one keypoint head needs one set")
        names = cat_names
    assert names is not None
    return names
