"""The datasets and loaders of a detection config: COCO files on disk or the built-in drawn data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

from ..engine.distributed import process_group_info
from .coco import CocoDetection
from .synthetic import make_builtin_coco
from .transforms import collate


def build_datasets(
    data: Mapping[str, Any], task: str, *, train: bool = True
) -> tuple[CocoDetection | None, CocoDetection]:
    """The (train, val) datasets of a config's ``data`` section; the built-in one is drawn into a temp folder
    (removed at exit). ``train=False`` builds only the validation set."""
    keypoints = task == "keypoint"
    if data["builtin"] is not None:
        root = Path(tempfile.mkdtemp(prefix=f"nonlocalnet-{data['builtin']}-"))
        atexit.register(shutil.rmtree, root, True)
        size, seed = data["image_size"], data["seed"]
        val_files = make_builtin_coco(
            data["builtin"], root, num_images=data["num_val"], image_size=size, seed=seed + 1, split="val"
        )
        train_files = (
            make_builtin_coco(
                data["builtin"], root, num_images=data["num_train"], image_size=size, seed=seed, split="train"
            )
            if train
            else None
        )
    else:
        base = Path(data["root"]) if data["root"] else Path(".")
        val_files = (base / data["val_images"], base / data["val_annotations"])
        train_files = None
        if train:
            if not (data["train_images"] and data["train_annotations"]):
                raise ValueError("training needs data.train_images and data.train_annotations")
            train_files = (base / data["train_images"], base / data["train_annotations"])
    masks = task == "mask"
    val = CocoDetection(*val_files, masks=masks, keypoints=keypoints)
    if not val.coco.dataset["annotations"]:
        raise ValueError(
            f"{val.annotations} has no annotations: there is nothing to score AP against (COCOeval would report -1)"
        )
    train_set = None
    if train_files is not None:
        train_set = CocoDetection(*train_files, masks=masks, keypoints=keypoints, train=True)
        if train_set.category_ids != val.category_ids:
            raise ValueError(f"train and val list different categories: {train_set.category_ids} vs {val.category_ids}")
    return train_set, val


class SkipFirst(Sampler[int]):
    """``sampler``'s order without its first ``count`` indices (an epoch resumed in its middle)."""

    def __init__(self, sampler: Sampler[int], count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.sampler), self.count, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.count, 0)


def make_loader(
    dataset: CocoDetection, batch_size: int, workers: int, *, train: bool, seed: int = 0, epoch: int = 0, skip: int = 0
) -> DataLoader:
    """A loader of ``dataset``: in training, epoch ``epoch``'s order, drawn from (seed, epoch) alone, in one process
    as in many, so a resumed run continues with the interrupted epoch's order; ``skip``: leave out this process's
    first items of the epoch. At most as many workers as the cores this process may run on."""
    group = process_group_info()
    if train or group.enabled:
        sampler = DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank, shuffle=train, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = SequentialSampler(dataset)
    workers = min(workers, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SkipFirst(sampler, skip) if skip else sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
    )
