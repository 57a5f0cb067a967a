"""COCO evaluation of torchvision detector outputs with pycocotools' COCOeval.

:func:`to_coco_results` turns a detector's outputs into COCO result entries (boxes as xywh, masks as RLE,
keypoints as flat (x, y, v) lists, category ids of the annotation file); :func:`coco_evaluate` runs COCOeval
per IoU type and prints its summary exactly as the COCO tools do, returning the twelve (boxes / masks) or ten
(keypoints) summary numbers by name; :func:`evaluate` runs a detector over a loader and scores it so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine.distributed import all_gather_objects, broadcast_from_main, is_main_process, process_group_info
from ..io import write_text_atomic

IOU_TYPES = ("bbox", "segm", "keypoints")

# Names of COCOeval.stats, in its order.
BOX_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def to_coco_results(
    outputs: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    iou_types: Iterable[str],
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """Convert torchvision detector outputs to COCO result entries, one list per IoU type.

    Args:
        outputs: the detector's eval-mode outputs, one dict per image with ``boxes`` (N, 4) xyxy, ``scores``,
            ``labels`` (contiguous, 1..K), and ``masks`` (N, 1, H, W) probabilities or ``keypoints`` (N, K, 3).
        image_ids: the COCO image id of each output.
        category_ids: ``category_ids[label - 1]`` is the annotation file's id of contiguous label ``label``.
        iou_types: which of "bbox", "segm", "keypoints" to produce.
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        {iou_type: [result, ...]} in the COCO results format.
    """
    iou_types = tuple(iou_types)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"unknown IoU type(s) {unknown}; expected some of {IOU_TYPES}")
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in iou_types}
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]  # (N, 4) xyxy -> xywh
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        if any(not 1 <= lab <= len(category_ids) for lab in labels):
            raise ValueError(f"labels {labels} fall outside 1..{len(category_ids)} (the known categories)")
        cats = [int(category_ids[lab - 1]) for lab in labels]
        common = [{"image_id": int(image_id), "category_id": c, "score": s} for c, s in zip(cats, scores)]
        if "bbox" in results:
            for entry, box in zip(common, xywh.tolist()):
                results["bbox"].append({**entry, "bbox": [round(v, 3) for v in box]})
        if "segm" in results:
            if "masks" not in output:
                raise ValueError("IoU type 'segm' needs 'masks' in the outputs (a Mask R-CNN)")
            masks = (output["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)  # (N, H, W)
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # (H, W, N) column-major
            for entry, rle in zip(common, rles):
                rle["counts"] = rle["counts"].decode("ascii")
                results["segm"].append({**entry, "segmentation": rle})
        if "keypoints" in results:
            if "keypoints" not in output:
                raise ValueError("IoU type 'keypoints' needs 'keypoints' in the outputs (a Keypoint R-CNN)")
            kps = output["keypoints"].detach().float().cpu()  # (N, K, 3)
            for entry, kp in zip(common, kps):
                flat = kp.clone()
                flat[:, 2] = 1.0  # COCO results carry a visibility flag the metric does not use
                results["keypoints"].append({**entry, "keypoints": [round(v, 2) for v in flat.flatten().tolist()]})
    return results


def coco_evaluate(
    coco_gt: COCO,
    results: Mapping[str, list[dict[str, Any]]],
    kpt_oks_sigmas: Sequence[float] | None = None,
    image_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Run COCOeval for each IoU type in ``results`` and print its summary as the COCO tools do.

    Args:
        coco_gt: the ground truth (``COCO(annotation_file)``).
        results: {iou_type: result entries}, e.g. from :func:`to_coco_results`. An empty list is scored as
            no detections at all (AP 0 where there is ground truth), which ``COCO.loadRes`` cannot load.
        kpt_oks_sigmas: per-keypoint OKS sigmas; None keeps COCOeval's 17 COCO sigmas, which fit only 17
            keypoints.
        image_ids: evaluate these images only (default: every image of ``coco_gt``).

    Returns:
        {iou_type: {"AP": ..., "AP50": ..., "AP75": ..., ...}} named after COCOeval.stats.
    """
    summary: dict[str, dict[str, float]] = {}
    for iou_type, entries in results.items():
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown IoU type {iou_type!r}; expected one of {IOU_TYPES}")
        coco_dt = coco_gt.loadRes(list(entries)) if entries else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if iou_type == "keypoints":
            num_kps = _num_keypoints(coco_gt)
            if kpt_oks_sigmas is not None:
                if len(kpt_oks_sigmas) != num_kps:
                    raise ValueError(f"{len(kpt_oks_sigmas)} OKS sigmas given for {num_kps} keypoints")
                evaluator.params.kpt_oks_sigmas = np.asarray(kpt_oks_sigmas, dtype=np.float64)
            elif num_kps != len(evaluator.params.kpt_oks_sigmas):
                raise ValueError(
                    f"the dataset has {num_kps} keypoints; COCOeval's default sigmas are for "
                    f"{len(evaluator.params.kpt_oks_sigmas)}: pass kpt_oks_sigmas"
                )
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        print(f"IoU metric: {iou_type}")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else BOX_STAT_NAMES
        summary[iou_type] = {name: float(v) for name, v in zip(names, evaluator.stats)}
    return summary


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> str:
    """One line per IoU type: AP, AP50, AP75 in percent (the paper's numbers)."""
    label = {"bbox": "box", "segm": "mask", "keypoints": "keypoint"}
    return "\n".join(
        f"{label[t]:>8} AP {100 * s['AP']:5.1f}  AP50 {100 * s['AP50']:5.1f}  AP75 {100 * s['AP75']:5.1f}"
        for t, s in summary.items()
    )


