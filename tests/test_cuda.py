"""What only a CUDA device shows: each fast path against dense in float32, float16 and bfloat16, which SDPA
kernel runs, a mixed-precision training run, and two-process nccl training.

Marked ``cuda`` and skipped where torch sees no CUDA device; ``bash benchmarks/gpu.sh`` runs them on a GPU machine
(``-m cuda``). The two-process test also needs two devices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nonlocalnet import NonLocal3d
from nonlocalnet.layers import IMPLS_BY_MODE, MODES

from .helpers import make_active

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
PATHS = [(m, i) for m in MODES for i in IMPLS_BY_MODE[m] if i != "dense"]
# Error of the non-local term z - x against the float32 dense path, as max |Δ| over max |z_ref - x|. float32 on
# both sides: summation order only. Half precision: bfloat16 keeps 8 significant bits, float16 11; the
# projections, the pairwise step and W_z each round (the CPU test of the same bound: test_block.py).
TERM_TOLERANCE = {F32: 1e-4, F16: 0.004, BF16: 0.03}


@pytest.fixture(autouse=True)
def _exact_float32():
    """cuDNN convolutions and cuBLAS matmuls may run float32 as TF32 (10-bit mantissa): off, so that float32 means
    float32 here."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _block(mode: str, impl: str, subsample=(1, 2, 2), channels: int | None = None) -> NonLocal3d:
    channels = channels or (256 if mode == "gaussian" else 64)
    return make_active(NonLocal3d(channels, mode=mode, subsample=subsample, impl=impl), std=0.05).cuda()


def _with_dense(mode: str, impl: str, **options) -> tuple[NonLocal3d, NonLocal3d]:
    """A live block on the path ``impl`` and the dense block with the same weights."""
    fast, dense = _block(mode, impl, **options), _block(mode, "dense", **options)
    dense.load_state_dict(fast.state_dict())
    return fast, dense


