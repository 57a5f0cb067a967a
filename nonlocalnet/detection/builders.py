"""torchvision's Mask R-CNN and Keypoint R-CNN (with FPN) on ResNet backbones carrying non-local blocks.

The detectors are torchvision's own (``MaskRCNN``, ``KeypointRCNN``); this module only builds their backbone
(a torchvision ResNet with frozen BN, NL blocks inserted by :func:`add_nonlocal`, an FPN on top) and their heads
at the sizes asked for. Where the paper puts the NL blocks in its COCO experiments:

* Mask R-CNN: one block right before the last residual block of res4 (``backbone_nonlocal="paper"``: after
  block 4 of 6 in R50, after block 21 of 23 in R101);
* Keypoint R-CNN: four blocks in the keypoint head, one after every 2 of its 8 convs (``head_nonlocal=
  "paper"``), and in the best setting one more in the backbone as above.

``backbone_nonlocal`` may instead be a placement such as ``{"layer3": (1, 3, 5)}`` or None (the baseline).
No weights are downloaded: ``backbone_weights`` is a local torchvision ResNet state dict, or None.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import get_model
from torchvision.models.detection import KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers import BLOCK_DEFAULTS, find_nonlocal_blocks
from ..models.placements import before_last_block
from .nonlocal_heads import PAPER_KEYPOINT_HEAD_NONLOCAL, keypoint_head
from .nonlocal_resnet import (
    STAGES,
    add_resnet_nonlocal,
    block_out_channels,
    load_resnet_state_dict,
    residual_blocks,
    stage_depths,
)

TORCHVISION_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
# A small ResNet for CPU tests and the built-in data: BasicBlocks, (1, 1, 2, 1) per stage, so res4 has a
# "block before the last" for the paper's placement.
TINY_ARCH = "resnet_tiny"
ARCHS = TORCHVISION_ARCHS + (TINY_ARCH,)
TASKS = ("mask", "keypoint")


@dataclasses.dataclass(frozen=True)
class NonLocalOptions:
    """Options of every NL block of a detector (see :class:`~nonlocalnet.layers.NonLocalBlock`).

    ``norm`` defaults to None (W_z zero at init): torchvision's detection backbones freeze their BN, and a few
    images per GPU make a poor batch to normalise over.
    """

    mode: str = BLOCK_DEFAULTS["mode"]
    inter_channels: int | None = BLOCK_DEFAULTS["inter_channels"]
    subsample: int | tuple[int, int] | None = BLOCK_DEFAULTS["subsample"]
    scale: float | str | None = BLOCK_DEFAULTS["scale"]
    norm: str | None = None  # detection's own choice (see above)
    impl: str = BLOCK_DEFAULTS["impl"]
    init: str = BLOCK_DEFAULTS["init"]  # "auto": the official init once backbone weights are loaded around the block

    def as_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_resnet(arch: str) -> ResNet:
    """A torchvision ResNet with frozen BN and random weights."""
    if arch == TINY_ARCH:
        return ResNet(BasicBlock, [1, 1, 2, 1], norm_layer=FrozenBatchNorm2d)
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return get_model(arch, weights=None, norm_layer=FrozenBatchNorm2d)


def resnet_fpn_backbone(
    arch: str = "resnet50",
    *,
    backbone_nonlocal: str | Mapping[str, Sequence[int]] | None = "paper",
    nonlocal_options: NonLocalOptions = NonLocalOptions(),
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    fpn_channels: int = 256,
) -> BackboneWithFPN:
    """A ResNet-FPN backbone (frozen BN) with NL blocks, as torchvision's detectors take it.

    Args:
        arch: one of :data:`ARCHS`.
        backbone_nonlocal: "paper" (one block right before the last block of res4), a placement
            {stage: indices} for :func:`add_resnet_nonlocal`, or None for none.
        nonlocal_options: options of the NL blocks.
        backbone_weights: a local torchvision ResNet state dict (path) to start from; None = random init.
        trainable_layers: how many stages to train counting from layer4 (0..5, as torchvision); the rest are
            frozen. NL blocks are new weights and always train.
        fpn_channels: channels of the FPN outputs.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5; got {trainable_layers}")
    resnet = build_resnet(arch)
    if backbone_nonlocal == "paper":
        placement = before_last_block(stage_depths(resnet), "res4")
    elif isinstance(backbone_nonlocal, str):
        raise ValueError(
            f"backbone_nonlocal must be 'paper', a placement {{stage: indices}} or None; got {backbone_nonlocal!r}"
        )
    else:
        placement = backbone_nonlocal or {}
    add_resnet_nonlocal(resnet, placement, **nonlocal_options.as_kwargs())
    if backbone_weights is not None:
        load_resnet_state_dict(resnet, backbone_weights)
    to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        to_train.append("bn1")
    nl_prefixes = tuple(f"{name}." for name in find_nonlocal_blocks(resnet))
    for name, parameter in resnet.named_parameters():
        if not name.startswith(tuple(to_train)) and not name.startswith(nl_prefixes):
            parameter.requires_grad_(False)
    channels = [block_out_channels(residual_blocks(getattr(resnet, s))[-1]) for s in STAGES]
    return BackboneWithFPN(
        resnet, {s: str(i) for i, s in enumerate(STAGES)}, channels, fpn_channels, extra_blocks=LastLevelMaxPool()
    )


