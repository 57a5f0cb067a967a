"""The attention diagnostic on blocks built to be query-independent, query-specific and dead, with the values
computed by hand; the table, the chart, the command, and the training-time warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from nonlocalnet.cli import main as cli_main
from nonlocalnet.layers import NonLocalBlock
from nonlocalnet.viz.diagnostics import (
    diagnose_attention,
    diagnosis_table,
    draw_diagnosis,
    inactive_blocks,
    warn_inactive_blocks,
)

L = 8  # positions of the sequence; as many channels, so that position i can be the unit vector e_i


def unit_vectors(batch: int = 2) -> torch.Tensor:
    """x (B, L, L) whose position i is e_i: x[b, :, i] = e_i."""
    return torch.eye(L).expand(batch, L, L).clone()


def sequence_block(norm: str | None = None) -> NonLocalBlock:
    block = NonLocalBlock(L, dim=1, inter_channels=L, norm=norm, init="pytorch")
    return block.eval()


def set_conv(conv: torch.nn.Module, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        conv.weight.copy_(matrix.unsqueeze(-1))  # (Cout, Cin) -> (Cout, Cin, 1)
        conv.bias.zero_()


def shift_to_next(scale: float = 20.0) -> NonLocalBlock:
    """Query i attends to key i + 1 (mod L) alone: θ(e_i) = s e_{i+1}, φ = s I, so θ_iᵀφ_j = s² [j = i + 1]
    (e^-400 is 0 in float32: one-hot weights); g = I and W_z = I with no norm, so the term is y_i = e_{i+1}."""
    block = sequence_block()
    shift = torch.roll(torch.eye(L), 1, dims=0)  # shift @ e_i = e_{i+1 mod L}
    set_conv(block.theta, scale * shift)
    set_conv(block.phi, scale * torch.eye(L))
    set_conv(block.g, torch.eye(L))
    set_conv(block.out, torch.eye(L))
    return block


def test_one_hot_attention_has_the_largest_distance_no_entropy_and_the_hand_offset():
    d = diagnose_attention(shift_to_next(), unit_vectors())[""]
    assert d.query_distance == 1.0  # e_{i+1} and e_{k+1} are orthogonal for i != k: cosine distance 1
    assert d.entropy == 0.0  # one key per query
    # the strongest key is one position on, except for the last query, which wraps to position 0: |Δ| = L - 1
    assert d.offset == (pytest.approx(2 * (L - 1) / L), 0.0, 0.0)
    assert d.contribution == pytest.approx(1.0)  # the term y_i = e_{i+1} has the norm of x_i = e_i
    assert d.gamma is None and d.w_z_norm == pytest.approx(math.sqrt(L))  # ‖I‖ = √L
    assert not d.at_identity and not d.uniform


def test_theta_zero_makes_every_query_attend_alike_and_uniformly():
    block = shift_to_next()
    set_conv(block.theta, torch.zeros(L, L))  # θ = 0: every logit is 0
    d = diagnose_attention(block, unit_vectors())[""]
    assert d.query_distance == pytest.approx(0.0, abs=1e-12)
    assert d.entropy == pytest.approx(1.0, abs=1e-12)
    assert d.offset[0] == pytest.approx(sum(range(L)) / L)  # every query's argmax is the first key (a tie)
    assert d.uniform


def test_query_independent_but_peaked_attention_has_distance_zero_and_the_softmax_entropy():
    block = shift_to_next()
    set_conv(block.theta, torch.zeros(L, L))
    with torch.no_grad():
        block.theta.bias.copy_(torch.arange(L, dtype=torch.float32) / 4)  # θ_i = b for every query
        block.phi.weight.copy_(torch.eye(L).unsqueeze(-1))  # φ_j = e_j: logits θ_iᵀφ_j = b_j
    p = torch.softmax(torch.arange(L, dtype=torch.float64) / 4, 0)
    d = diagnose_attention(block, unit_vectors())[""]
    assert d.query_distance == pytest.approx(0.0, abs=1e-6)
    assert d.entropy == pytest.approx(float(-(p * p.log()).sum() / math.log(L)), abs=1e-6)
    assert d.offset[0] == pytest.approx(sum(abs(L - 1 - i) for i in range(L)) / L)  # all pick the last key


def test_a_block_with_gamma_zero_is_dead():
    block = sequence_block(norm="batch")  # γ = 0 at init
    d = diagnose_attention(block, unit_vectors())[""]
    assert d.contribution == 0.0 and d.gamma == 0.0 and d.at_identity
    assert inactive_blocks({"": d})[0].startswith("non-local block  is still at the identity: its term is 0 of")


def test_several_clips_average_their_values():
    block = shift_to_next()
    one = diagnose_attention(block, unit_vectors())[""]
    two = diagnose_attention(block, [unit_vectors(), unit_vectors(1)])[""]
    assert two.offset == one.offset and two.query_distance == one.query_distance


def test_table_and_chart(tmp_path):
    d = diagnose_attention(shift_to_next(), unit_vectors())
    table = diagnosis_table(d)
    assert table.splitlines()[0].split()[:4] == ["block", "mode", "query", "dist"]
    assert table.splitlines()[2].split()[:4] == ["(model)", "embedded_gaussian", "1.000", "0.000"]
    path = draw_diagnosis(d, tmp_path / "d.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_command_prints_the_table_draws_and_writes_json(tmp_path, capsys):
    from nonlocalnet.models import create_model
    from nonlocalnet.models.checkpoints.weights import save_weights

    model = create_model("nl_c2d_tiny")
    checkpoint = tmp_path / "tiny.safetensors"
    save_weights(model, checkpoint, metadata={"model": "nl_c2d_tiny"})
    clip = tmp_path / "clip.npy"
    import numpy as np

    np.save(clip, np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "diag.png"
    assert (
        cli_main(
            [
                "attention",
                "--checkpoint",
                str(checkpoint),
                str(clip),
                "--out",
                str(out),
                "--json",
                str(tmp_path / "d.json"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "res3.nl0" in text and "identity" in text  # a model at init: γ = 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["blocks"]["res3.nl0"]["contribution"] == 0.0


def test_attention_command_reads_a_video_list_and_refuses_no_input(tmp_path, capsys):
    import numpy as np

    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((8, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("a.npy 3\nb.npy 1,2\n")
    out = tmp_path / "d.json"
    assert (
        cli_main(
            [
                "attention",
                "--model",
                "nl_c2d_tiny",
                "--list",
                str(tmp_path / "list.txt"),
                "--out",
                str(tmp_path / "d.png"),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["inputs"] == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
    assert "on 2 clip(s) of 8x32x32" in capsys.readouterr().out
    assert cli_main(["attention", "--model", "nl_c2d_tiny"]) == 2
    assert "error: no video or clip given" in capsys.readouterr().err


def test_training_warns_once_about_a_block_still_at_the_identity(tmp_path, caplog):
    from nonlocalnet.engine import load_config, train

    overrides = [
        "progress=false",
        "data.test_size=8",
        "data.train_size=16",
        "train.batch_size=4",
        "train.iterations=3",
        "train.log_every=1",
        "train.precise_bn_batches=1",
        "train.lr=0.0",
        "train.check_blocks_after=2",
        f"output_dir={tmp_path / 'run'}",
    ]
    with caplog.at_level(logging.WARNING, logger="nonlocalnet"):
        train(load_config("configs/synthetic/nl_c2d_tiny.yaml", overrides))
    warnings = [r.getMessage() for r in caplog.records if "non-local block" in r.getMessage()]
    # γ = 0 and, with lr 0, still 0; the pytorch init's θ and φ give near-zero logits on these clips: uniform
    assert len(warnings) == 2  # once, at step 2 of 3
    assert warnings[0].startswith(
        "after 2 steps, non-local block res3.nl0 is still at the identity: its term is 0 "
        "of its input (below 0.01, mean |γ| 0, ‖W_z‖ "
    )
    assert warnings[1].startswith(
        "after 2 steps, non-local block res3.nl0 still attends uniformly: normalised "
        "entropy 1.000 (above 0.99; 1 = uniform), query distance 0.0"
    )


def test_warn_inactive_blocks_says_nothing_of_a_working_block():
    assert warn_inactive_blocks(shift_to_next(), unit_vectors(), 10) == []


def test_a_check_that_does_not_fit_is_a_warning_not_a_failure(caplog):
    block = shift_to_next()
    block.attention_budget_bytes = 16  # below the (2, 8, 8) weights
    with caplog.at_level(logging.WARNING, logger="nonlocalnet"):
        assert warn_inactive_blocks(block, unit_vectors(), 5) == []
    assert (
        caplog.records[-1]
        .getMessage()
        .startswith(
            "after 5 steps, the non-local blocks could not be checked: "
            "return_attention=True would build a (2, 8, 8) float32"
        )
    )


def test_a_run_resumes_with_another_check_step_or_none_recorded():
    from nonlocalnet.engine.rundir import config_changes

    old = {"train": {"lr": 0.1}}  # a config written before the key existed
    assert config_changes(old, {"train": {"lr": 0.1, "check_blocks_after": 1000}}) == []
