"""Cost of a model: parameters and multiply-adds per layer and in total, counted by torch itself.

Multiply-adds of the convolutions and matrix products (the fc, the non-local block's 1x1 projections) come from
:class:`torch.utils.flop_counter.FlopCounterMode`, which reports flops = 2 x multiply-adds; norms, pooling,
activations and softmax are not counted. This is the convention of fvcore and of the paper's tables (C2D R50 on
an 8x224x224 clip: about 19.5 G multiply-adds). The non-local pairwise step is not left to torch's counter, which
knows some attention kernels in one version and not in another: each block reports its own multiply-adds by the
paper's definition (:func:`nonlocalnet.layers.pairwise.pairwise_macs`, N·M·(Cq + Cv) per clip), whichever exact
path would run, so the figures are the same on every torch.

By default the model runs on fake tensors (shapes only, no memory, no arithmetic), so even NL I3D R101 on a
128-frame clip is cheap to count: nothing is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers.pairwise import PairwiseCount, counting_pairwise


@dataclass(frozen=True)
class LayerCost:
    """One row of the table.

    Attributes:
        name: the module's qualified name in the model ("res4.nl4").
        kind: the module's class name.
        params: its parameters (recursively).
        macs: its multiply-adds (recursively).
        output_shape: its output without the batch axis (last call), or None if it returned no tensor.
    """

    name: str
    kind: str
    params: int
    macs: int
    output_shape: tuple[int, ...] | None


@dataclass
class CostReport:
    """Parameters and multiply-adds of one forward pass.

    Attributes:
        input_shape: (B, C, T, H, W) of the counted input.
        rows: per-layer costs, in module order.
        params: all parameters of the model.
        macs: all multiply-adds of the forward pass.
    """

    input_shape: tuple[int, ...]
    rows: list[LayerCost] = field(default_factory=list)
    params: int = 0
    macs: int = 0

    @property
    def flops(self) -> int:
        """flops as torch counts them: 2 x multiply-adds."""
        return 2 * self.macs

    def table(self) -> str:
        """A text table: one line per layer, then the totals."""
        header = ("layer", "type", "output", "params", "MACs (G)")
        lines = [
            (
                r.name,
                r.kind,
                "x".join(map(str, r.output_shape)) if r.output_shape else "-",
                f"{r.params:,}",
                f"{r.macs / 1e9:.3f}",
            )
            for r in self.rows
        ]
        lines.append(("total", "", "", f"{self.params:,}", f"{self.macs / 1e9:.3f}"))
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

        def fmt(row: Sequence[str]) -> str:
            left = [f"{row[i]:<{widths[i]}}" for i in range(3)]
            right = [f"{row[i]:>{widths[i]}}" for i in range(3, 5)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(["-" * w for w in widths]))
        return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])

    def summary(self) -> str:
        """The totals in one line."""
        shape = "x".join(map(str, self.input_shape))
        return (
            f"input {shape}: {self.params:,} parameters ({self.params / 1e6:.2f} M), "
            f"{self.macs / 1e9:.2f} G multiply-adds ({self.flops / 1e9:.2f} GFLOPs)"
        )


def count_cost(model: nn.Module, input_shape: Sequence[int], depth: int = 2, fake: bool = True) -> CostReport:
    """Counts a model's parameters and multiply-adds for one input, per layer and in total.

    Args:
        model: the model; it is put in eval mode for the count and restored afterwards.
        input_shape: the full input shape, e.g. (1, 3, 8, 224, 224).
        depth: the table's rows are the modules ``depth`` levels down ("res4.3" is depth 2), and shallower
            modules without children ("conv1").
        fake: run on fake tensors (shapes only); False runs the real arithmetic on the model's device (except the
            non-local pairwise steps, which report their cost and return zeros).

    Returns:
        A :class:`CostReport`.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    rows = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and (name.count(".") + 1 == depth or (name.count(".") + 1 < depth and not any(True for _ in module.children())))
    ]
    shapes: dict[str, tuple[int, ...] | None] = {}
    pairwise_macs = {name: 0 for name, _ in rows}  # each row's non-local pairwise multiply-adds
    started: dict[str, int] = {}
    count = PairwiseCount()

    def enter(name: str):
        def hook(_module: nn.Module, _inputs: Any) -> None:
            started[name] = count.macs

        return hook

    def leave(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
            pairwise_macs[name] += count.macs - started.pop(name)

        return hook

    handles = [
        h
        for name, module in rows
        for h in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave(name)))
    ]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        mode = _fake_mode(model) if fake else contextlib.nullcontext()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with mode, counter, torch.no_grad(), counting_pairwise(count):
            model(torch.zeros(tuple(input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    counts = counter.get_flop_counts()
    root = type(model).__name__
    report = CostReport(
        tuple(input_shape),
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2 + count.macs,
    )
    for name, module in rows:
        flops = sum(counts.get(f"{root}.{name}", {}).values())
        report.rows.append(
            LayerCost(
                name,
                type(module).__name__,
                sum(p.numel() for p in module.parameters()),
                flops // 2 + pairwise_macs[name],
                shapes.get(name),
            )
        )
    return report


def _fake_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """The fake-tensor mode of a model built on fake tensors, or a new one that fakes a real model's tensors."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # shapes-only tensors, torch's own

    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, FakeTensor):
            return t.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def model_cost(
    name: str,
    input_size: Sequence[int] | None = None,
    *,
    batch: int = 1,
    depth: int = 2,
    fake: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> CostReport:
    """Builds a registered model (on fake tensors unless ``fake=False``) and counts its cost.

    Args:
        name: a registered model name.
        input_size: (T, H, W) of the input clip; default the model's clip length at 224x224.
        batch: batch size of the counted input.
        depth: rows of the table, see :func:`count_cost`.
        fake: count on fake tensors (no memory, no arithmetic).
        overrides: model options, e.g. ``{"num_classes": 157, "clip": "8x8"}`` (clip: the stem's layout).
    """
    from .registry import create_model

    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            model = create_model(name, **(overrides or {}))
    else:
        model = create_model(name, **(overrides or {}))
    if input_size is None:
        frames = getattr(getattr(model, "clip", None), "frames", None)
        if frames is None:
            raise ValueError(f"{name} has no default clip length; pass input_size=(T, H, W)")
        input_size = (frames, 224, 224)
    in_channels = getattr(getattr(model, "conv1", None), "in_channels", 3)
    return count_cost(model, (batch, in_channels, *input_size), depth=depth, fake=fake)


def executed_flops(fn: Callable[[], object]) -> int:
    """Flops (2 x multiply-adds) of the matrix products, convolutions and attention kernels ``fn`` runs (what a
    path executes, not the paper's count), as torch's FlopCounterMode counts them, plus what it leaves out, counted
    by its own formulas: the in-place products on torch 2.4 to 2.15 (``baddbmm_``: every chunk of the chunked
    paths after the first accumulates the key and value gradients with it; ``addmm_`` for completeness) and,
    before torch 2.15, SDPA's CPU kernel forward and backward (counted as the CUDA flash kernel is). Runs on real
    or fake tensors."""
    aten = torch.ops.aten
    extra = {
        aten.baddbmm_: _torch_formula(aten.baddbmm),
        aten.addmm_: _torch_formula(aten.addmm),
        aten._scaled_dot_product_flash_attention_for_cpu: _torch_formula(aten._scaled_dot_product_flash_attention),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _torch_formula(
            aten._scaled_dot_product_flash_attention_backward
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


def _torch_formula(op: Any) -> Callable[..., int]:
    """torch's own flop formula for ``op``, to count another op by: the registry's formulas take tensors, and the
    shapes that ``custom_mapping`` passes them they take as they are (the output's shape is not needed)."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry[op]
    return lambda *args, out_shape=None, **kwargs: formula(*args, **kwargs)
