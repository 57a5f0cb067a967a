"""The benchmarks' flop counts: what torch's FlopCounterMode leaves out (in-place products, SDPA's CPU kernel) is
counted, and the peer table reports each side's flops, so that a time ratio can be read against the arithmetic
each side does."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import count_flops
from nonlocalnet import NonLocalBlock
from nonlocalnet.layers import pairwise, pairwise_softmax


class _Ops(TorchDispatchMode):
    """Records the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _torch_counter_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _gaussian_step(impl: str, shape, subsample):
    torch.manual_seed(0)
    block = NonLocalBlock(shape[1], dim=len(shape) - 2, mode="gaussian", subsample=subsample, impl=impl)
    x = torch.randn(shape, requires_grad=True)
    return lambda: block(x).sum().backward()


def test_the_chunked_path_counts_one_more_product_than_dense(monkeypatch):
    # in chunks of 2 query rows, so that all but the first chunk add their key and value gradients in place
    # (baddbmm_, which FlopCounterMode alone does not count)
    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 2 * 18)
    b, c, t, h, w = 2, 16, 2, 6, 6
    n, m = t * h * w, t * (h // 2) * (w // 2)
    shape, subsample = (b, c, t, h, w), (1, 2, 2)
    dense, chunked = (count_flops(_gaussian_step(impl, shape, subsample)) for impl in ("dense", "chunked"))
    # dense: S = q kᵀ, y = P v, and in the backward dP, dV, dQ, dK; chunked also recomputes S (C channels)
    assert chunked - dense == 2 * b * n * m * c
    assert _torch_counter_flops(_gaussian_step("chunked", shape, subsample)) < chunked  # what torch leaves out


def test_sdpa_on_the_cpu_is_counted_forward_and_backward():
    b, n, m, d = 2, 40, 24, 16
    q = torch.randn(b, 1, n, d, requires_grad=True)
    k, v = torch.randn(b, 1, m, d), torch.randn(b, 1, m, d)
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    with _Ops() as ops:  # the kernel counted: SDPA's CPU flash kernel, not its math fallback
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert {
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    } <= ops.names
    # forward q kᵀ and P v; backward: q kᵀ again, dP = dY vᵀ, dV = Pᵀ dY, dQ = dS k, dK = dSᵀ q (no gradient
    # asked for k and v, but the kernel computes all three)
    assert flops == 2 * b * n * m * (2 * d) + 2 * b * n * m * (5 * d)


def test_the_peer_table_counts_mmcv_against_our_chunks(monkeypatch):
    pytest.importorskip("mmcv.cnn")
    from benchmarks.compare import table

    monkeypatch.setattr(pairwise_softmax, "CHUNK_ELEMENTS", 2 * 18)  # many chunks, accumulated in place
    monkeypatch.setattr(pairwise, "_memory_budget", 0)  # no memory for the dense matrix: the chunked path
    b, c, t, h, w = 1, 16, 2, 6, 6
    n, m = t * h * w, t * (h // 2) * (w // 2)
    counts = table.count_pair_flops("mmcv", "gaussian", (b, c, t, h, w), (1, 2, 2))
    assert "flops_error" not in counts, counts
    # the same projections on both sides; ours keeps no N x M matrix and recomputes S = x x̂ᵀ (C channels)
    assert round((counts["ours_gflop"] - counts["peer_gflop"]) * 1e9) == 2 * b * n * m * c


def test_the_peer_table_prints_the_flops_column(tmp_path, capsys):
    pytest.importorskip("mmcv.cnn")
    from benchmarks.compare.__main__ import main

    out = tmp_path / "compare.json"
    main(
        [
            "--quick",
            "--sections",
            "table",
            "--peers",
            "mmcv",
            "--variants",
            "embedded_gaussian",
            "--shapes",
            "res3",
            "--repeats",
            "1",
            "--no-memory",
            "--json",
            str(out),
        ]
    )
    (row,) = json.loads(out.read_text())["table"]
    assert row["status"] == "ok", row
    assert row["ours_path"] == "dense"  # the embedded gaussian of this size on a CPU (pairwise.resolve_impl)
    # the same projections and the same products on both sides (ours keeps the N x M weights too)
    assert row["ours_gflop"] == row["peer_gflop"] > 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| shape | peer |")).split(" | ")
    cells = next(line for line in lines if line.startswith("| res3 | mmcv | embedded_gaussian")).split(" | ")
    assert cells[header.index("flops peer/ours")] == f"{row['peer_gflop'] / row['ours_gflop']:.2f}x"


def test_the_efficiency_section_counts_what_each_path_computes(tmp_path):
    from benchmarks.compare.__main__ import QUICK_SHAPES, main

    out = tmp_path / "efficiency.json"
    main(
        [
            "--quick",
            "--sections",
            "efficiency",
            "--efficiency-shape",
            "res3",
            "--repeats",
            "1",
            "--matmul-n",
            "256",
            "--json",
            str(out),
        ]
    )
    rows = {(r["mode"], r["impl"]): r for r in json.loads(out.read_text())["efficiency"]["rows"]}
    (b, c, t, h, w), _, _ = QUICK_SHAPES["res3"]
    n, m, inter = t * h * w, t * (h // 2) * (w // 2), c // 2

    def extra(mode: str, impl: str) -> int:  # flops over the dense path of the same mode
        return round((rows[mode, impl]["gflop"] - rows[mode, "dense"]["gflop"]) * 1e9)

    # the recomputed logits: C raw channels for the gaussian, C' for the embedded gaussian; SDPA's kernel counted
    assert extra("gaussian", "chunked") == 2 * b * n * m * c
    assert extra("embedded_gaussian", "chunked") == extra("embedded_gaussian", "sdpa") == 2 * b * n * m * inter
