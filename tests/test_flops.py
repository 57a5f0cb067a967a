"""Cost counting: torch's FLOP counter against an independent count, the paper's numbers, the table, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nonlocalnet.cli import main as cli_main
from nonlocalnet.layers import IMPLS_BY_MODE, NonLocalBlock
from nonlocalnet.models import create_model
from nonlocalnet.models.flops import count_cost, model_cost


def independent_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds from the layers' shapes: every conv and fc, and each non-local block's two attention products."""
    total = 0

    def conv_hook(m, inputs, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    def nonlocal_hook(m, inputs, out):
        nonlocal total
        b, c, t, h, w = inputs[0].shape
        st, sh, sw = m.subsample or (1, 1, 1)
        n, k = t * h * w, (t // st) * (h // sh) * (w // sw)
        f = {"gaussian": c, "concatenation": 2 * m.inter_channels}.get(m.mode, m.inter_channels)
        total += b * n * k * (f + m.inter_channels)  # f(x_i, x_j) for every pair, then Σ_j f g_j

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, NonLocalBlock):
            hooks.append(m.register_forward_hook(nonlocal_hook))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["c2d_r50", "nl_i3d_r50", "i3d3x3x3_r50_8x8"])
@pytest.mark.parametrize("fake", [True, False])
def test_counted_macs_equal_an_independent_count(name, fake):
    model = create_model(name, layers=(2, 4, 6, 2), width=4, num_classes=5)
    frames = 8 if name.endswith("8x8") else 32
    x = torch.randn(2, 3, frames, 64, 64)
    report = count_cost(model, tuple(x.shape), fake=fake)
    assert report.macs == independent_macs(model, x) > 0
    assert report.flops == 2 * report.macs
    assert report.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
def test_every_mode_and_path_is_counted_by_the_papers_definition(mode):
    # the same count whichever exact path runs: dense (plain matmuls, counted by every torch), SDPA (counted by
    # some torch versions' FLOP counters, not by others), the linear and sorted paths (fewer operations)
    x = torch.randn(2, 3, 32, 64, 64)
    counts = set()
    for impl in ("auto",) + IMPLS_BY_MODE[mode]:
        torch.manual_seed(0)
        model = create_model(
            "nl_i3d_r50", layers=(2, 4, 6, 2), width=4, num_classes=5, nonlocal_options={"mode": mode, "impl": impl}
        )
        counts.add(count_cost(model, tuple(x.shape)).macs)
    assert counts == {independent_macs(model, x)}


def test_pairwise_macs_reported_per_block_row():
    report = model_cost("nl1_c2d_r50", depth=2)
    nl = next(r for r in report.rows if r.name == "res4.nl4")
    n, m = 4 * 14 * 14, 4 * 7 * 7  # queries, max-pooled keys
    projections = n * 1024 * 512 + 2 * m * 1024 * 512 + n * 512 * 1024  # θ(x), φ(x̂), g(x̂), W_z
    assert nl.macs == projections + n * m * (512 + 512)


@pytest.mark.parametrize(
    "name,frames,gmacs",
    [
        ("c2d_r50_8x8", 8, 19.5),  # PAPER.md: mmaction2 lists 19 G
        ("c2d_r50", 32, 20.4),
        ("i3d_r50", 32, 33.1),
        ("nl_i3d_r50", 32, 41.3),
    ],
)
def test_full_size_costs_match_the_papers_numbers(name, frames, gmacs):
    report = model_cost(name, (frames, 224, 224))
    assert report.macs / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_cost_at_256_matches_pytorchvideo():
    # PyTorchVideo lists C2D R50 8x8 at 256x256 as 25.89 G
    assert model_cost("c2d_r50_8x8", (8, 256, 256)).macs / 1e9 == pytest.approx(25.89, abs=0.6)


def test_stage_rows_add_up_to_the_totals_and_show_table1_sizes():
    report = model_cost("nl_i3d_r50", depth=1)
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["conv1", "bn1", "relu", "pool1", "res2", "pool2", "res3", "res4", "res5", "head"]
    assert sum(r.params for r in report.rows) == report.params == 35_401_936
    assert sum(r.macs for r in report.rows) == report.macs
    assert rows["res4"].output_shape == (1024, 4, 14, 14) and rows["pool1"].output_shape == (64, 8, 56, 56)
    assert rows["pool1"].macs == 0 and rows["res3"].macs > 0


def test_block_rows_show_the_nonlocal_blocks():
    report = model_cost("nl1_c2d_r50", depth=2)
    names = [r.name for r in report.rows]
    assert names.index("res4.nl4") == names.index("res4.4") + 1
    nl = next(r for r in report.rows if r.name == "res4.nl4")
    assert nl.params == 2_101_760 and nl.output_shape == (1024, 4, 14, 14)
    table = report.table()
    assert "res4.nl4" in table and table.splitlines()[-1].split()[:2] == ["total", "26,429,392"]


def test_counting_leaves_the_model_as_it_was():
    model = create_model("c2d_r50", layers=(1, 1, 1, 1), width=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_cost(model, (1, 3, 32, 64, 64))
    assert model.training and not any(m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics untouched


def test_cli_prints_table_and_totals_for_an_8_frame_clip(capsys):
    assert cli_main(["flops", "c2d_r50", "--clip", "8x224x224"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "c2d_r50: clip layout 8x8 (the name's own layout is 32x2)"
    assert "res4.5" in out and "head.fc" in out
    assert out.strip().splitlines()[-1] == (
        "input 1x3x8x224x224: 24,327,632 parameters (24.33 M), 19.49 G multiply-adds (38.99 GFLOPs)"
    )


def test_cli_keeps_the_named_layout_when_asked(capsys):
    assert cli_main(["flops", "c2d_r50", "--clip", "8x224x224", "--layout", "32x2", "--depth", "1"]) == 0
    assert "5.11 G multiply-adds" in capsys.readouterr().out


def test_cli_errors(capsys):
    assert cli_main(["flops", "c2d_r52"]) == 2
    assert "unknown model 'c2d_r52'" in capsys.readouterr().err
    assert cli_main(["flops", "c2d_r50", "--clip", "8x224"]) == 2  # argparse's errors are one line too
    assert capsys.readouterr().err.strip() == (
        "nonlocalnet flops: error: argument --clip: --clip must be TxHxW, e.g. 8x224x224; got '8x224' "
        "(see nonlocalnet flops --help)"
    )
    assert cli_main(["flops", "c2d_r50", "--set", "depth=50"]) == 2
    assert "unknown option(s) 'depth'" in capsys.readouterr().err
