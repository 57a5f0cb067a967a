"""The zoo's names pinned: every registered name, its parameter count and the options it stands for, written out
here independently of the zoo's table (a rewrite of :mod:`nonlocalnet.models.zoo` must leave all three as they are).

The values here are literals, not read from the zoo or from :mod:`nonlocalnet.models.placements`; parameter counts
are at each name's own defaults (400 classes, the tiny networks' 2).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from nonlocalnet.models import ResNet3d, create_model, list_models, model_defaults

MODELS = Path(__file__).resolve().parents[1] / "nonlocalnet" / "models"

R50, R101 = (3, 4, 6, 3), (3, 4, 23, 3)
NL = {"mode": "embedded_gaussian", "subsample": (1, 2, 2), "subsample_position": "input", "scale": "auto"}
MMACTION2 = {"subsample": (1, 2, 2), "subsample_position": "projection", "scale": None, "norm": "batch"}
NL1, NL5, NL10 = {"res4": (4,)}, {"res3": (1, 3), "res4": (1, 3, 5)}, {"res3": (0, 1, 2, 3), "res4": (0, 1, 2, 3, 4, 5)}
NL1_R101, NL5_R101 = {"res4": (21,)}, {"res3": (1, 3), "res4": (6, 13, 20)}
FROZEN_128 = dict(
    clip="128x1",
    norm="frozen",
    nonlocal_options={**NL, "norm": None},
    nonlocal_stage_options={"res3": {"temporal_groups": 4}},
)
TINY = dict(layers=(1, 1, 1, 1), width=8, arch="c2d", clip="8x8", num_classes=2, dropout=0.0)

# name -> (parameters, the keyword arguments of ResNet3d it stands for), in list_models() order
ZOO = {
    "c2d_r101": (43_319_760, dict(layers=R101, arch="c2d", clip="32x2")),
    "c2d_r101_128x1": (43_214_416, dict(layers=R101, arch="c2d", clip="128x1", norm="frozen")),
    "c2d_r101_8x8": (43_319_760, dict(layers=R101, arch="c2d", clip="8x8")),
    "c2d_r50": (24_327_632, dict(layers=R50, arch="c2d", clip="32x2")),
    "c2d_r50_128x1": (24_274_512, dict(layers=R50, arch="c2d", clip="128x1", norm="frozen")),
    "c2d_r50_8x8": (24_327_632, dict(layers=R50, arch="c2d", clip="8x8")),
    "c2d_tiny": (128_906, TINY),
    "i3d3x3x3_r101": (63_042_768, dict(layers=R101, arch="i3d_3x3x3", clip="32x2")),
    "i3d3x3x3_r101_8x8": (63_042_768, dict(layers=R101, arch="i3d_3x3x3", clip="8x8")),
    "i3d3x3x3_r50": (33_433_808, dict(layers=R50, arch="i3d_3x3x3", clip="32x2")),
    "i3d3x3x3_r50_8x8": (33_433_808, dict(layers=R50, arch="i3d_3x3x3", clip="8x8")),
    "i3d_r101": (51_754_192, dict(layers=R101, arch="i3d", clip="32x2")),
    "i3d_r101_128x1": (51_648_848, dict(layers=R101, arch="i3d", clip="128x1", norm="frozen")),
    "i3d_r101_8x8": (51_754_192, dict(layers=R101, arch="i3d", clip="8x8")),
    "i3d_r50": (28_043_472, dict(layers=R50, arch="i3d", clip="32x2")),
    "i3d_r50_128x1": (27_990_352, dict(layers=R50, arch="i3d", clip="128x1", norm="frozen")),
    "i3d_r50_8x8": (28_043_472, dict(layers=R50, arch="i3d", clip="8x8")),
    "mmaction2_i3d_r50": (28_043_472, dict(layers=R50, arch="i3d", clip="32x2_mmaction2")),
    "mmaction2_nl_i3d_r50_dot_product": (
        35_401_936,
        dict(
            layers=R50,
            arch="i3d",
            clip="32x2_mmaction2",
            nonlocal_locations=NL5,
            nonlocal_options={**MMACTION2, "mode": "dot_product"},
        ),
    ),
    "mmaction2_nl_i3d_r50_embedded_gaussian": (
        35_401_936,
        dict(
            layers=R50,
            arch="i3d",
            clip="32x2_mmaction2",
            nonlocal_locations=NL5,
            nonlocal_options={**MMACTION2, "mode": "embedded_gaussian"},
        ),
    ),
    "mmaction2_nl_i3d_r50_gaussian": (
        31_727_824,
        dict(
            layers=R50,
            arch="i3d",
            clip="32x2_mmaction2",
            nonlocal_locations=NL5,
            nonlocal_options={**MMACTION2, "mode": "gaussian"},
        ),
    ),
    "nl10_c2d_r50": (
        39_044_560,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL10, nonlocal_options=NL),
    ),
    "nl10_c2d_r50_8x8": (
        39_044_560,
        dict(layers=R50, arch="c2d", clip="8x8", nonlocal_locations=NL10, nonlocal_options=NL),
    ),
    "nl1_c2d_r101": (
        45_421_520,
        dict(layers=R101, arch="c2d", clip="32x2", nonlocal_locations=NL1_R101, nonlocal_options=NL),
    ),
    "nl1_c2d_r101_8x8": (
        45_421_520,
        dict(layers=R101, arch="c2d", clip="8x8", nonlocal_locations=NL1_R101, nonlocal_options=NL),
    ),
    "nl1_c2d_r50": (26_429_392, dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL1, nonlocal_options=NL)),
    "nl1_c2d_r50_8x8": (
        26_429_392,
        dict(layers=R50, arch="c2d", clip="8x8", nonlocal_locations=NL1, nonlocal_options=NL),
    ),
    "nl1_c2d_r50_concatenation": (
        26_430_416,
        dict(
            layers=R50,
            arch="c2d",
            clip="32x2",
            nonlocal_locations=NL1,
            nonlocal_options={**NL, "mode": "concatenation", "scale": None},
        ),
    ),
    "nl1_c2d_r50_dot_product": (
        26_429_392,
        dict(
            layers=R50,
            arch="c2d",
            clip="32x2",
            nonlocal_locations=NL1,
            nonlocal_options={**NL, "mode": "dot_product", "scale": None},
        ),
    ),
    "nl1_c2d_r50_embedded_gaussian": (
        26_429_392,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL1, nonlocal_options=NL),
    ),
    "nl1_c2d_r50_gaussian": (
        25_379_792,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL1, nonlocal_options={**NL, "mode": "gaussian"}),
    ),
    "nl1_c2d_r50_res2": (
        24_459_856,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations={"res2": (1,)}, nonlocal_options=NL),
    ),
    "nl1_c2d_r50_res3": (
        24_854_224,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations={"res3": (2,)}, nonlocal_options=NL),
    ),
    "nl1_c2d_r50_res4": (
        26_429_392,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations={"res4": (4,)}, nonlocal_options=NL),
    ),
    "nl1_c2d_r50_res5": (
        32_725_456,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations={"res5": (1,)}, nonlocal_options=NL),
    ),
    "nl_c2d_r101": (
        50_678_224,
        dict(layers=R101, arch="c2d", clip="32x2", nonlocal_locations=NL5_R101, nonlocal_options=NL),
    ),
    "nl_c2d_r101_8x8": (
        50_678_224,
        dict(layers=R101, arch="c2d", clip="8x8", nonlocal_locations=NL5_R101, nonlocal_options=NL),
    ),
    "nl_c2d_r50": (31_686_096, dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL5, nonlocal_options=NL)),
    "nl_c2d_r50_8x8": (
        31_686_096,
        dict(layers=R50, arch="c2d", clip="8x8", nonlocal_locations=NL5, nonlocal_options=NL),
    ),
    "nl_c2d_r50_space": (
        31_686_096,
        dict(layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL5, nonlocal_options={**NL, "extent": "space"}),
    ),
    "nl_c2d_r50_spacetime": (
        31_686_096,
        dict(
            layers=R50, arch="c2d", clip="32x2", nonlocal_locations=NL5, nonlocal_options={**NL, "extent": "spacetime"}
        ),
    ),
    "nl_c2d_r50_time": (
        31_686_096,
        dict(
            layers=R50,
            arch="c2d",
            clip="32x2",
            nonlocal_locations=NL5,
            nonlocal_options={**NL, "extent": "time", "subsample": None},
        ),
    ),
    "nl_c2d_tiny": (
        137_386,
        dict(**TINY, nonlocal_locations={"res3": (0,)}, nonlocal_options={**NL, "scale": None, "init": "pytorch"}),
    ),
    "nl_i3d_r101": (
        59_112_656,
        dict(layers=R101, arch="i3d", clip="32x2", nonlocal_locations=NL5_R101, nonlocal_options=NL),
    ),
    "nl_i3d_r101_128x1": (58_999_120, dict(layers=R101, arch="i3d", nonlocal_locations=NL5_R101, **FROZEN_128)),
    "nl_i3d_r101_8x8": (
        59_112_656,
        dict(layers=R101, arch="i3d", clip="8x8", nonlocal_locations=NL5_R101, nonlocal_options=NL),
    ),
    "nl_i3d_r50": (35_401_936, dict(layers=R50, arch="i3d", clip="32x2", nonlocal_locations=NL5, nonlocal_options=NL)),
    "nl_i3d_r50_128x1": (35_340_624, dict(layers=R50, arch="i3d", nonlocal_locations=NL5, **FROZEN_128)),
    "nl_i3d_r50_8x8": (
        35_401_936,
        dict(layers=R50, arch="i3d", clip="8x8", nonlocal_locations=NL5, nonlocal_options=NL),
    ),
    "slow_r50_8x8": (32_454_096, dict(layers=R50, arch="slow", clip="8x8_slow")),
}


def test_the_zoo_registers_exactly_its_50_names_in_order():
    assert len(ZOO) == 50
    assert list_models() == list(ZOO)


@pytest.mark.parametrize("name", list(ZOO))
def test_each_name_records_the_options_it_stands_for(name):
    assert model_defaults(name) == ZOO[name][1]


@pytest.mark.parametrize("name", list(ZOO))
def test_each_name_builds_the_network_its_options_describe(name):
    params, options = ZOO[name]
    with torch.device("meta"):
        registered, by_hand = create_model(name), ResNet3d(**options)
    assert sum(p.numel() for p in registered.parameters()) == params
    assert repr(registered) == repr(by_hand)  # every layer's kind, size, kernel and stride
    assert {k: v.shape for k, v in registered.state_dict().items()} == {
        k: v.shape for k, v in by_hand.state_dict().items()
    }


def test_every_name_is_spelled_out_in_the_zoo_where_grep_finds_it():
    source = (MODELS / "zoo.py").read_text()
    assert [name for name in ZOO if f'"{name}"' not in source] == []


def test_the_registry_imports_no_model_and_the_zoo_imports_the_registry():
    def imported(module: str) -> set[str]:
        tree = ast.parse((MODELS / f"{module}.py").read_text())
        found = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        found |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.module
            for alias in node.names
        }
        return {name.lstrip(".").split(".")[-1] for name in found}

    assert not imported("registry") & {"zoo", "resnet3d", "placements"}
    assert "registry" in imported("zoo")


def test_a_network_built_by_hand_with_a_placement_has_the_registered_networks_blocks():
    # ResNet3d applies the paper's video options itself: scale "auto", keys/values pooled 1x2x2 before φ and g
    small = dict(layers=(1, 4, 6, 1), width=4, num_classes=3)
    registered = create_model("nl_i3d_r50_8x8", **small)
    by_hand = ResNet3d(arch="i3d", clip="8x8", nonlocal_locations={"res3": (1, 3), "res4": (1, 3, 5)}, **small)
    blocks = {n: m for n, m in registered.named_modules() if type(m).__name__ == "NonLocalBlock"}
    hand_blocks = {n: m for n, m in by_hand.named_modules() if type(m).__name__ == "NonLocalBlock"}
    assert list(blocks) == list(hand_blocks) == ["res3.nl1", "res3.nl3", "res4.nl1", "res4.nl3", "res4.nl5"]
    for name, block in blocks.items():
        assert block.extra_repr() == hand_blocks[name].extra_repr()
        assert block.scale == pytest.approx(block.inter_channels**-0.5) and block.subsample == (1, 2, 2)
        assert {k: v.shape for k, v in block.state_dict().items()} == {
            k: v.shape for k, v in hand_blocks[name].state_dict().items()
        }


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_a_hand_built_block_of_each_mode_is_the_registered_table_2a_block(mode):
    small = dict(layers=(1, 1, 6, 1), width=4, num_classes=3)
    registered = create_model(f"nl1_c2d_r50_{mode}", **small)
    by_hand = ResNet3d(nonlocal_locations={"res4": (4,)}, nonlocal_options={"mode": mode}, **small)
    assert by_hand.res4.nl4.extra_repr() == registered.res4.nl4.extra_repr()
    assert by_hand.res4.nl4.scale == (1.0 if mode in ("dot_product", "concatenation") else 32**-0.5)


def test_each_module_level_name_of_choices_has_one_meaning_across_the_package():
    # NORMS meant the block's norms in layers/ and the backbone's in models/: now NORMS and BACKBONE_NORMS
    defined: dict[str, list[str]] = {}
    for path in sorted((MODELS.parent).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith("NORMS"):
                    defined.setdefault(target.id, []).append(path.relative_to(MODELS.parent).as_posix())
    assert defined["NORMS"] == ["layers/nonlocal_block.py"]
    assert defined["BACKBONE_NORMS"] == ["models/resnet3d.py"]
