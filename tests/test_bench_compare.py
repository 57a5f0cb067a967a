"""The weight mappings of benchmarks/compare: a peer's weights loaded into our block give the peer's output.

The peers come with the optional ``bench`` extra (``pip install -e ".[bench]"``); without it their tests skip.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks.compare import peers, scale, table
from nonlocalnet import NonLocalBlock

VIDEO = ((2, 16, 2, 6, 6), (1, 2, 2))
IMAGE = ((2, 16, 6, 8), None)
IMAGE_SUBSAMPLED = ((2, 16, 6, 8), (2, 2))


def _check(peer: str, variant: str, shape, subsample, impl: str = "auto") -> dict:
    pair = peers.build_pair(peer, variant, shape, subsample, seed=1, impl=impl)
    pair.peer.double().train()
    pair.ours.double().train()
    x = torch.randn(pair.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return peers.check_equivalence(pair, x)


def _assert_same(result: dict) -> None:
    assert result["error"] is None
    assert result["term"] > 0.1  # the non-local term is alive: equality is not z == x on both sides
    assert result["z_diff"] < 1e-9, result
    assert result["grad_diff"] < 1e-9, result
    assert result["agree"]


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product"])
@pytest.mark.parametrize("shape, subsample", [VIDEO, IMAGE, IMAGE_SUBSAMPLED], ids=["video", "image", "image-sub"])
def test_mmcv_weights_give_mmcv_output(mode, shape, subsample):
    pytest.importorskip("mmcv.cnn")
    _assert_same(_check("mmcv", mode, shape, subsample))


@pytest.mark.parametrize("impl", ["dense", "sorted"])
def test_mmcv_concatenation_forward_matches_and_its_backward_is_reported_failed(impl):
    pytest.importorskip("mmcv.cnn")
    result = _check("mmcv", "concatenation", *VIDEO, impl=impl)
    assert result["z_diff"] < 1e-9 and result["term"] > 0.1
    # mmcv divides the ReLU's output in place, which autograd refuses: the table marks the peer failed
    assert result["error"].startswith("backward raises RuntimeError")


def test_mmcv_subsample_position_matters():
    """The check is not vacuous: pooling before the projections (not mmcv's order) changes the output."""
    pytest.importorskip("mmcv.cnn")
    pair = peers.build_pair("mmcv", "dot_product", *VIDEO, seed=1)
    wrong = NonLocalBlock(16, **{**pair.options, "subsample_position": "input"})
    wrong.load_state_dict(pair.ours.state_dict())
    pair.ours = wrong
    result = peers.check_equivalence(pair, torch.randn(VIDEO[0]))
    assert not result["agree"] and result["z_diff"] > 1e-3


def test_timm_weights_give_timm_output():
    pytest.importorskip("timm.layers")
    shape = (2, 32, 6, 7)
    result = _check("timm", "NonLocalAttn", shape, None)
    _assert_same(result)
    pair = peers.build_pair("timm", "NonLocalAttn", shape, None)
    assert pair.ours.inter_channels == 8 and pair.ours.scale == pytest.approx(32**-0.5)  # C/8, C^-1/2


def test_timm_has_no_video_or_subsampled_configuration():
    pytest.importorskip("timm.layers")
    with pytest.raises(peers.NotApplicable, match="2D without subsampling"):
        peers.build_pair("timm", "NonLocalAttn", *VIDEO)


@pytest.mark.parametrize("variant", ["softmax", "dot_product"])
@pytest.mark.parametrize("shape, subsample", [VIDEO, IMAGE_SUBSAMPLED], ids=["video", "image-as-1-frame"])
def test_pytorchvideo_weights_give_pytorchvideo_output(variant, shape, subsample):
    pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    result = _check("pytorchvideo", variant, shape, subsample)
    _assert_same(result)


def test_our_path_is_what_auto_picks(monkeypatch):
    pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    from nonlocalnet.layers import pairwise

    pair = peers.build_pair("pytorchvideo", "softmax", *VIDEO)
    assert peers.our_path(pair) == "dense"  # a tiny problem on a CPU
    monkeypatch.setattr(pairwise, "_memory_budget", 0)  # no memory for the dense matrix
    assert peers.our_path(pair) == "chunked"
    x = torch.randn(pair.input_shape)
    pair.ours(x)
    assert list(pair.ours._plans.values()) == ["chunked"]  # what the block itself planned


def test_scale_sides_double_the_positions():
    assert scale.scale_sides(128) == [32, 45, 64, 91, 128]


def test_peer_estimate_counts_the_dense_matrices():
    # res3 of a 128-frame clip: B=1, N=12544, M=3136: four float32 (N, M) matrices ~ 0.63 GB, plus activations
    gb = table.estimate_peer_gb("mmcv", "embedded_gaussian", (1, 512, 16, 28, 28), (1, 2, 2))
    assert 0.8 < gb < 1.0
    # mmcv's concatenation repeats θ and φ to (B, C', N, M): at res3 about 4·256 such matrices of 20 MB
    assert 19 < table.estimate_peer_gb("mmcv", "concatenation", (2, 512, 4, 28, 28), (1, 2, 2)) < 22


def test_the_models_section_times_ours_and_the_peer_side_by_side(tmp_path):
    """The pair ran in one child: a row per variant of ours against the same peer measurement, the ratios ours /
    peer; where the peer is not installed, its row says so and nothing is timed."""
    from benchmarks.compare.__main__ import main

    out = tmp_path / "models.json"
    main(
        [
            "--quick",
            "--sections",
            "models",
            "--pairs",
            "nl_c2d_tiny=pytorchvideo:c2d_r50",
            "--model-variants",
            "torch_conv",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["models"]
    assert [(r["ours"], r["variant"], r["peer"]) for r in rows] == [
        ("nl_c2d_tiny", "default", "pytorchvideo:c2d_r50"),
        ("nl_c2d_tiny", "torch_conv", "pytorchvideo:c2d_r50"),
    ]
    if importlib.util.find_spec("pytorchvideo") is None:
        assert all(r["status"].startswith("unavailable: ModuleNotFoundError") for r in rows)
        return
    assert all(r["status"] == "ok" for r in rows), rows
    assert rows[0]["peer_train_per_s"] == rows[1]["peer_train_per_s"]  # one peer measurement for the pair
    for r in rows:
        assert r["train_ratio"] == r["ours_train_per_s"] / r["peer_train_per_s"]
        assert r["infer_ratio"] == r["ours_infer_per_s"] / r["peer_infer_per_s"]
        assert r["ours_params_m"] < 1 < r["peer_params_m"]  # the tiny network against PyTorchVideo's C2D R50


def test_the_overhead_section_checks_the_pair_then_times_both(tmp_path):
    pytest.importorskip("mmcv.cnn")
    from benchmarks.compare.__main__ import main

    out = tmp_path / "overhead.json"
    main(["--quick", "--sections", "overhead", "--peers", "mmcv", "--json", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["overhead"]}
    assert set(rows) == {"embedded_gaussian", "gaussian", "dot_product", "concatenation"}
    assert rows["concatenation"]["status"].startswith("backward raises")  # mmcv's in-place ReLU
    for variant in ("embedded_gaussian", "gaussian", "dot_product"):
        r = rows[variant]
        assert r["status"] == "ok", r
        assert r["wall_ratio"] == r["peer_wall_ms"] / r["ours_wall_ms"]
        assert r["cpu_ratio"] == r["peer_cpu_ms"] / r["ours_cpu_ms"]
