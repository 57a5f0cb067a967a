"""The cost estimate: the simulated allocator's counts by hand, the estimate against the measured peak of real
steps (CPU resident set in a child process; torch.cuda's peak allocation on a GPU), the command line."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nonlocalnet
from nonlocalnet.cli import main as cli_main
from nonlocalnet.layers import NonLocalBlock
from nonlocalnet.models import create_model
from nonlocalnet.models.cost import AS_BUILT, estimate_cost, zoo_cost_rows
from nonlocalnet.models.memory import LiveBytes

# The estimate against the measured peak of a step. On CPU the simulation matched every measured case within 1.5%
# (docs/cost.md); 5% leaves room for what it cannot see (kernel scratch below the dispatcher, malloc's small-block
# heap, page rounding) and still fails on a missing activation, gradient or N x M matrix, which are each far more.
CPU_MARGIN = 0.05
# On a GPU cuDNN's convolution workspaces (freed inside the op, counted by max_memory_allocated) come on top.
CUDA_MARGIN = 0.25


def test_live_bytes_counts_saved_tensors_and_gradients_as_they_live():
    n = 1000
    live = LiveBytes()
    with FakeTensorMode(), live:
        x = torch.zeros(n, requires_grad=True)  # 4n bytes
        y = x.exp()  # 4n, saved by exp's backward
        z = y.sum()  # 4
        assert live.current == 8 * n + 4
        z.backward()  # the scalar grad (4), then dx = grad * y (4n), kept as x.grad
        assert live.peak == 12 * n + 8
        del y, z
        assert live.current == 8 * n  # x and x.grad


def test_views_share_their_storage_in_the_count():
    live = LiveBytes()
    with FakeTensorMode(), live:
        x = torch.zeros(10, 10)
        views = [x.view(100), x.t(), x[2:]]
        assert live.current == 400 and len(views) == 3


def test_dense_path_keeps_the_n_by_m_weights_the_others_do_not():
    # one block alone, training: the dense path saves the softmax weights (B, N, M) for its backward pass
    b, c, t, h, w = 2, 64, 4, 8, 8
    n, m = t * h * w, t * (h // 2) * (w // 2)
    block = NonLocalBlock(c, subsample=(1, 2, 2))
    est = estimate_cost(BlockAsModel(block), (t, h, w), batch=b, train=True)
    paths = {p.path: p for p in est.blocks[0].paths}
    # both keep q, k, v and y (which W_z keeps anyway); the dense path keeps the (B, N, M) float32 softmax
    # output for the backward passes of softmax and of the product with v, the chunked path recomputes it
    extra = paths["dense"].kept_bytes - paths["chunked"].kept_bytes
    assert extra == 4 * b * n * m


def test_each_path_counts_the_products_it_runs():
    # inference of a dot-product block: the dense path forms θφᵀ (N·M·Cq) and multiplies it by g (N·M·Cv); the
    # linear path forms φᵀg (M·Cq·Cv) and multiplies θ by it (N·Cq·Cv); the projections are the same on both
    b, c, t, h, w = 2, 32, 2, 6, 6
    n = t * h * w
    m, cq = n, c // 2
    block = NonLocalBlock(c, mode="dot_product")
    paths = {p.path: p for p in estimate_cost(BlockAsModel(block), (t, h, w), batch=b).blocks[0].paths}
    assert paths["dense"].macs - paths["linear"].macs == b * (n * m * 2 * cq - (n + m) * cq * cq)
    assert paths["dense"].macs == b * (n * m * 2 * cq + 4 * n * c * cq)  # + θ, φ, g, W_z


class BlockAsModel(torch.nn.Module):
    """A block behind a 1x1x1 conv1, as a whole model: estimate_cost reads the input's channels from conv1."""

    def __init__(self, block: NonLocalBlock) -> None:
        super().__init__()
        self.block = block
        self.conv1 = torch.nn.Conv3d(block.in_channels, block.in_channels, 1, bias=False)  # the input's channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv1(x))