def maskrcnn(
    *,
    num_classes: int = 81,
    arch: str = "resnet50",
    backbone_nonlocal: str | Mapping[str, Sequence[int]] | None = "paper",
    nonlocal_options: NonLocalOptions = NonLocalOptions(),
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
) -> MaskRCNN:
    """torchvision's Mask R-CNN with FPN on a ResNet with NL blocks (the paper: one before the last of res4).

    Args:
        num_classes: classes including the background (81 for COCO's 80 categories, contiguous).
        arch, backbone_nonlocal, nonlocal_options, backbone_weights, trainable_layers, fpn_channels: the
            backbone (:func:`resnet_fpn_backbone`).
        representation_size: width of the box head's two FC layers (1024 in torchvision).
        mask_head_channels: width of the mask head's four convs (256 in torchvision).
        min_size, max_size: the images are resized so their short side is min_size, long side <= max_size.
        anchor_sizes: one anchor size per FPN level (5 levels), three aspect ratios each.
        rpn_*, box_*: torchvision's MaskRCNN options of the same names.
    """
    backbone = resnet_fpn_backbone(
        arch,
        backbone_nonlocal=backbone_nonlocal,
        nonlocal_options=nonlocal_options,
        backbone_weights=backbone_weights,
        trainable_layers=trainable_layers,
        fpn_channels=fpn_channels,
    )
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        **_rpn_and_box(fpn_channels, num_classes, representation_size, anchor_sizes),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
    )


