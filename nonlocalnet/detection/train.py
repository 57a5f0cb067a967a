"""Training and evaluation of torchvision's detectors with NL blocks: plain functions over the engine's layers.

``main(config)`` builds the data (COCO files or the built-in dataset), the detector, SGD with linear warmup and
step decay, and runs ``train_one_epoch`` / ``evaluate`` per epoch, writing ``checkpoint.pth`` and ``log.jsonl`` to
the output folder. What a run relies on is the video trainer's: processes and devices from
:mod:`nonlocalnet.engine.distributed` (``torchrun --nproc_per_node N``: NCCL on GPUs, gloo on CPUs; each process
trains on its shard and the COCO evaluation gathers every process's detections), checkpoints written atomically and
read without running code (:mod:`~nonlocalnet.engine.checkpoint`), one run per directory and resumes that refuse
another config (:mod:`~nonlocalnet.engine.rundir`), the log through :class:`~nonlocalnet.engine.logger.MetricLogger`,
and configs through :mod:`nonlocalnet.engine.config` (:mod:`.config` is the detection schema).
"""
from __future__ import annotations

import atexit
import bisect
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from tqdm import tqdm

from ..engine.checkpoint import CheckpointError, load_checkpoint, remove_debris, restore_training_state, \
    write_checkpoint
from ..engine.config import to_plain
from ..engine.distributed import DistInfo, all_reduce_mean, barrier, broadcast_from_main, check_same_config, \
    gather_rng_states, init_distributed, is_main_process, process_group_info, resolve_device, unwrap_model
from ..engine.logger import MetricLogger
from ..engine.signals import check_interrupted
from ..engine.rundir import check_resume_config, check_unused, claim_run, lock_run_directory, record_run, \
    truncate_jsonl
from ..models.weights import load_state_dict_or_raise
from .builders import build_detector
from .config import complete_config
from .data import CocoDetection, RandomHorizontalFlip, collate, make_builtin_coco
from .evaluate import coco_evaluate, format_summary, gather_results, to_coco_results

CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"
# what a resume needs from a checkpoint
TRAINING_STATE = ("model", "optimizer", "lr_scheduler", "epoch")
# config keys a resumed run may change: where data and output are, how many loader processes, how much is printed
RESUMABLE_DETECTION_KEYS = ("data.root", "train.workers", "train.print_freq", "output_dir")


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def build_datasets(data: Mapping[str, Any], task: str, *, train: bool = True
                   ) -> tuple[CocoDetection | None, CocoDetection]:
    """The (train, val) datasets of a config's ``data`` section; the built-in one is drawn into a temp folder
    (removed at exit). ``train=False`` builds only the validation set."""
    keypoints = task == "keypoint"
    if data["builtin"] is not None:
        root = Path(tempfile.mkdtemp(prefix=f"nonlocalnet-{data['builtin']}-"))
        atexit.register(shutil.rmtree, root, True)
        size, seed = data["image_size"], data["seed"]
        val_files = make_builtin_coco(data["builtin"], root, num_images=data["num_val"], image_size=size,
                                      seed=seed + 1, split="val")
        train_files = (make_builtin_coco(data["builtin"], root, num_images=data["num_train"], image_size=size,
                                         seed=seed, split="train") if train else None)
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
        raise ValueError(f"{val.annotations} has no annotations: there is nothing to score AP against (COCOeval "
                         f"would report -1)")
    train_set = None
    if train_files is not None:
        train_set = CocoDetection(*train_files, masks=masks, keypoints=keypoints, train=True)
        if train_set.category_ids != val.category_ids:
            raise ValueError(f"train and val list different categories: {train_set.category_ids} vs "
                             f"{val.category_ids}")
    return train_set, val


def make_loader(dataset: CocoDetection, batch_size: int, workers: int, *, train: bool, seed: int = 0
                ) -> DataLoader:
    """Training order from (seed, epoch) alone, in one process as in many (``set_epoch``), so a resumed run
    continues with the interrupted epoch's order instead of replaying epoch 0's."""
    group = process_group_info()
    if train or group.enabled:
        sampler = DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank, shuffle=train,
                                     seed=seed)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=False, persistent_workers=False)


# ----------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------