def test_estimate_of_a_module_leaves_its_weights_alone_and_counts_its_parameters():
    model = create_model("nl_c2d_tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = nonlocalnet.estimate_cost(model, (8, 32, 32), batch=2, train=True, blocks_alone=False)
    assert est.params == sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert [s.path for s in est.steps] == [AS_BUILT, "dense", "sdpa", "chunked"]
    # "auto" takes the dense path for the smallest blocks on a CPU; with no memory for it, the chunked path
    # everywhere (resolve_impl), and the estimate follows the budget
    assert est.step("chunked").peak_bytes != est.peak_bytes
    from nonlocalnet.layers import set_memory_budget

    try:
        set_memory_budget(0)
        lean = nonlocalnet.estimate_cost(model, (8, 32, 32), batch=2, train=True, blocks_alone=False)
    finally:
        set_memory_budget(None)
    assert lean.step("chunked").peak_bytes == lean.peak_bytes


def test_inference_step_needs_less_than_training_and_keeps_nothing():
    train = estimate_cost("nl_c2d_tiny", (8, 32, 32), batch=2, train=True)
    infer = estimate_cost("nl_c2d_tiny", (8, 32, 32), batch=2, train=False)
    assert infer.peak_bytes < train.peak_bytes
    assert all(p.kept_bytes == 0 for b in infer.blocks for p in b.paths)


def test_bad_options_are_refused_with_their_value():
    with pytest.raises(ValueError, match="'linear'"):
        estimate_cost("nl_c2d_tiny", (8, 32, 32), impl="linear")
    with pytest.raises(ValueError, match="amp"):
        estimate_cost("nl_c2d_tiny", (8, 32, 32), amp="int8")
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        estimate_cost("nl_c2d_tiny", (32, 32))


def test_cost_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert (
        cli_main(
            [
                "cost",
                "nl_c2d_tiny",
                "--clip",
                "8x32x32",
                "--batch",
                "2",
                "--train",
                "--impl",
                "chunked",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "res3.nl0" in text and "chunked" in text
    data = json.loads(out.read_text())
    assert data["input_shape"] == [2, 3, 8, 32, 32] and data["train"] is True
    assert [s["path"] for s in data["steps"]] == [AS_BUILT, "chunked"]


def test_cost_command_refuses_a_path_of_no_block_in_one_line(capsys):
    assert cli_main(["cost", "nl_c2d_tiny", "--clip", "8x32x32", "--impl", "sorted"]) == 2
    err = capsys.readouterr().err
    assert "error: impl 'sorted' computes none of this model's non-local modes" in err


def test_zoo_rows_give_each_model_its_own_clip():
    rows = zoo_cost_rows(["nl_c2d_tiny", "c2d_tiny"])
    assert [r["model"] for r in rows] == ["nl_c2d_tiny", "c2d_tiny"]
    assert rows[0]["clip"] == "8x224x224" and set(rows[0]["paths"]) == {"dense", "sdpa", "chunked"}
    assert rows[1]["paths"] == {}


# --- against measurement -----------------------------------------------------------------------------------------

# (what, options, input shape, training step?, autocast) measured in one child process, each after a warm-up step
MEASURED = {
    "tiny ResNet3d with NL": ("model", {"name": "nl_c2d_tiny"}, [8, 3, 8, 112, 112], True, None),
    "C2D R50 with NL, 8x112x112": ("model", {"name": "nl_c2d_r50_8x8"}, [1, 3, 8, 112, 112], True, None),
    "C2D R50 with NL, 8x112x112, inference": ("model", {"name": "nl_c2d_r50_8x8"}, [2, 3, 8, 112, 112], False, None),
    "block dense": ("block", {"mode": "embedded_gaussian", "impl": "dense"}, [2, 256, 8, 28, 28], True, None),
    "block sdpa": ("block", {"mode": "embedded_gaussian", "impl": "sdpa"}, [2, 256, 8, 28, 28], True, None),
    "block chunked": ("block", {"mode": "embedded_gaussian", "impl": "chunked"}, [2, 256, 8, 28, 28], True, None),
    "block gaussian chunked": ("block", {"mode": "gaussian", "impl": "chunked"}, [2, 256, 8, 28, 28], True, None),
    "block dot product linear": ("block", {"mode": "dot_product", "impl": "linear"}, [2, 256, 8, 28, 28], True, None),
    "block concatenation sorted": (
        "block",
        {"mode": "concatenation", "impl": "sorted"},
        [2, 256, 8, 28, 28],
        True,
        None,
    ),
    "block sdpa 16x14x14, no subsampling": (
        "block",
        {"mode": "embedded_gaussian", "impl": "sdpa", "subsample": None},
        [4, 512, 16, 14, 14],
        True,
        None,
    ),
    "block sdpa, bf16 autocast": (
        "block",
        {"mode": "embedded_gaussian", "impl": "sdpa"},
        [2, 256, 8, 28, 28],
        True,
        "bf16",
    ),
    "block dense, bf16 autocast": (
        "block",
        {"mode": "embedded_gaussian", "impl": "dense"},
        [2, 256, 8, 28, 28],
        True,
        "bf16",
    ),
}


def _build(kind: str, options: dict, shape: list[int]) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "model":
        return create_model(options["name"])
    block = NonLocalBlock(
        shape[1], subsample=options.get("subsample", (1, 2, 2)), mode=options["mode"], impl=options["impl"]
    )
    with torch.no_grad():
        block.norm.weight.fill_(1.0)  # a live block: gradients reach every path
    return BlockAsModel(block)


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool, amp: str | None) -> None:
    """The step estimate_cost simulates: forward in train mode (under autocast), the output's mean as the loss,
    backward; or the forward pass in eval mode without gradients."""
    model.train(train)
    with torch.set_grad_enabled(train):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x)
        if train:
            loss = out.float().mean()
            del out  # as in model(x).mean().backward(): only the graph keeps the output
            loss.backward()
            model.zero_grad(set_to_none=True)


def measure_peaks(spec: dict) -> dict:
    """In a fresh process: the resident set's rise over each case's step (benchmarks/_common.py's method)."""
    from benchmarks._common import peak_rss_rise_mb, track_allocations_exactly

    torch.set_num_threads(1)
    track_allocations_exactly()
    out = {}
    for label in spec["cases"]:
        kind, options, shape, train, amp = MEASURED[label]
        model = _build(kind, options, shape)
        x = torch.randn(*shape)
        _step(model, x, train, amp)  # warm-up: kernels and allocator in place
        out[label] = peak_rss_rise_mb(lambda m=model, x=x: _step(m, x, train, amp)) * 2**20
        del model, x
    return out


def _estimated(label: str, device: str = "cpu") -> int:
    kind, options, shape, train, amp = MEASURED[label]
    model = _build(kind, options, shape).to(device)
    est = estimate_cost(model, shape[2:], batch=shape[0], train=train, amp=amp, device=device, blocks_alone=False)
    return est.step().step_bytes


@pytest.mark.slow
def test_estimated_peak_matches_the_measured_resident_set_on_cpu():
    from benchmarks._common import MALLOC_ENV, run_child

    labels = list(MEASURED)
    measured = run_child(
        "tests.test_cost:measure_peaks", {"cases": labels}, timeout=900, env={**MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    )
    assert "status" not in measured, measured
    ratios = {label: measured[label] / _estimated(label) for label in labels}
    print("\n".join(f"{label}: measured / estimated = {r:.3f}" for label, r in ratios.items()))
    assert all(abs(r - 1) < CPU_MARGIN for r in ratios.values()), ratios


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "label",
    [
        "C2D R50 with NL, 8x112x112",
        "C2D R50 with NL, 8x112x112, inference",
        "block dense",
        "block sdpa",
        "block chunked",
        "block sdpa, bf16 autocast",
    ],
)
def test_estimated_peak_matches_cuda_max_memory_allocated(label):
    kind, options, shape, train, amp = MEASURED[label]
    model = _build(kind, options, shape).cuda()
    x = torch.randn(*shape, device="cuda")
    _step(model, x, train, amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(model, x, train, amp)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    ratio = measured / _estimated(label, "cuda")
    assert abs(ratio - 1) < CUDA_MARGIN, ratio


def test_each_block_reports_the_path_it_plans_in_the_steps_precision():
    """The blocks of the tiny network are small: "auto" plans the dense path in float32 on a CPU; under bf16
    autocast it plans SDPA, whose fused kernels take half precision (pairwise.resolve_impl)."""
    full = estimate_cost("nl_c2d_tiny", (8, 32, 32), batch=2, train=True)
    half = estimate_cost("nl_c2d_tiny", (8, 32, 32), batch=2, train=True, amp="bf16")
    assert full.blocks and [b.chosen for b in full.blocks] == ["dense"] * len(full.blocks)
    assert [b.chosen for b in half.blocks] == ["sdpa"] * len(half.blocks)