def _run(block, x, dtype):
    """z and dz/dx of one forward+backward, in float32 or under autocast(dtype)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != F32):
        z = block(x)
    (z.float() * torch.linspace(-1, 1, z.numel(), device=z.device).view_as(z)).sum().backward()
    return z.detach().float(), x.grad


@pytest.mark.parametrize("mode,impl", PATHS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_each_fast_path_matches_dense_on_cuda(mode, impl, dtype):
    fast, dense = _with_dense(mode, impl)
    # raw 256-channel features: a small x keeps the gaussian's softmax from being one-hot, so that the pairwise
    # step, not only the projections, is compared
    x = (0.3 if mode == "gaussian" else 3.0) * torch.randn(2, fast.in_channels, 4, 8, 8, device="cuda")
    z_ref, grad_ref = _run(dense, x, F32)
    z, grad = _run(fast, x, dtype)
    assert torch.isfinite(z).all() and torch.isfinite(grad).all()
    term = (z_ref - x).abs().max()
    assert term > 0.1  # a live non-local term: the comparison is not of x with x
    assert (z - z_ref).abs().max() <= TERM_TOLERANCE[dtype] * term, f"{mode}/{impl}/{dtype}"
    assert (grad - grad_ref).abs().max() <= 4 * TERM_TOLERANCE[dtype] * grad_ref.abs().max()


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_the_chunked_path_in_many_chunks_matches_dense_on_cuda(mode, monkeypatch):
    """The GPU's chunks hold 256 MB, so the shapes above run in one: here chunks of a few queries, with and
    without subsampling (the symmetric tiles), in float32."""
    from nonlocalnet.layers import pairwise_softmax

    monkeypatch.setattr(pairwise_softmax, "GPU_CHUNK_ELEMENTS", 2 * 64 * 7)
    for subsample in ((1, 2, 2), None):
        fast, dense = _with_dense(mode, "chunked", subsample=subsample, channels=64)
        x = torch.randn(2, 64, 4, 8, 8, device="cuda")
        z_ref, grad_ref = _run(dense, x, F32)
        z, grad = _run(fast, x, F32)
        term = (z_ref - x).abs().max()
        assert (z - z_ref).abs().max() <= TERM_TOLERANCE[F32] * term, subsample
        assert (grad - grad_ref).abs().max() <= 4 * TERM_TOLERANCE[F32] * grad_ref.abs().max(), subsample


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_under_autocast_the_embedded_gaussian_runs_the_flash_kernel(dtype):
    """With only the flash kernel allowed, SDPA raises unless it gets half precision in a layout flash takes: the
    policy's half-precision inputs reach it under autocast, forward and backward; float32 (the control) is
    refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = _block("embedded_gaussian", "sdpa")
    x = torch.randn(2, 64, 4, 8, 8, device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        z, grad = _run(block, x, dtype)
        assert torch.isfinite(z).all() and torch.isfinite(grad).all()
        with pytest.raises(RuntimeError):
            _run(block, x, F32)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_which_sdpa_kernel_ran_is_recorded_by_the_profiler(dtype):
    """The profiler names the kernel SDPA dispatched to: flash, memory-efficient or cuDNN (preferred on Hopper by
    recent torch), never the math path."""
    from torch.profiler import ProfilerActivity, profile

    block = _block("embedded_gaussian", "sdpa")
    x = torch.randn(2, 64, 4, 8, 8, device="cuda")
    _run(block, x, dtype)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run(block, x, dtype)
    names = {e.key for e in prof.key_averages()}
    fused = {n for n in names if any(k in n for k in ("flash_attention", "efficient_attention", "cudnn_attention"))}
    assert fused, sorted(names)
    print(f"| SDPA kernel under {dtype} autocast | {', '.join(sorted(fused))} |")  # for gpu.md
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_a_compiled_block_trains_under_float16_autocast_as_eager_does():
    """torch.compile of the SDPA path, with the backends its training calls allow (not cuDNN's, see
    pairwise_softmax._sdpa_training_backends): the same z and dx as eager, all finite."""
    block = _block("embedded_gaussian", "sdpa")
    x = 3.0 * torch.randn(2, 64, 4, 8, 8, device="cuda")
    z_eager, grad_eager = _run(block, x, F16)
    z, grad = _run(torch.compile(block), x, F16)
    assert torch.isfinite(z).all() and torch.isfinite(grad).all()
    term = (z_eager - x).abs().max()
    assert (z - z_eager).abs().max() <= TERM_TOLERANCE[F16] * term
    assert (grad - grad_eager).abs().max() <= 4 * TERM_TOLERANCE[F16] * grad_eager.abs().max()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_mixed_precision_run_trains_on_cuda(tmp_path, amp, caplog):
    """A short synthetic run under train.amp on the GPU: finite losses, a first loss that equals the float32 run's
    up to half precision (same weights, same clips), and a GradScaler for fp16 only."""
    from nonlocalnet.engine.config import load_config
    from nonlocalnet.engine.trainer import train

    def losses(amp: str) -> list[float]:
        out = tmp_path / amp
        cfg = load_config(
            "configs/synthetic/nl_c2d_tiny.yaml",
            [
                "progress=false",
                "train.iterations=12",
                "train.log_every=1",
                f"train.amp={amp}",
                "device=cuda",
                "data.train_size=64",
                "data.test_size=16",
                f"output_dir={out}",
            ],
        )
        train(cfg)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["split"] == "train"]

    caplog.set_level(logging.INFO)
    mixed = losses(amp)
    scaled = [r.getMessage() for r in caplog.records if "mixed precision" in r.getMessage()]
    exact = losses("false")
    assert len(mixed) == 12 and all(math.isfinite(v) for v in mixed)
    assert abs(mixed[0] - exact[0]) <= 0.02 * exact[0], (mixed[0], exact[0])
    assert len(scaled) == 1 and ("with a GradScaler" in scaled[0]) == (amp == "fp16"), scaled


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torchrun_two_gpus_train_with_nccl_and_agree(tmp_path):
    """Two processes on two GPUs (device auto: one GPU per local rank, nccl) end with the same weights, and the
    run's test report gathers every clip once."""
    runner = Path(__file__).with_name("_fault_runner.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NONLOCALNET_DUMP_FINAL": str(tmp_path)}
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(runner),
        "train",
        "--config",
        "configs/synthetic/nl_c2d_tiny.yaml",
        "--no-progress",
        "train.iterations=4",
        "device=auto",
        "data.train_size=64",
        "data.test_size=32",
        f"output_dir={out}",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["videos"] == 32
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