def _empty_results(coco_gt: COCO) -> COCO:
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def _num_keypoints(coco_gt: COCO) -> int:
    for cat in coco_gt.dataset.get("categories", []):
        if cat.get("keypoints"):
            return len(cat["keypoints"])
    for ann in coco_gt.dataset.get("annotations", []):
        if ann.get("keypoints"):
            return len(ann["keypoints"]) // 3
    raise ValueError("the ground truth has no keypoints to evaluate")


def gather_results(
    results: dict[str, list[dict[str, Any]]], image_ids: Sequence[int]
) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
    """Merge the result lists of every process (identity when not distributed).

    A distributed sampler pads its shards by repeating images; an image evaluated by several processes keeps
    the results of the first one only, so that no detection is counted twice.

    Args:
        results: this process's {iou_type: entries}.
        image_ids: the images this process evaluated.

    Returns:
        (merged results, sorted ids of every evaluated image).
    """
    if not process_group_info().enabled:
        return results, sorted(set(int(i) for i in image_ids))
    parts = all_gather_objects((results, [int(i) for i in image_ids]))
    merged: dict[str, list[dict[str, Any]]] = {t: [] for t in results}
    seen: set[int] = set()
    for part_results, part_ids in parts:
        mine = set(part_ids) - seen
        seen |= mine
        for t, entries in part_results.items():
            merged[t].extend(e for e in entries if e["image_id"] in mine)
    return merged, sorted(seen)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    iou_types: Iterable[str],
    *,
    kpt_oks_sigmas: Iterable[float] | None = None,
    results_file: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run the detector over ``loader`` and score it with COCOeval (printed by the main process).

    Args:
        model: the detector (DDP-wrapped or not).
        loader: over a :class:`~nonlocalnet.detection.coco.CocoDetection`.
        iou_types: e.g. ("bbox", "segm") or ("bbox", "keypoints").
        kpt_oks_sigmas: OKS sigmas when the data has other than COCO's 17 keypoints.
        results_file: also write the detections (COCO results format) as json, {iou_type: [...]}.
        progress: show a progress bar (main process).

    Returns:
        {iou_type: {"AP": ..., "AP50": ..., ...}} on every process.
    """
    model.eval()
    dataset = loader.dataset
    iou_types = tuple(iou_types)
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in iou_types}
    seen: list[int] = []
    for images, targets in tqdm(loader, desc="evaluate", disable=not (is_main_process() and progress), leave=False):
        images = [im.to(device, non_blocking=True) for im in images]
        outputs = model(images)
        ids = [int(t["image_id"]) for t in targets]
        seen += ids
        for t, entries in to_coco_results(outputs, ids, dataset.category_ids, iou_types).items():
            results[t].extend(entries)
    results, evaluated = gather_results(results, seen)
    summary = None
    if is_main_process():
        if results_file is not None:
            write_text_atomic(results_file, json.dumps(results))
        sigmas = list(kpt_oks_sigmas) if kpt_oks_sigmas is not None else None
        summary = coco_evaluate(dataset.coco, results, kpt_oks_sigmas=sigmas, image_ids=evaluated)
    return broadcast_from_main(summary)


def iou_types_for(task: str) -> tuple[str, ...]:
    """The COCOeval IoU types of a detector task: boxes and masks, or boxes and keypoints."""
    return ("bbox", "segm") if task == "mask" else ("bbox", "keypoints")
