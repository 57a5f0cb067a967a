"""The block under torch.compile and exported to ONNX (checked with onnxruntime against eager)."""
import numpy as np
import pytest
import torch

from nonlocalnet import NonLocal3d
from nonlocalnet.layers import MODES

from .test_block import make_active


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
@pytest.mark.parametrize("mode,low_memory", [(m, False) for m in MODES] + [("embedded_gaussian", True)])
def test_compiled_block_equals_eager_forward_and_backward(mode, low_memory):
    block = make_active(NonLocal3d(8, mode=mode, subsample=(1, 2, 2), low_memory=low_memory)).train()
    compiled = torch.compile(block)
    x = torch.randn(2, 8, 2, 4, 4, requires_grad=True)
    z = compiled(x)
    z.square().sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    z_eager = block(x)
    z_eager.square().sum().backward()
    torch.testing.assert_close(z, z_eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_compiled, x.grad, atol=1e-5, rtol=1e-4)
