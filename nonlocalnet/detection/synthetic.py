"""The built-in detection data: small datasets of drawn objects, written as real COCO json + PNG files.

:func:`make_builtin_coco` draws the images and writes them to a folder, so that training and evaluation on them go
through exactly the reader used for COCO (:mod:`.coco`):

* ``"shapes"``: squares / rectangles, discs / ellipses and triangles of random colours on a noisy background,
  with polygon masks (an instances file with three categories);
* ``"figures"``: stick figures facing the viewer, with the 17 COCO person keypoints, RLE masks and the COCO
  skeleton (a person-keypoints file with one category).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

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
