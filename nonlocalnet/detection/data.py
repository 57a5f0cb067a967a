"""COCO-format detection data: a pycocotools reader, the training flip, and a built-in dataset made on the fly.

Two kinds of annotation files are read the same way: *instances* (boxes, masks, categories) for Mask R-CNN and
*person keypoints* (boxes, masks, 17 keypoints) for Keypoint R-CNN. Category ids of the file are mapped to
contiguous labels 1..K (0 is the background of torchvision's detectors) and mapped back when results are written.

The built-in dataset (:func:`make_builtin_coco`) draws images of simple objects and writes them to a folder as
real COCO json + PNG files, so that training and evaluation on it go through exactly the reader used for COCO:

* ``"shapes"``: squares / rectangles, discs / ellipses and triangles of random colours on a noisy background,
  with polygon masks (an instances file with three categories);
* ``"figures"``: stick figures facing the viewer, with the 17 COCO person keypoints, RLE masks and the COCO
  skeleton (a person-keypoints file with one category).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

BUILTIN_KINDS = ("shapes", "figures")

# The 17 COCO person keypoints, in COCO order, and the COCO skeleton (1-based pairs, as in the json).
COCO_KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
COCO_SKELETON = (
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
)

Target = dict[str, Tensor]


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
            :class:`RandomHorizontalFlip`).
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


# ----------------------------------------------------------------------------------------------------------
# The built-in dataset
# ----------------------------------------------------------------------------------------------------------


def make_builtin_coco(
    kind: str, root: str | Path, *, num_images: int, image_size: int = 128, seed: int = 0, split: str = "train"
) -> tuple[Path, Path]:
    """Draw a small COCO-format dataset and write it as ``root/<split>/*.png`` + ``root/<split>.json``.

    The same ``(kind, num_images, image_size, seed)`` always gives the same files.

    Args:
        kind: "shapes" (instances: square, disc, triangle; polygon masks) or "figures" (person keypoints).
        root: folder to write into (created).
        num_images: how many images.
        image_size: side of the square images in pixels (at least 64).
        seed: seed of the drawing.
        split: name of the image folder and json file.

    Returns:
        (image folder, annotation json path).
    """
    if kind not in BUILTIN_KINDS:
        raise ValueError(f"unknown built-in dataset {kind!r}; expected one of {', '.join(BUILTIN_KINDS)}")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64 pixels; got {image_size}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive; got {num_images}")
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    draw_one = _draw_shapes_image if kind == "shapes" else _draw_figures_image
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        canvas, objects = draw_one(rng, image_size)
        file_name = f"{image_id:06d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            obj.update(id=len(annotations) + 1, image_id=image_id, iscrowd=0)
            annotations.append(obj)
    if kind == "shapes":
        categories = [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(("square", "disc", "triangle"))
        ]
    else:
        categories = [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(COCO_KEYPOINT_NAMES),
                "skeleton": [list(pair) for pair in COCO_SKELETON],
            }
        ]
    dataset = {
        "info": {"description": f"nonlocalnet built-in '{kind}' dataset", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_file = root / f"{split}.json"
    ann_file.write_text(json.dumps(dataset))
    return image_dir, ann_file


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(0, 256, size=3)
    noise = rng.normal(0.0, 12.0, size=(size, size, 3))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background colour to be seen."""
    while True:
        c = rng.integers(0, 256, size=3)
        if np.abs(c.astype(int) - avoid.astype(int)).sum() > 150:
            return tuple(int(v) for v in c)


def _overlaps(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + 2 and b[0] < x1 + 2 and y0 < b[3] + 2 and b[1] < y1 + 2 for b in boxes)


def _draw_shapes_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    canvas = _background(rng, size)
    bg = np.asarray(canvas).reshape(-1, 3).mean(0)
    draw = ImageDraw.Draw(canvas)
    lo, hi = max(12, size // 8), max(16, size * 3 // 8)
    placed: list[tuple[float, float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
            x0, y0 = float(rng.uniform(1, size - w - 1)), float(rng.uniform(1, size - h - 1))
            if not _overlaps((x0, y0, x0 + w, y0 + h), placed):
                break
        else:
            continue
        placed.append((x0, y0, x0 + w, y0 + h))
        category = int(rng.integers(1, 4))
        if category == 1:  # square / rectangle
            polygon = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
        elif category == 2:  # disc / ellipse
            cx, cy = x0 + w / 2, y0 + h / 2
            polygon = [
                (cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a))
                for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)
            ]
        else:  # triangle, flat base at the bottom
            apex = x0 + float(rng.uniform(0.2, 0.8)) * w
            polygon = [(apex, y0), (x0 + w, y0 + h), (x0, y0 + h)]
        draw.polygon(polygon, fill=_colour(rng, bg))
        flat = [round(v, 2) for point in polygon for v in point]
        rle = mask_utils.frPyObjects([flat], size, size)
        xs, ys = flat[0::2], flat[1::2]
        objects.append(
            {
                "category_id": category,
                "segmentation": [flat],
                "area": float(mask_utils.area(mask_utils.merge(rle))),
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            }
        )
    return canvas, objects


def _figure_keypoints(rng: np.random.Generator, height: float) -> np.ndarray:
    """17 COCO keypoints (x, y) of a front-facing stick figure of the given height, head top at y = 0,
    centred on x = 0. The person's left is on the image's right (+x)."""
    h = height
    kp = np.zeros((17, 2))
    kp[0] = (0.0, 0.08 * h)  # nose
    kp[1], kp[2] = (0.025 * h, 0.055 * h), (-0.025 * h, 0.055 * h)  # eyes
    kp[3], kp[4] = (0.055 * h, 0.07 * h), (-0.055 * h, 0.07 * h)  # ears
    shoulder_w = rng.uniform(0.11, 0.14) * h
    kp[5], kp[6] = (shoulder_w, 0.2 * h), (-shoulder_w, 0.2 * h)
    for side, (s, e, w) in ((1.0, (5, 7, 9)), (-1.0, (6, 8, 10))):
        upper = rng.uniform(0.1, 2.4)  # angle from hanging down, outwards
        fore = upper + rng.uniform(-0.6, 0.9)
        kp[e] = kp[s] + 0.16 * h * np.array([side * math.sin(upper), math.cos(upper)])
        kp[w] = kp[e] + 0.14 * h * np.array([side * math.sin(fore), math.cos(fore)])
    hip_w = rng.uniform(0.07, 0.09) * h
    kp[11], kp[12] = (hip_w, 0.52 * h), (-hip_w, 0.52 * h)
    for side, (hp, k, a) in ((1.0, (11, 13, 15)), (-1.0, (12, 14, 16))):
        thigh = rng.uniform(-0.05, 0.5)
        shin = thigh + rng.uniform(-0.4, 0.2)
        kp[k] = kp[hp] + 0.24 * h * np.array([side * math.sin(thigh), math.cos(thigh)])
        kp[a] = kp[k] + 0.23 * h * np.array([side * math.sin(shin), math.cos(shin)])
    return kp


def _draw_figures_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    canvas = _background(rng, size)
    bg = np.asarray(canvas).reshape(-1, 3).mean(0)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[float, float, float, float]] = []
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):
            height = float(rng.uniform(0.4, 0.9) * size)
            kp = _figure_keypoints(rng, height)
            pad = 0.08 * height  # head radius and limb width
            lo, hi = kp.min(0) - pad, kp.max(0) + pad
            if np.any(hi - lo > size - 4):
                continue
            offset = rng.uniform(2 - lo, size - 2 - hi)
            box = (*(lo + offset), *(hi + offset))
            if not _overlaps(box, placed):
                break
        else:
            continue
        placed.append(box)
        kp = kp + offset
        colour = _colour(rng, bg)
        mask_img = Image.new("L", (size, size), 0)
        mask_draw = ImageDraw.Draw(mask_img)
        width = max(2, int(round(0.04 * height)))
        radius = 0.075 * height
        head = (kp[0, 0] - radius, kp[0, 1] - radius * 1.1, kp[0, 0] + radius, kp[0, 1] + radius * 0.9)
        neck = (kp[5] + kp[6]) / 2
        pelvis = (kp[11] + kp[12]) / 2
        limbs = [(5, 6), (11, 12), (5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]
        for d, fill in ((draw, colour), (mask_draw, 1)):
            d.ellipse(head, fill=fill)
            d.line([tuple(neck), (kp[0, 0], head[3])], fill=fill, width=width)
            d.line([tuple(neck), tuple(pelvis)], fill=fill, width=width)
            for a, b in limbs:
                d.line([tuple(kp[a]), tuple(kp[b])], fill=fill, width=width)
        # eyes as dots of a contrasting colour, so the face has something to locate
        eye_colour = tuple(255 - c for c in colour)
        for i in (1, 2):
            r = max(1.0, 0.012 * height)
            draw.ellipse((kp[i, 0] - r, kp[i, 1] - r, kp[i, 0] + r, kp[i, 1] + r), fill=eye_colour)
        mask = np.asarray(mask_img, dtype=np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        keypoints = []
        for x, y in kp:
            keypoints += [round(float(x), 2), round(float(y), 2), 2]
        objects.append(
            {
                "category_id": 1,
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "keypoints": keypoints,
                "num_keypoints": 17,
            }
        )
    return canvas, objects
