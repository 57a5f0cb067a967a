"""Non-local blocks in torchvision's Mask R-CNN and Keypoint R-CNN (COCO), and the glue to train and score them.

* :mod:`.nonlocal_resnet`: ``add_resnet_nonlocal(resnet, {"layer3": (4,)})`` for any torchvision 2D ResNet (the
  placement as paths for :func:`nonlocalnet.add_nonlocal`);
* :mod:`.nonlocal_heads`: NL blocks in the keypoint head;
* :mod:`.builders`: ``maskrcnn`` / ``keypointrcnn`` with NL blocks where the paper puts them;
* :mod:`.coco`: reading and checking COCO-format files, and the dataset over them (pycocotools);
* :mod:`.synthetic`: the built-in drawn datasets (shapes, figures), written as real COCO files;
* :mod:`.transforms`: the training flip and the collate of detection samples;
* :mod:`.evaluate`: COCOeval box / mask / keypoint AP;
* :mod:`.config`: the detection config schema (read by :mod:`nonlocalnet.engine.config`);
* :mod:`.loaders`: the datasets and loaders of a config;
* :mod:`.train`: detection as a task of the engine's one training loop (``train``), and ``test``.
"""

from __future__ import annotations

from .builders import ARCHS, NonLocalOptions, build_detector, keypointrcnn, maskrcnn, resnet_fpn_backbone
from .nonlocal_heads import PAPER_KEYPOINT_HEAD_NONLOCAL, add_nonlocal_to_head, keypoint_head
from .nonlocal_resnet import add_resnet_nonlocal, load_resnet_state_dict, placement_paths, stage_depths

__all__ = [
    "ARCHS",
    "NonLocalOptions",
    "build_detector",
    "maskrcnn",
    "keypointrcnn",
    "resnet_fpn_backbone",
    "PAPER_KEYPOINT_HEAD_NONLOCAL",
    "add_nonlocal_to_head",
    "keypoint_head",
    "add_resnet_nonlocal",
    "load_resnet_state_dict",
    "placement_paths",
    "stage_depths",
]
