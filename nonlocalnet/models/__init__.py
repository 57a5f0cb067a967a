"""Models: the paper's video networks (C2D / I3D ResNets with non-local blocks), by name or by hand.

from nonlocalnet import models
models.list_models("nl*_r50")
m = models.create_model("nl_i3d_r50", num_classes=400)
m = models.ResNet3d(layers=(3, 4, 6, 3), arch="i3d", clip="32x2",
                    nonlocal_locations={"res3": (1, 3), "res4": (1, 3, 5)})
"""

from __future__ import annotations

from . import zoo  # noqa: F401  (registers the paper's networks)
from .batchnorm import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_batchnorm
from .checkpoints.caffe2 import Caffe2ConversionError, convert_caffe2_blobs, load_caffe2_pickle
from .checkpoints.formats import convert_checkpoint, detect_format
from .checkpoints.inflate import inflate_2d_weights
from .checkpoints.mapping import ConversionError
from .checkpoints.pretrained import PretrainedMismatch, PretrainedReport, load_pretrained
from .checkpoints.weights import load_model, load_weights, save_weights
from .flops import CostReport, count_cost, model_cost
from .placements import check_locations
from .registry import (
    ModelEntry,
    create_model,
    get_model_entry,
    list_aliases,
    list_models,
    model_defaults,
    register_alias,
    register_model,
)
from .resnet3d import (
    ARCHS,
    CLIP_LAYOUTS,
    PAPER_32X2,
    Bottleneck3d,
    ClipLayout,
    ResNet3d,
    ResStage,
    VideoClassifierHead,
    i3d_inflated_blocks,
)

__all__ = [
    "ARCHS",
    "Bottleneck3d",
    "CLIP_LAYOUTS",
    "Caffe2ConversionError",
    "ClipLayout",
    "ConversionError",
    "CostReport",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "ModelEntry",
    "PAPER_32X2",
    "PretrainedMismatch",
    "PretrainedReport",
    "ResNet3d",
    "ResStage",
    "VideoClassifierHead",
    "check_locations",
    "convert_caffe2_blobs",
    "convert_checkpoint",
    "detect_format",
    "count_cost",
    "create_model",
    "freeze_batchnorm",
    "get_model_entry",
    "i3d_inflated_blocks",
    "inflate_2d_weights",
    "list_models",
    "load_caffe2_pickle",
    "load_model",
    "load_pretrained",
    "load_weights",
    "model_cost",
    "model_defaults",
    "register_model",
    "save_weights",
    "list_aliases",
    "register_alias",
]
