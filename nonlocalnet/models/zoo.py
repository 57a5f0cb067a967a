"""The paper's networks by name: one ``_register`` line per name, with the options it stands for.

Naming: ``[nl{k}_]{c2d|i3d|i3d3x3x3}_r{50|101}[_{variant}][_{clip}]``, for the combinations the paper trained;
not every combination exists. :func:`~nonlocalnet.models.list_models` (``nonlocalnet models``) is the list, and
:func:`~nonlocalnet.models.catalog.models_markdown` renders it as a table.
- ``nl_`` is the 5-block layout, ``nl1_`` one block, ``nl10_`` ten blocks (Table 2c); see
  :mod:`nonlocalnet.models.placements`.
- No clip suffix is the 32x2 clip (32 frames, every other one, Table 1), also named with ``_32x2`` (an alias:
  ``nl_i3d_r50_32x2`` builds ``nl_i3d_r50``, as the configs name it); ``_8x8`` the 8-frame layout;
  ``_128x1`` the 128-frame models of Table 2(g), whose backbone BN is frozen, whose non-local blocks have no
  norm (W_z zero at init) and attend within 4 temporal groups in res3, as the official code trains them.
- Table 2(a) instantiations: ``nl1_c2d_r50_{gaussian,embedded_gaussian,dot_product,concatenation}``;
  2(b) stages: ``nl1_c2d_r50_res{2,3,4,5}``; 2(d) extents: ``nl_c2d_r50_{space,time,spacetime}``.

Non-local options follow the official code where the paper is silent or differs: keys/values are max-pooled
1x2x2 *before* φ and g, and the softmax modes scale θᵀφ by C'^-0.5 (``scale="auto"``; the paper has no scale).
The time-only extent attends across frames at one spatial position, so it does not pool space.

Any default can be overridden: ``create_model("nl_i3d_r50", clip="8x8", num_classes=157)``; the dict-valued
options (``nonlocal_options``, ``nonlocal_stage_options``) are merged key by key into the registered ones.
Importing this module registers every name (:mod:`nonlocalnet.models` imports it).
"""

from __future__ import annotations

import inspect
from typing import Any

from .placements import NL1_R50, NL1_R101, NL5_R50, NL5_R101, NL10_R50, R50_LAYERS, R101_LAYERS, STAGE_ABLATION_R50
from .registry import list_models, model_defaults, register_alias, register_model
from .resnet3d import NONLOCAL_DEFAULTS, ResNet3d

_RESNET3D_OPTIONS = tuple(inspect.signature(ResNet3d.__init__).parameters)[1:]
_MERGED = ("nonlocal_options", "nonlocal_stage_options")

R50 = R50_LAYERS
R101 = R101_LAYERS
# the official code's non-local block in these networks
NL = dict(NONLOCAL_DEFAULTS)  # the one definition, as ResNet3d applies it: a network built by hand gets the same
# 128-frame models: frozen backbone BN; blocks without norm, W_z zero-init; res3 attends within 4 temporal groups
FROZEN_128 = {
    "clip": "128x1",
    "norm": "frozen",
    "nonlocal_options": {**NL, "norm": None},
    "nonlocal_stage_options": {"res3": {"temporal_groups": 4}},
}  # 4 frames per group
# mmaction2's configs/recognition/i3d: mmcv's NonLocal3d (sub_sample: max-pool after the φ/g convs;
# use_scale=False; BN after W_z)
MMACTION2_NL = {"subsample": (1, 2, 2), "subsample_position": "projection", "scale": None, "norm": "batch"}
# tiny networks for the built-in long-range data (the demo, tests)
TINY = {"layers": (1, 1, 1, 1), "width": 8, "arch": "c2d", "clip": "8x8", "num_classes": 2, "dropout": 0.0}


def _register(name: str, summary: str, **defaults: Any) -> None:
    """Registers ``name`` as ``ResNet3d(**defaults)``, the caller's keyword overrides on top."""

    def build(**overrides: Any) -> ResNet3d:
        return _build(name, defaults, overrides)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = summary
    register_model(build, defaults=defaults)


def _build(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> ResNet3d:
    unknown = sorted(set(overrides) - set(_RESNET3D_OPTIONS))
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {', '.join(map(repr, unknown))}; ResNet3d takes {', '.join(_RESNET3D_OPTIONS)}"
        )
    kwargs = dict(defaults)
    for key, value in overrides.items():
        if key in _MERGED and value is not None and kwargs.get(key) is not None:
            value = {**kwargs[key], **value}
        kwargs[key] = value
    return ResNet3d(**kwargs)


