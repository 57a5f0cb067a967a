"""The block under torch.compile and exported to ONNX (checked with onnxruntime against eager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nonlocalnet import NonLocal3d
from nonlocalnet.layers import MODES

from .helpers import make_active


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_onnx_export_matches_eager(mode, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    block = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2)))
    x = torch.randn(2, 8, 2, 4, 4)
    program = torch.onnx.export(block, (x,), dynamo=True)
    path = tmp_path / f"nonlocal_{mode}.onnx"
    program.save(str(path))
    options = onnxruntime.SessionOptions()
    # onnxruntime 1.32's extended graph optimisations mis-fuse the sort/scatter of the sorted concatenation
    # path (its unoptimised and basic-optimised graphs are exact); basic keeps every mode correct.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = onnxruntime.InferenceSession(str(path), options)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = block(x).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_block_equals_eager_forward_and_backward(mode):
    block = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2))).train()
    compiled = torch.compile(block)
    x = torch.randn(2, 8, 2, 4, 4, requires_grad=True)
    z = compiled(x)
    z.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    z_eager = block(x)
    z_eager.square().sum().backward()
    # inductor orders the float32 sums of its fused kernels its own way: rounding-level differences
    torch.testing.assert_close(z, z_eager, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(grad_compiled, x.grad, atol=5e-5, rtol=1e-4)


def _graph_breaks(module, x, context=None) -> list[str]:
    """Where torch.compile's tracer (dynamo, no code generation: quick) breaks ``module``'s forward into several
    graphs; each break costs a compiled model its fusions across it and a round trip through Python."""
    import contextlib

    import torch._dynamo as dynamo

    dynamo.reset()
    with context or contextlib.nullcontext():
        explanation = dynamo.explain(module)(x)
    return [f"{str(r.reason).splitlines()[0]} at {r.user_stack[-1]}" for r in explanation.break_reasons]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("subsample", [(1, 2, 2), None])
def test_every_path_of_the_block_traces_to_one_graph(mode, subsample):
    """One graph per block, every path, training and inference: a graph break (the residual's dtype check once
    made one, and an NL I3D under torch.compile trained slower than eager on an H200) shows up here first."""
    from nonlocalnet.layers import IMPLS_BY_MODE

    x = torch.randn(2, 16, 2, 4, 4, requires_grad=True)
    for impl in IMPLS_BY_MODE[mode]:
        if impl == "chunked" and tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5):
            # torch 2.4's tracer refuses the chunked path's custom backward (its strict mode allows no .stride());
            # torch.compile then leaves that Function to eager, with the same z and dx (checked on 2.4.1 by hand)
            continue
        block = make_active(NonLocal3d(16, mode=mode, subsample=subsample, impl=impl)).train()
        assert _graph_breaks(block, x) == [], impl
        assert _graph_breaks(block.eval(), x.detach(), torch.no_grad()) == [], impl


def test_the_block_traces_to_one_graph_under_autocast():
    x = torch.randn(2, 16, 2, 4, 4, requires_grad=True)
    assert (
        _graph_breaks(
            make_active(NonLocal3d(16, subsample=(1, 2, 2))).train(), x, torch.autocast("cpu", dtype=torch.bfloat16)
        )
        == []
    )
