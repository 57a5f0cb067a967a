"""benchmarks/block.py end to end at tiny sizes: the options the GPU script passes (--autocast, --json) and the
chunk size option, read back from its table and JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import block
from nonlocalnet.layers import pairwise_softmax


def test_block_benchmark_under_autocast_with_a_chunk_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", pairwise_softmax.CHUNK_ELEMENTS)  # restored after
    monkeypatch.setattr(pairwise_softmax, "GPU_CHUNK_ELEMENTS", pairwise_softmax.GPU_CHUNK_ELEMENTS)
    out = tmp_path / "rows.json"
    block.main(
        [
            "--quick",
            "--shapes",
            "tiny_res3",
            "--modes",
            "gaussian",
            "--repeats",
            "1",
            "--no-memory",
            "--chunk-elements",
            "64",
            "--autocast",
            "bf16",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "; autocast bf16; chunks of 64 weights" in printed.splitlines()[0]
    assert pairwise_softmax.CHUNK_ELEMENTS == 64  # the chunked rows ran in chunks of 64 weights
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m benchmarks.block --quick --shapes tiny_res3")
    assert {"machine", "torch", "date"} <= set(saved)
    rows = saved["rows"]
    assert [r["impl"] for r in rows] == block.paths("gaussian")
    assert all(r["autocast"] == "bf16" and r["ms"] > 0 for r in rows)
    assert next(r for r in rows if r["impl"] == "dense")["speedup"] == 1.0
    # auto's path is marked in the table, and the summary says how it compares with the fastest measured
    chosen = block.auto_choice("tiny_res3", "gaussian", "cpu", "bf16")
    assert chosen == "dense"  # 1 x 392 x 98 weights: a tiny problem on a CPU (pairwise.CPU_DENSE_MAX_WEIGHTS)
    lines = printed.splitlines()
    assert [
        line.split(" | ")[2] for line in lines if line.startswith("| tiny_res3 | gaussian |") and "x |" in line
    ] == [
        "dense (auto)",
        "sdpa",
        "chunked",
    ]
    (plan,) = saved["plans"]
    fastest = min(rows, key=lambda r: r["ms"])
    assert plan == dict(
        shape="tiny_res3",
        mode="gaussian",
        auto="dense",
        fastest=fastest["impl"],
        speed_of_fastest=pytest.approx(fastest["ms"] / rows[0]["ms"]),
    )
    assert [r["auto"] for r in rows] == [True, False, False]
