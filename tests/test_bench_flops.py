"""The benchmarks' flop counts: what torch's FlopCounterMode leaves out (in-place products, SDPA's CPU kernel) is
counted, and the peer table reports each side's flops, so that a time ratio can be read against the arithmetic
each side does."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks._common import count_flops
from nonlocalnet import NonLocalBlock
from nonlocalnet.layers import pairwise_softmax


def _block_flops(impl: str, shape, subsample) -> int:
    torch.manual_seed(0)
    block = NonLocalBlock(shape[1], dim=len(shape) - 2, mode="gaussian", subsample=subsample, impl=impl)
    x = torch.randn(shape, requires_grad=True)
    return count_flops(lambda: block(x).sum().backward())


def test_the_chunked_path_counts_one_more_product_than_dense(monkeypatch):
    # in chunks of 2 query rows, so that all but the first chunk add their key and value gradients in place
    # (baddbmm_, which FlopCounterMode alone does not count)
    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 2 * 18)
    b, c, t, h, w = 2, 16, 2, 6, 6
    n, m = t * h * w, t * (h // 2) * (w // 2)
    shape, subsample = (b, c, t, h, w), (1, 2, 2)
    dense, chunked = _block_flops("dense", shape, subsample), _block_flops("chunked", shape, subsample)
    # dense: S = q kᵀ, y = P v, and in the backward dP, dV, dQ, dK; chunked also recomputes S (C channels)
    assert chunked - dense == 2 * b * n * m * c


def test_sdpa_on_the_cpu_is_counted_forward_and_backward():
    b, n, m, d = 2, 40, 24, 16
    q = torch.randn(b, 1, n, d, requires_grad=True)
    k, v = torch.randn(b, 1, m, d), torch.randn(b, 1, m, d)
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # forward q kᵀ and P v; backward: q kᵀ again, dP = dY vᵀ, dV = Pᵀ dY, dQ = dS k, dK = dSᵀ q (no gradient
    # asked for k and v, but the kernel computes all three)
    assert flops == 2 * b * n * m * (2 * d) + 2 * b * n * m * (5 * d)


def test_the_peer_table_reports_the_flops_of_each_side(tmp_path, capsys):
    pytest.importorskip("mmcv.cnn")
    from benchmarks.compare.__main__ import QUICK_SHAPES, main
    out = tmp_path / "compare.json"
    main(["--quick", "--sections", "table", "--peers", "mmcv", "--variants", "gaussian", "--shapes", "res3",
          "--repeats", "1", "--no-memory", "--json", str(out)])
    (row,) = json.loads(out.read_text())["table"]
    assert row["status"] == "ok", row
    (b, c, t, h, w), _, _ = QUICK_SHAPES["res3"]
    n, m = t * h * w, t * (h // 2) * (w // 2)
    # the same projections on both sides; ours keeps no N x M matrix and recomputes S = x x̂ᵀ (C channels)
    assert round((row["ours_gflop"] - row["peer_gflop"]) * 1e9) == 2 * b * n * m * c
    ratio = f"{row['peer_gflop'] / row['ours_gflop']:.2f}x"
    assert any(line.startswith("| res3 | mmcv | gaussian") and f"| {ratio} |" in line
               for line in capsys.readouterr().out.splitlines())