# --- baselines (Table 1, Table 2e-g) -------------------------------------------------------------------------
_register("c2d_r50", "C2D ResNet-50 (Table 1), 32x2 clip", layers=R50, arch="c2d", clip="32x2")
_register("c2d_r50_8x8", "C2D ResNet-50 (Table 1), 8x8 clip", layers=R50, arch="c2d", clip="8x8")
_register("c2d_r101", "C2D ResNet-101, 32x2 clip", layers=R101, arch="c2d", clip="32x2")
_register("c2d_r101_8x8", "C2D ResNet-101, 8x8 clip", layers=R101, arch="c2d", clip="8x8")
_register("i3d_r50", "I3D ResNet-50, 3x1x1 inflation (Table 2f), 32x2 clip", layers=R50, arch="i3d", clip="32x2")
_register("i3d_r50_8x8", "I3D ResNet-50, 3x1x1 inflation (Table 2f), 8x8 clip", layers=R50, arch="i3d", clip="8x8")
_register("i3d_r101", "I3D ResNet-101, 3x1x1 inflation (Table 2e), 32x2 clip", layers=R101, arch="i3d", clip="32x2")
_register("i3d_r101_8x8", "I3D ResNet-101, 3x1x1 inflation (Table 2e), 8x8 clip", layers=R101, arch="i3d", clip="8x8")
_register("i3d3x3x3_r50", "I3D ResNet-50, 3x3x3 inflation, 32x2 clip", layers=R50, arch="i3d_3x3x3", clip="32x2")
_register("i3d3x3x3_r50_8x8", "I3D ResNet-50, 3x3x3 inflation, 8x8 clip", layers=R50, arch="i3d_3x3x3", clip="8x8")
_register(
    "i3d3x3x3_r101", "I3D ResNet-101, 3x3x3 inflation (Table 2e), 32x2 clip", layers=R101, arch="i3d_3x3x3", clip="32x2"
)
_register(
    "i3d3x3x3_r101_8x8",
    "I3D ResNet-101, 3x3x3 inflation (Table 2e), 8x8 clip",
    layers=R101,
    arch="i3d_3x3x3",
    clip="8x8",
)

# --- non-local C2D and I3D (Table 2c, 2e, 2f) ----------------------------------------------------------------
_register(
    "nl1_c2d_r50",
    "C2D ResNet-50 + 1 non-local block in res4 (Table 2c), 32x2 clip",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R50,
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r50_8x8",
    "C2D ResNet-50 + 1 non-local block in res4 (Table 2c), 8x8 clip",
    layers=R50,
    arch="c2d",
    clip="8x8",
    nonlocal_locations=NL1_R50,
    nonlocal_options=NL,
)
_register(
    "nl_c2d_r50",
    "C2D ResNet-50 + 5 non-local blocks (Table 2c), 32x2 clip",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL5_R50,
    nonlocal_options=NL,
)
_register(
    "nl_c2d_r50_8x8",
    "C2D ResNet-50 + 5 non-local blocks (Table 2c), 8x8 clip",
    layers=R50,
    arch="c2d",
    clip="8x8",
    nonlocal_locations=NL5_R50,
    nonlocal_options=NL,
)
_register(
    "nl10_c2d_r50",
    "C2D ResNet-50 + 10 non-local blocks (Table 2c), 32x2 clip",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL10_R50,
    nonlocal_options=NL,
)
_register(
    "nl10_c2d_r50_8x8",
    "C2D ResNet-50 + 10 non-local blocks (Table 2c), 8x8 clip",
    layers=R50,
    arch="c2d",
    clip="8x8",
    nonlocal_locations=NL10_R50,
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r101",
    "C2D ResNet-101 + 1 non-local block in res4 (Table 2c), 32x2 clip",
    layers=R101,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R101,
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r101_8x8",
    "C2D ResNet-101 + 1 non-local block in res4 (Table 2c), 8x8 clip",
    layers=R101,
    arch="c2d",
    clip="8x8",
    nonlocal_locations=NL1_R101,
    nonlocal_options=NL,
)
_register(
    "nl_c2d_r101",
    "C2D ResNet-101 + 5 non-local blocks (Table 2c, 2e), 32x2 clip",
    layers=R101,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL5_R101,
    nonlocal_options=NL,
)
_register(
    "nl_c2d_r101_8x8",
    "C2D ResNet-101 + 5 non-local blocks (Table 2c, 2e), 8x8 clip",
    layers=R101,
    arch="c2d",
    clip="8x8",
    nonlocal_locations=NL5_R101,
    nonlocal_options=NL,
)
_register(
    "nl_i3d_r50",
    "NL I3D ResNet-50: I3D + 5 non-local blocks (Table 2f), 32x2 clip",
    layers=R50,
    arch="i3d",
    clip="32x2",
    nonlocal_locations=NL5_R50,
    nonlocal_options=NL,
)
_register(
    "nl_i3d_r50_8x8",
    "NL I3D ResNet-50: I3D + 5 non-local blocks (Table 2f), 8x8 clip",
    layers=R50,
    arch="i3d",
    clip="8x8",
    nonlocal_locations=NL5_R50,
    nonlocal_options=NL,
)
_register(
    "nl_i3d_r101",
    "NL I3D ResNet-101: I3D + 5 non-local blocks (Table 2f), 32x2 clip",
    layers=R101,
    arch="i3d",
    clip="32x2",
    nonlocal_locations=NL5_R101,
    nonlocal_options=NL,
)
_register(
    "nl_i3d_r101_8x8",
    "NL I3D ResNet-101: I3D + 5 non-local blocks (Table 2f), 8x8 clip",
    layers=R101,
    arch="i3d",
    clip="8x8",
    nonlocal_locations=NL5_R101,
    nonlocal_options=NL,
)