def make_lr_lambda(iters_per_epoch: int, lr_steps: Iterable[int], gamma: float, warmup_iters: int,
                   warmup_factor: float):
    """lr multiplier at iteration ``it``: linear warmup from ``warmup_factor`` over ``warmup_iters``, times
    ``gamma`` for every step epoch passed."""
    step_iters = sorted(int(s) * iters_per_epoch for s in lr_steps)

    def factor(it: int) -> float:
        warm = 1.0
        if it < warmup_iters:
            warm = warmup_factor + (1.0 - warmup_factor) * it / warmup_iters
        return warm * gamma ** bisect.bisect_right(step_iters, it)

    return factor


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device,
                    epoch: int, lr_scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                    scaler: torch.amp.GradScaler | None = None, print_freq: int = 20,
                    max_iters: int | None = None) -> dict[str, float]:
    """One pass over ``loader``; the lr scheduler steps every iteration.

    Returns:
        the mean of each loss (and of their sum, "loss") over the epoch, averaged across processes.
    """
    model.train()
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    sums: dict[str, float] = {}
    count = 0
    total = len(loader) if max_iters is None else min(max_iters, len(loader))
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", disable=not is_main_process(), leave=False)
    start = time.time()
    for it, (images, targets) in enumerate(bar):
        check_interrupted()  # also at every step: the loader workers' start swallows a signal's exception
        if it >= total:
            break
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        logged = _mean_over_processes({**{k: v.detach() for k, v in losses.items()}, "loss": loss.detach()})
        if not math.isfinite(logged["loss"]):
            raise FloatingPointError(f"loss is {logged['loss']} at epoch {epoch} iteration {it}: {logged}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr_scheduler.step()
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.2e}")
        if print_freq and (it % print_freq == 0 or it == total - 1) and is_main_process():
            parts = " ".join(f"{k} {v:.4f}" for k, v in logged.items())
            tqdm.write(f"epoch {epoch} [{it + 1}/{total}] lr {lr:.2e} {parts} ({time.time() - start:.0f}s)")
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, iou_types: Iterable[str], *,
             kpt_oks_sigmas: Iterable[float] | None = None,
             results_file: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run the detector over ``loader`` and score it with COCOeval (printed by the main process).

    Args:
        model: the detector (DDP-wrapped or not).
        loader: over a :class:`CocoDetection`.
        iou_types: e.g. ("bbox", "segm") or ("bbox", "keypoints").
        kpt_oks_sigmas: OKS sigmas when the data has other than COCO's 17 keypoints.
        results_file: also write the detections (COCO results format) as json, {iou_type: [...]}.

    Returns:
        {iou_type: {"AP": ..., "AP50": ..., ...}} on every process.
    """
    model.eval()
    dataset: CocoDetection = loader.dataset
    iou_types = tuple(iou_types)
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in iou_types}
    seen: list[int] = []
    for images, targets in tqdm(loader, desc="evaluate", disable=not is_main_process(), leave=False):
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
            Path(results_file).write_text(json.dumps(results))
        sigmas = list(kpt_oks_sigmas) if kpt_oks_sigmas is not None else None
        summary = coco_evaluate(dataset.coco, results, kpt_oks_sigmas=sigmas, image_ids=evaluated)
    return broadcast_from_main(summary)


def iou_types_for(task: str) -> tuple[str, ...]:
    return ("bbox", "segm") if task == "mask" else ("bbox", "keypoints")


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------

def main(config: Mapping[str, Any], *, output_dir: str | Path | None = None, resume: str | Path | None = None,
         backbone_weights: str | Path | None = None, device: str | None = None,
         max_iters_per_epoch: int | None = None, evaluate_every: int = 1, allow_config_change: bool = False
         ) -> dict[str, dict[str, float]]:
    """Train a detector as the config says, evaluating on the val set; returns the last evaluation.

    Args:
        config: a complete config (:func:`~nonlocalnet.detection.config.load_config`).
        output_dir: where ``checkpoint.pth`` and ``log.jsonl`` go (None: nowhere).
        resume: a checkpoint to continue from (model, optimizer, lr schedule, epoch, random state); its config
            must be this one (unless ``allow_config_change``). Without it, ``output_dir`` must not hold a run.
        backbone_weights: a local torchvision ResNet state dict to start the backbone from.
        device: "cpu", "cuda" or None (CUDA when available).
        max_iters_per_epoch: cut epochs short (smoke tests).
        evaluate_every: evaluate after every this many epochs (and always after the last).
        allow_config_change: resume even when the config differs from the checkpoint's (the changes are printed).
    """
    device_ = resolve_device(device or "auto")
    info = init_distributed(device_)
    check_same_config(config)
    out = Path(output_dir) if output_dir is not None else None
    lock = lock_run_directory(out) if out is not None and info.is_main else None  # one run at a time in ``out``
    try:
        return _main(config, out, resume, backbone_weights, device_, info, max_iters_per_epoch, evaluate_every,
                     allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _main(config: Mapping[str, Any], out: Path | None, resume: str | Path | None, backbone_weights: str | Path | None,
          device_: torch.device, info: DistInfo, max_iters_per_epoch: int | None, evaluate_every: int,
          allow_config_change: bool) -> dict[str, dict[str, float]]:
    """:func:`main` once the run directory is this process's."""
    state = _resume_state(resume, config, allow_config_change) if resume is not None else None
    if out is not None and state is None:
        check_unused(out)  # a directory of any run, video or detection
    run = None
    if out is not None and info.is_main:  # which run this is: the directory's own, or a new one (never a mix)
        run = claim_run(out, config, state, resume, has_checkpoints=(out / CHECKPOINT_NAME).exists(),
                        explicit=True, allowed=RESUMABLE_DETECTION_KEYS,
                        say=lambda message: print(f"warning: {message}", flush=True))
    model_cfg, data_cfg, train_cfg = config["model"], config["data"], config["train"]
    task = model_cfg.get("task")
    torch.manual_seed(train_cfg["seed"] + info.rank)
    train_set, val_set = build_datasets(data_cfg, task)
    assert train_set is not None
    if train_cfg["hflip"]:
        perm = train_set.flip_permutation() if task == "keypoint" else None
        train_set.transform = RandomHorizontalFlip(train_cfg["hflip"], keypoint_permutation=perm)
    model = build_detector(model_cfg, num_classes=train_set.num_classes,
                           num_keypoints=train_set.num_keypoints or None, backbone_weights=backbone_weights)
    model.to(device_)
    if train_cfg["sync_bn"] and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device_.index] if device_.type == "cuda" else None)

    batch = train_cfg["batch_size"]
    lr = train_cfg["lr"] * batch * info.world_size / train_cfg["lr_reference_batch"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"])
    train_loader = make_loader(train_set, batch, train_cfg["workers"], train=True, seed=train_cfg["seed"])
    val_loader = make_loader(val_set, batch, train_cfg["workers"], train=False)
    iters = len(train_loader) if max_iters_per_epoch is None else min(max_iters_per_epoch, len(train_loader))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(
        iters, train_cfg["lr_steps"], train_cfg["lr_gamma"], train_cfg["warmup_iters"], train_cfg["warmup_factor"]))
    scaler = None
    if train_cfg["amp"]:
        if device_.type != "cuda":
            raise ValueError("train.amp needs a CUDA device")
        scaler = torch.amp.GradScaler("cuda")
    meta = {"category_ids": train_set.category_ids, "num_classes": train_set.num_classes,
            "keypoint_names": list(train_set.keypoint_names)}

    start_epoch = 0
    if state is not None:
        restore_training_state(state, resume, unwrap_model(model), optimizer, device_, info, scaler=scaler,
                               lr_scheduler=lr_scheduler, mismatch="holds weights of another detector")
        start_epoch = state["epoch"] + 1
    if out is not None and info.is_main:  # every check passed: the directory is this run's
        record_run(out, run)
        remove_debris(out)
        if state is not None:
            truncate_jsonl(out / LOG_NAME, lambda row: row.get("epoch", -1) < start_epoch)
    logger = MetricLogger(out, enabled=info.is_main, tensorboard=False, filename=LOG_NAME,
                          run_id=run.run_id if run else None)

    if info.is_main:
        print(f"detector: {task} {model_cfg.get('arch')} on {len(train_set)} train / {len(val_set)} val images, "
              f"{info.world_size} process(es) x {batch} images, lr {lr:g}, {train_cfg['epochs']} epochs of {iters} "
              f"iterations, device {device_}")
    summary: dict[str, dict[str, float]] = {}
    epochs = train_cfg["epochs"]
    for epoch in range(start_epoch, epochs):
        check_interrupted()  # a SIGINT / SIGTERM whose exception was swallowed (see engine.signals)
        losses = train_one_epoch(model, optimizer, train_loader, device_, epoch, lr_scheduler, scaler=scaler,
                                 print_freq=train_cfg["print_freq"], max_iters=max_iters_per_epoch)
        last = epoch == epochs - 1
        if last or (epoch + 1) % evaluate_every == 0:
            summary = evaluate(model, val_loader, device_, iou_types_for(task),
                               kpt_oks_sigmas=data_cfg["kpt_oks_sigmas"])
            if info.is_main:
                print(f"epoch {epoch}\n{format_summary(summary)}")
        rng = gather_rng_states(device_) if out is not None else None  # a collective: every process takes part
        if out is not None and info.is_main:
            write_checkpoint({"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                              "lr_scheduler": lr_scheduler.state_dict(),
                              "scaler": scaler.state_dict() if scaler is not None else None,
                              "epoch": epoch, "config": to_plain(config), "meta": meta, "rng_per_rank": rng,
                              "run": run.as_dict() if run else None},
                             out / CHECKPOINT_NAME)
        logger.write({"epoch": epoch, "losses": losses, "eval": summary if summary else None})
    logger.close()
    barrier()
    return summary


