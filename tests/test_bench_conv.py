"""benchmarks/conv.py: each row times our convolution against torch's dispatch and says which kernels ours took."""

from __future__ import annotations

import json

import pytest

from benchmarks import conv as bench


def test_the_conv_benchmark_reports_the_kernels_the_rules_pick(tmp_path, capsys, monkeypatch):
    chosen = {name: case for case in bench.CASES for name in [case[0]]}
    monkeypatch.setattr(
        bench,
        "CASES",
        tuple(chosen[n] for n in ("res2 3x1x1 256->64", "res4 1x1x1 1024->512 (NL)", "tiny 1x1x1 16->16")),
    )
    monkeypatch.setattr(bench, "POOLS", bench.POOLS[-1:])  # the tiny map
    out = tmp_path / "conv.json"
    bench.main(["--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"] == f"python -m benchmarks.conv --repeats 1 --json {out}"
    rows = {row["name"]: row for row in saved["rows"]}
    # a temporal kernel on res2's map: oneDNN both ways, with the module's own backward
    assert rows["res2 3x1x1 256->64"]["infer_onednn"] and rows["res2 3x1x1 256->64"]["train_own_backward"]
    # a pointwise kernel on 49 positions per sample, and a tiny call: torch's kernels
    for name in ("res4 1x1x1 1024->512 (NL)", "tiny 1x1x1 16->16"):
        assert not rows[name]["infer_onednn"] and not rows[name]["train_onednn"]
        assert not rows[name]["train_own_backward"]
    for row in rows.values():
        assert row["train_ratio"] == pytest.approx(row["train_torch_ms"] / row["train_ours_ms"], rel=1e-12)
    (pool,) = saved["pools"]
    assert pool["name"] == bench.POOLS[-1][0]
    assert pool["infer_ratio"] == pytest.approx(pool["infer_torch_ms"] / pool["infer_ours_ms"], rel=1e-12)
    printed = capsys.readouterr().out
    assert "| res2 3x1x1 256->64 | 2x256x4x28x28 | oneDNN |" in printed
    assert "oneDNN, own backward" in printed