def keypointrcnn(
    *,
    num_classes: int = 2,
    num_keypoints: int = 17,
    arch: str = "resnet101",
    backbone_nonlocal: str | Mapping[str, Sequence[int]] | None = "paper",
    head_nonlocal: str | Sequence[int] | None = "paper",
    nonlocal_options: NonLocalOptions = NonLocalOptions(),
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    keypoint_head_channels: int = 512,
    keypoint_head_convs: int = 8,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
) -> KeypointRCNN:
    """torchvision's Keypoint R-CNN with FPN, NL blocks in the keypoint head and (optionally) the backbone.

    Args:
        num_classes: classes including the background (2: background, person).
        num_keypoints: keypoints per instance (17 for COCO).
        head_nonlocal: "paper" (after convs 2, 4, 6, 8 of the head), 0-based conv indices, or None.
        keypoint_head_channels, keypoint_head_convs: the keypoint head (512 x 8 in the paper).
        Others: as :func:`maskrcnn`.
    """
    backbone = resnet_fpn_backbone(
        arch,
        backbone_nonlocal=backbone_nonlocal,
        nonlocal_options=nonlocal_options,
        backbone_weights=backbone_weights,
        trainable_layers=trainable_layers,
        fpn_channels=fpn_channels,
    )
    if head_nonlocal == "paper":
        if keypoint_head_convs != 8:
            raise ValueError(
                f"head_nonlocal='paper' is for the 8-conv head; this one has {keypoint_head_convs}: "
                "give the conv indices"
            )
        after: Sequence[int] = PAPER_KEYPOINT_HEAD_NONLOCAL
    elif isinstance(head_nonlocal, str):
        raise ValueError(f"head_nonlocal must be 'paper', conv indices or None; got {head_nonlocal!r}")
    else:
        after = tuple(head_nonlocal or ())
    head_options = nonlocal_options.as_kwargs()
    del head_options["subsample"]  # 14x14 RoI features: no subsampling in the head
    return KeypointRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        **_rpn_and_box(fpn_channels, num_classes, representation_size, anchor_sizes),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
        keypoint_head=keypoint_head(
            fpn_channels,
            channels=keypoint_head_channels,
            num_convs=keypoint_head_convs,
            nonlocal_after=after,
            **head_options,
        ),
        keypoint_predictor=KeypointRCNNPredictor(keypoint_head_channels, num_keypoints),
    )


BUILDERS = {"mask": maskrcnn, "keypoint": keypointrcnn}


def build_detector(
    config: Mapping[str, Any],
    *,
    num_classes: int | None = None,
    num_keypoints: int | None = None,
    backbone_weights: str | Path | None = None,
) -> nn.Module:
    """Build a detector from a config's ``model`` section (plain data, e.g. read from YAML).

    Args:
        config: {"task": "mask" | "keypoint", "nonlocal": {NonLocalOptions fields}, other builder
            arguments}. Lists become tuples; a placement's lists become index tuples.
        num_classes, num_keypoints: taken from the dataset when the config does not set them.
        backbone_weights: overrides the config's ``backbone_weights``.
    """
    config = dict(config)
    task = config.pop("task", None)
    if task not in BUILDERS:
        raise ValueError(f"model.task must be one of {', '.join(TASKS)}; got {task!r}")
    builder = BUILDERS[task]
    options = config.pop("nonlocal", None) or {}
    fields = {f.name for f in dataclasses.fields(NonLocalOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown model.nonlocal option(s) {unknown}; expected some of {sorted(fields)}")
    if isinstance(options.get("subsample"), list):
        options["subsample"] = tuple(options["subsample"])
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if isinstance(kwargs.get("backbone_nonlocal"), Mapping):
        kwargs["backbone_nonlocal"] = {
            k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in kwargs["backbone_nonlocal"].items()
        }
    accepted = set(inspect.signature(builder).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {unknown} for task {task!r}; expected some of "
            f"{sorted(accepted - {'nonlocal_options'})} or 'nonlocal'"
        )
    if kwargs.get("num_classes") is None and num_classes is not None:
        kwargs["num_classes"] = num_classes
    if task == "keypoint" and kwargs.get("num_keypoints") is None and num_keypoints is not None:
        kwargs["num_keypoints"] = num_keypoints
    if backbone_weights is not None:
        kwargs["backbone_weights"] = backbone_weights
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("backbone_nonlocal", "head_nonlocal")}
    return builder(nonlocal_options=NonLocalOptions(**options), **kwargs)


def _rpn_and_box(
    fpn_channels: int, num_classes: int, representation_size: int, anchor_sizes: Sequence[int]
) -> dict[str, nn.Module]:
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level (5); got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return {
        "rpn_anchor_generator": anchors,
        "rpn_head": RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        "box_head": TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        "box_predictor": FastRCNNPredictor(representation_size, num_classes),
    }