# --- Table 2(a): instantiations, one block in res4 of C2D R50 ------------------------------------------------
_register(
    "nl1_c2d_r50_gaussian",
    "C2D ResNet-50 + 1 gaussian non-local block in res4 (Table 2a)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R50,
    nonlocal_options={**NL, "mode": "gaussian"},
)
_register(
    "nl1_c2d_r50_embedded_gaussian",
    "C2D ResNet-50 + 1 embedded_gaussian non-local block in res4 (Table 2a)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R50,
    nonlocal_options={**NL, "mode": "embedded_gaussian"},
)
_register(
    "nl1_c2d_r50_dot_product",
    "C2D ResNet-50 + 1 dot_product non-local block in res4 (Table 2a)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R50,
    nonlocal_options={**NL, "mode": "dot_product", "scale": None},
)
_register(
    "nl1_c2d_r50_concatenation",
    "C2D ResNet-50 + 1 concatenation non-local block in res4 (Table 2a)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL1_R50,
    nonlocal_options={**NL, "mode": "concatenation", "scale": None},
)

# --- Table 2(b): one block right before the last block of a stage ---------------------------------------------
_register(
    "nl1_c2d_r50_res2",
    "C2D ResNet-50 + 1 non-local block in res2 (Table 2b)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=STAGE_ABLATION_R50["res2"],
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r50_res3",
    "C2D ResNet-50 + 1 non-local block in res3 (Table 2b)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=STAGE_ABLATION_R50["res3"],
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r50_res4",
    "C2D ResNet-50 + 1 non-local block in res4 (Table 2b)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=STAGE_ABLATION_R50["res4"],
    nonlocal_options=NL,
)
_register(
    "nl1_c2d_r50_res5",
    "C2D ResNet-50 + 1 non-local block in res5 (Table 2b)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=STAGE_ABLATION_R50["res5"],
    nonlocal_options=NL,
)

# --- Table 2(d): spacetime, space-only, time-only, 5 blocks (time-only pools no space) -----------------------
_register(
    "nl_c2d_r50_spacetime",
    "C2D ResNet-50 + 5 spacetime non-local blocks (Table 2d)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**NL, "extent": "spacetime"},
)
_register(
    "nl_c2d_r50_space",
    "C2D ResNet-50 + 5 space non-local blocks (Table 2d)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**NL, "extent": "space"},
)
_register(
    "nl_c2d_r50_time",
    "C2D ResNet-50 + 5 time non-local blocks (Table 2d)",
    layers=R50,
    arch="c2d",
    clip="32x2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**NL, "extent": "time", "subsample": None},
)