def _resume_state(resume: str | Path, config: Mapping[str, Any], allow_change: bool) -> dict[str, Any]:
    """The checkpoint to resume from, read without running code and checked: a detect-train checkpoint of this
    config (or, with ``allow_change``, of another, the changes printed)."""
    state = load_checkpoint(resume)
    if not set(TRAINING_STATE) <= set(state):
        raise CheckpointError(f"{resume} is not a detect-train checkpoint (needs {', '.join(TRAINING_STATE)})")
    check_resume_config(state.get("config"), config, resume, allow_change=allow_change,
                        warn=lambda message: print(f"warning: {message}", flush=True),
                        allowed=RESUMABLE_DETECTION_KEYS)
    return state


def test(checkpoint: str | Path, *, config: Mapping[str, Any] | None = None, overrides: Iterable[str] = (),
         device: str | None = None, results_file: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a checkpoint written by :func:`main` on the val set of its config (or of ``config``).

    Args:
        checkpoint: ``checkpoint.pth`` of a detect-train run.
        config: the config to evaluate with; None: the one the checkpoint recorded.
        overrides: ``key=value`` changes of that config (e.g. ``data.num_val=200``).
        device: "cpu", "cuda" or None (CUDA when available).
        results_file: also write the detections (COCO results format) as json.
    """
    device_ = resolve_device(device or "auto")
    init_distributed(device_)
    state = load_checkpoint(checkpoint)
    if "model" not in state or "config" not in state:
        raise CheckpointError(f"{checkpoint} is not a detection checkpoint written by detect-train "
                              "(needs 'model' and 'config')")
    config = complete_config(config if config is not None else state["config"], overrides)
    task = config["model"].get("task")
    _, val_set = build_datasets(config["data"], task, train=False)
    meta = state.get("meta", {})
    if meta.get("category_ids") and list(meta["category_ids"]) != val_set.category_ids:
        raise ValueError(f"the checkpoint was trained on categories {meta['category_ids']}; the val set lists "
                         f"{val_set.category_ids}")
    model_cfg = {k: v for k, v in config["model"].items() if k != "backbone_weights"}  # the checkpoint has them
    model = build_detector(model_cfg, num_classes=meta.get("num_classes", val_set.num_classes),
                           num_keypoints=len(meta.get("keypoint_names", ())) or val_set.num_keypoints or None)
    load_state_dict_or_raise(model, state["model"], f"{checkpoint} does not fit the config's detector",
                             CheckpointError, source=str(checkpoint))
    model.to(device_)
    loader = make_loader(val_set, config["train"]["batch_size"], config["train"]["workers"], train=False)
    summary = evaluate(model, loader, device_, iou_types_for(task), kpt_oks_sigmas=config["data"]["kpt_oks_sigmas"],
                       results_file=results_file)
    if is_main_process():
        print(format_summary(summary))
    return summary


def _mean_over_processes(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar tensor's mean over the processes, as floats (one all-reduce for all of them)."""
    names = sorted(values)
    stacked = all_reduce_mean(torch.stack([values[k].float() for k in names]))
    return dict(zip(names, stacked.tolist()))