# --- Table 2(g): 128-frame models, frozen BN ------------------------------------------------------------------
_register(
    "c2d_r50_128x1",
    "C2D ResNet-50, 128x1 clip, frozen BN (Table 2g)",
    layers=R50,
    arch="c2d",
    clip="128x1",
    norm="frozen",
)
_register(
    "c2d_r101_128x1",
    "C2D ResNet-101, 128x1 clip, frozen BN (Table 2g)",
    layers=R101,
    arch="c2d",
    clip="128x1",
    norm="frozen",
)
_register(
    "i3d_r50_128x1",
    "I3D ResNet-50, 128x1 clip, frozen BN (Table 2g)",
    layers=R50,
    arch="i3d",
    clip="128x1",
    norm="frozen",
)
_register(
    "i3d_r101_128x1",
    "I3D ResNet-101, 128x1 clip, frozen BN (Table 2g)",
    layers=R101,
    arch="i3d",
    clip="128x1",
    norm="frozen",
)
_register(
    "nl_i3d_r50_128x1",
    "NL I3D ResNet-50, 128x1 clip, frozen BN (Table 2g)",
    layers=R50,
    arch="i3d",
    nonlocal_locations=NL5_R50,
    **FROZEN_128,
)
_register(
    "nl_i3d_r101_128x1",
    "NL I3D ResNet-101, 128x1 clip, frozen BN (Table 2g)",
    layers=R101,
    arch="i3d",
    nonlocal_locations=NL5_R101,
    **FROZEN_128,
)

# --- the other zoos' networks, exactly as they compute (what `nonlocalnet convert` builds for their files) -------
# PyTorchVideo's hub: c2d_r50 and i3d_r50 are c2d_r50_8x8 and i3d_r50_8x8 (its head's windowed average is a
# conversion option); slow_r50 is SlowFast's slow pathway: 1x7x7 conv1, 3x1x1 branch2a in every block of res4 and
# res5, no temporal pooling.
_register(
    "slow_r50_8x8",
    "Slow R50 (SlowFast's slow pathway; PyTorchVideo's SLOW_8x8_R50), 8x8 clip",
    layers=R50,
    arch="slow",
    clip="8x8_slow",
)
# mmaction2's configs/recognition/i3d: ResNet3d with pool1 1x3x3 of temporal stride 2
_register(
    "mmaction2_i3d_r50",
    "mmaction2's I3D R50 32x2 (pool1 temporal kernel 1)",
    layers=R50,
    arch="i3d",
    clip="32x2_mmaction2",
)
_register(
    "mmaction2_nl_i3d_r50_dot_product",
    "mmaction2's NL I3D R50 32x2, dot_product (mmcv NonLocal3d)",
    layers=R50,
    arch="i3d",
    clip="32x2_mmaction2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**MMACTION2_NL, "mode": "dot_product"},
)
_register(
    "mmaction2_nl_i3d_r50_embedded_gaussian",
    "mmaction2's NL I3D R50 32x2, embedded_gaussian (mmcv NonLocal3d)",
    layers=R50,
    arch="i3d",
    clip="32x2_mmaction2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**MMACTION2_NL, "mode": "embedded_gaussian"},
)
_register(
    "mmaction2_nl_i3d_r50_gaussian",
    "mmaction2's NL I3D R50 32x2, gaussian (mmcv NonLocal3d)",
    layers=R50,
    arch="i3d",
    clip="32x2_mmaction2",
    nonlocal_locations=NL5_R50,
    nonlocal_options={**MMACTION2_NL, "mode": "gaussian"},
)

# --- tiny networks for the built-in long-range data (the demo, tests) ----------------------------------------
_register("c2d_tiny", "C2D with one bottleneck per stage, width 8, 8x8 clip layout: the demo's baseline", **TINY)
# the paper's block (no scaling of f) with PyTorch's init of θ/φ/g, as the network trains from scratch
_register(
    "nl_c2d_tiny",
    "c2d_tiny + 1 non-local block after res3's block (trained from scratch)",
    **TINY,
    nonlocal_locations={"res3": (0,)},
    nonlocal_options={**NL, "scale": None, "init": "pytorch"},
)

# --- aliases: the 32x2 clip, the names' default, spelled out as the configs name it (kinetics/nl_i3d_r50_32x2) ---
for _name in list_models():
    if model_defaults(_name).get("clip") == "32x2":
        register_alias(f"{_name}_32x2", _name)
