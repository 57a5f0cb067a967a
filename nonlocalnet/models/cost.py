"""What a model costs before it runs: parameters, multiply-adds and the peak memory of one training or inference
step, per non-local block and in total, for each exact path the blocks could take.

One file because it is one estimate: the result classes, the fake-tensor simulation and the table all serve
:func:`estimate_cost`, and none is used alone.

    est = estimate_cost("nl_i3d_r50", clip=(32, 224, 224), batch=8, train=True)
    print(est.table())

Method. Nothing runs at full size and nothing is computed:

- Parameters and multiply-adds come from :func:`nonlocalnet.models.flops.count_cost` on fake tensors (torch's
  FLOP counter for convolutions and products, the paper's N·M·(Cq + Cv) for each pairwise step).
- Memory comes from running the step itself on fake tensors under :class:`~nonlocalnet.models.memory.LiveBytes`,
  a simulated allocator that counts every storage while it is referenced. A training step is the forward pass in
  train mode (under autocast with ``amp``), the mean of the output as the loss and the backward pass, which
  leaves a gradient on every parameter that requires one (the output itself is not held during the backward
  pass: a classifier's logits are small); an inference step is the forward pass in eval mode
  under ``torch.no_grad()``. The autograd graph of the fake pass keeps exactly what a real one keeps, so the
  saved activations of every layer and path (SDPA's log-sum-exp, the chunked path's (q, k, v, y), the dense
  path's N x M weights, BatchNorm's inputs) are counted without a hand-written model of them.
- ``step_bytes`` is the rise above what exists before the step (parameters, buffers, the input clip): what
  ``torch.cuda.max_memory_allocated`` rises by, and the resident set on CPU with an allocator that returns
  freed memory. ``peak_bytes`` adds that state back.

Assumptions: the optimiser's state is not part of a step (SGD with momentum holds one more copy of the
parameters, Adam two); memory freed is reusable at once (no fragmentation: the CUDA caching allocator may
reserve more than it allocates); buffers a kernel allocates and frees inside one operation below the dispatcher
(oneDNN scratchpads, cuDNN and cuBLAS workspaces) are not seen; the path "auto" picks and SDPA's kernel are
those of the device simulated (``device``). Against measurements (tests/test_cost.py) the estimate is within a
few percent on CPU; docs/cost.md gives the figures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call

from ..layers.folding import fold
from ..layers.nonlocal_block import NonLocalBlock, find_nonlocal_blocks
from ..layers.pairwise import IMPLS_BY_MODE, resolve_impl
from .flops import count_cost, executed_flops
from .memory import LiveBytes

__all__ = [
    "AMP_DTYPES",
    "AS_BUILT",
    "BlockCost",
    "CostEstimate",
    "PathCost",
    "StepCost",
    "estimate_cost",
    "zoo_cost_rows",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AS_BUILT = "as built"  # the row of the model with each block on its own impl ("auto": resolve_impl's choice)


@dataclass(frozen=True)
class PathCost:
    """One non-local block on one path, run alone on the input it gets in the network.

    Attributes:
        path: the exact path ("dense", "sdpa", "chunked", "linear", "sorted").
        macs: the multiply-adds the path executes in the block's step (forward, and backward when training):
            the products, convolutions and attention kernels it runs, recomputations included (the chunked
            path's backward pass recomputes the weights; the linear path never forms them).
        kept_bytes: what the block's forward pass keeps for the backward pass besides its input and output
            (0 for inference): what it adds to the network's activations.
        peak_bytes: the highest memory of the block's own step above its input and parameters: forward (and,
            with the mean of its output as the loss, backward, with the gradients of its input and parameters) on
            this path.
    """

    path: str
    macs: int
    kept_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class BlockCost:
    """One non-local block of the model.

    Attributes:
        name: its module name ("res4.nl3").
        mode: its pairwise function.
        input_shape: (B, C, *spatial) of its input in this step.
        params: its parameters.
        macs: its multiply-adds in one forward pass (projections, W_z and the pairwise step by the paper's
            definition, which every path computes).
        chosen: the path it runs as built (its ``impl``, or the choice of "auto" for these sizes).
        paths: every exact path of its mode, in :data:`~nonlocalnet.layers.pairwise.IMPLS_BY_MODE` order.
    """

    name: str
    mode: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    chosen: str
    paths: tuple[PathCost, ...]


@dataclass(frozen=True)
class StepCost:
    """The whole model's step with every block on one path (blocks whose mode has no such path keep theirs).

    Attributes:
        path: the path, or :data:`AS_BUILT`.
        step_bytes: the peak memory of the step above the state before it (parameters, buffers, input).
        peak_bytes: ``step_bytes`` plus that state.
    """

    path: str
    step_bytes: int
    peak_bytes: int


@dataclass
class CostEstimate:
    """The cost of one step of a model; see the module's docstring for the method.

    Attributes:
        model: the model's name (a registered name, or the class name).
        input_shape: (B, C, T, H, W) of the step's input.
        train: a training step (forward + backward) rather than inference.
        amp: "bf16", "fp16" or None (float32).
        device: the device type simulated.
        params: all parameters.
        macs: multiply-adds of one forward pass of the whole batch.
        state_bytes: parameters, buffers and the input, which exist before the step.
        blocks: one row per non-local block.
        steps: the whole step as built, then with every block on each path.
    """

    model: str
    input_shape: tuple[int, ...]
    train: bool
    amp: str | None
    device: str
    params: int
    macs: int
    state_bytes: int
    blocks: list[BlockCost] = field(default_factory=list)
    steps: list[StepCost] = field(default_factory=list)

    def step(self, path: str = AS_BUILT) -> StepCost:
        """The whole-model row of ``path`` (default: as built)."""
        for row in self.steps:
            if row.path == path:
                return row
        raise ValueError(f"no step row for path {path!r}; rows: {', '.join(r.path for r in self.steps)}")

    @property
    def peak_bytes(self) -> int:
        """The peak memory of the step as built, the state before it included."""
        return self.step(AS_BUILT).peak_bytes

    def table(self) -> str:
        """The per-block rows, then the whole-model rows, as text."""
        kind = "training" if self.train else "inference"
        precision = self.amp or "float32"
        lines = [
            f"{self.model}: {kind} step on {'x'.join(map(str, self.input_shape))} ({precision}, {self.device})",
            f"parameters {self.params:,} ({self.params / 1e6:.2f} M), {self.macs / 1e9:.2f} G multiply-adds "
            f"per forward pass of the batch; parameters, buffers and input {_mib(self.state_bytes)}",
            "",
        ]
        if self.blocks:
            header = ("block", "mode", "input", "params", "GMACs", "path", "GMACs run", "kept MiB", "peak MiB")
            rows = []
            for b in self.blocks:
                for i, p in enumerate(b.paths):
                    first = i == 0
                    rows.append(
                        (
                            b.name if first else "",
                            b.mode if first else "",
                            "x".join(map(str, b.input_shape[1:])) if first else "",
                            f"{b.params:,}" if first else "",
                            f"{b.macs / 1e9:.3f}" if first else "",
                            p.path + (" *" if p.path == b.chosen else ""),
                            f"{p.macs / 1e9:.3f}",
                            _mib(p.kept_bytes, unit=False),
                            _mib(p.peak_bytes, unit=False),
                        )
                    )
            lines += _format(header, rows, right=(3, 4, 6, 7, 8))
            lines += [
                "(GMACs: the paper's count of a forward pass, the same on every path; * the path the block runs "
                "as built; GMACs run: what the path executes in the block's step, recomputation included; "
                "kept: saved for the backward pass besides its input and output; peak: the block's own step "
                "above its input)",
                "",
            ]
        header = ("blocks on", "step MiB", "peak MiB")
        rows = [(s.path, _mib(s.step_bytes, unit=False), _mib(s.peak_bytes, unit=False)) for s in self.steps]
        lines += _format(header, rows, right=(1, 2))
        lines.append(
            "(step: the rise above parameters, buffers and input; peak: with them; optimiser state not included)"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "train": self.train,
            "amp": self.amp,
            "device": self.device,
            "params": self.params,
            "macs": self.macs,
            "state_bytes": self.state_bytes,
            "blocks": [
                {
                    "name": b.name,
                    "mode": b.mode,
                    "input_shape": list(b.input_shape),
                    "params": b.params,
                    "macs": b.macs,
                    "chosen": b.chosen,
                    "paths": [vars(p) for p in b.paths],
                }
                for b in self.blocks
            ],
            "steps": [vars(s) for s in self.steps],
        }


def estimate_cost(
    model: nn.Module | str,
    clip: Sequence[int] | None = None,
    *,
    batch: int = 1,
    train: bool = False,
    amp: str | None = None,
    impl: str | None = None,
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
    blocks_alone: bool = True,
) -> CostEstimate:
    """Parameters, multiply-adds and the peak memory of one step, per non-local block and in total, for each
    exact path; computed on fake tensors (see the module's docstring for the method and its assumptions).

    Args:
        model: a registered model name (built on fake tensors: nothing is allocated) or a module (its weights are
            not touched: the step runs on fake copies of them).
        clip: (T, H, W) of the input; default: a registered model's clip length at 224x224. The input has
            ``conv1``'s channels (3 without a ``conv1``); a module whose ``conv1`` is 2D takes (H, W).
        batch: clips per step.
        train: a training step (forward, loss, backward) rather than an inference one.
        amp: "bf16" or "fp16" to run the forward pass under autocast, None for float32.
        impl: only this path in the per-path rows (e.g. "sdpa"); None: every exact path of each block's mode.
        device: the device type whose kernels and path choices to simulate ("cpu", or "cuda" where CUDA is
            available).
        overrides: model options for a registered name (as ``create_model``'s keywords).
        blocks_alone: also simulate each block alone on every path (the per-block rows' memory); False leaves
            ``paths`` empty and is quicker.

    Returns:
        A :class:`CostEstimate`.

    Raises:
        ValueError: an unknown model, amp, impl or device, or a clip of the wrong length.
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)} or None; got {amp!r}")
    known = sorted({p for paths in IMPLS_BY_MODE.values() for p in paths})
    if impl is not None and impl not in known:
        raise ValueError(f"unknown impl {impl!r}; the exact paths are {', '.join(known)}")
    if batch < 1:
        raise ValueError(f"batch must be positive; got {batch}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' simulates CUDA's kernels, which needs CUDA available")
    name, module, mode = _fake_model(model, overrides, device)
    shape = _input_shape(module, clip, batch)
    nl_blocks = find_nonlocal_blocks(module)
    if impl is not None and nl_blocks and not any(impl in IMPLS_BY_MODE[b.mode] for b in nl_blocks.values()):
        raise ValueError(
            f"impl {impl!r} computes none of this model's non-local modes "
            f"({', '.join(sorted({b.mode for b in nl_blocks.values()}))})"
        )
    inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    with _recording_inputs(nl_blocks, inputs):
        state, as_built = _simulate(module, mode, shape, train, amp, device)
    counted = count_cost(module, shape, depth=1)
    estimate = CostEstimate(
        name,
        shape,
        train,
        amp,
        device,
        counted.params,
        counted.macs,
        state,
        steps=[StepCost(AS_BUILT, as_built - state, as_built)],
    )
    paths = (
        [impl]
        if impl is not None
        else [p for p in known if any(p in IMPLS_BY_MODE[b.mode] for b in nl_blocks.values())]
    )
    for path in sorted(paths, key=_path_order):
        with _blocks_on(nl_blocks, path):
            state_p, peak = _simulate(module, mode, shape, train, amp, device)
        estimate.steps.append(StepCost(path, peak - state_p, peak))
    for block_name, block in nl_blocks.items():
        block_shape, dtype = inputs[block_name]
        estimate.blocks.append(
            _block_cost(block_name, block, mode, block_shape, dtype, train, amp, device, impl, blocks_alone)
        )
    return estimate


def zoo_cost_rows(
    names: Sequence[str] | None = None, *, batch: int = 1, train: bool = True, amp: str | None = None
) -> list[dict[str, Any]]:
    """One row per registered model at its own clip (its clip length at 224x224), for the docs' model zoo:
    name, clip, parameters (M), G multiply-adds, and the training (or inference) step's peak memory in MiB as
    built and with every block on each exact path of its mode.

    Args:
        names: registered names (default: every registered model with a clip length).
        batch: clips per step.
        train: training steps (forward + backward) rather than inference.
        amp: "bf16" / "fp16" autocast, or None.

    Returns:
        Dicts with keys "model", "clip", "params_m", "gmacs" (per clip), "peak_mib" (the step's, as built) and
        "paths" ({path: peak MiB with every block on it}); the blocks alone are not simulated.
    """
    from .registry import create_model, list_models

    rows = []
    for name in names if names is not None else list_models():
        with FakeTensorMode():
            frames = getattr(getattr(create_model(name), "clip", None), "frames", None)
        if frames is None:
            continue
        est = estimate_cost(name, (frames, 224, 224), batch=batch, train=train, amp=amp, blocks_alone=False)
        rows.append(
            {
                "model": name,
                "clip": f"{frames}x224x224",
                "params_m": round(est.params / 1e6, 2),
                "gmacs": round(est.macs / batch / 1e9, 1),
                "peak_mib": round(est.peak_bytes / 2**20),
                "paths": {s.path: round(s.peak_bytes / 2**20) for s in est.steps if s.path != AS_BUILT},
            }
        )
    return rows


# --- the simulation ---------------------------------------------------------------------------------------------


def _fake_model(
    model: nn.Module | str, overrides: Mapping[str, Any] | None, device: str
) -> tuple[str, nn.Module, FakeTensorMode]:
    """(name, the module, the fake mode its step runs in): a name is built on fake tensors; a real module is
    used as it is and run on fake copies of its weights (see :func:`_simulate`)."""
    if isinstance(model, str):
        from .registry import create_model

        mode = FakeTensorMode()
        with mode, torch.device(device):
            module = create_model(model, **dict(overrides or {}))
        return model, module, mode
    if overrides:
        raise ValueError("overrides apply to a registered model name, not to a module")
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, FakeTensor):
            return type(model).__name__, model, t.fake_mode
    return type(model).__name__, model, FakeTensorMode()


def _input_shape(module: nn.Module, clip: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    conv1 = getattr(module, "conv1", None)
    channels = getattr(conv1, "in_channels", 3)
    spatial_axes = len(getattr(conv1, "kernel_size", (0, 0, 0)))
    if clip is None:
        frames = getattr(getattr(module, "clip", None), "frames", None)
        if frames is None:
            raise ValueError(f"{type(module).__name__} has no default clip length; pass clip=(T, H, W)")
        clip = (frames, 224, 224)
    clip = tuple(int(s) for s in clip)
    if len(clip) != spatial_axes or min(clip) < 1:
        want = "(T, H, W)" if spatial_axes == 3 else f"{spatial_axes} sizes"
        raise ValueError(f"clip must be {want} of positive sizes for {type(module).__name__}; got {clip}")
    return (batch, channels, *clip)


def _autocast(device: str, amp: str | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()


def _simulate(
    module: nn.Module, mode: FakeTensorMode, shape: Sequence[int], train: bool, amp: str | None, device: str
) -> tuple[int, int]:
    """Runs one step of ``module`` on a fake input of ``shape`` under :class:`LiveBytes`; returns (the bytes of
    parameters, buffers and input, the peak bytes of the step, those included). The module's own weights and
    train/eval flags are left as they were."""
    state = {
        n: t if isinstance(t, FakeTensor) else mode.from_tensor(t).requires_grad_(t.requires_grad)
        for n, t in [*module.named_parameters(), *module.named_buffers()]
    }
    live = LiveBytes()
    flags = {m: m.training for m in module.modules()}
    try:
        module.train(train)
        with mode, live:
            x = torch.zeros(tuple(shape), device=device)
            live.track(state.values())
            state_bytes = live.current  # parameters, buffers and x
            with torch.set_grad_enabled(train):
                with _autocast(device, amp):
                    out = functional_call(module, state, (x,))
                if train:
                    loss = _first_tensor(out).float().mean()
                    del out  # as in ``model(x).mean().backward()``: only the graph keeps the output
                    loss.backward()
            peak = live.peak
    finally:
        for m, training in flags.items():
            m.training = training
        for t in state.values():
            t.grad = None
    return state_bytes, peak


def _block_cost(
    name: str,
    block: NonLocalBlock,
    mode: FakeTensorMode,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    amp: str | None,
    device: str,
    impl: str | None,
    simulate: bool,
) -> BlockCost:
    """The block's row: its costs, and each path's memory run alone on a fake input like the one it got."""
    macs = count_cost(block, shape, depth=1).macs
    chosen = _chosen_path(block, shape, device, AMP_DTYPES[amp] if amp else dtype)
    paths = []
    for path in IMPLS_BY_MODE[block.mode] if simulate else ():
        if impl is not None and path != impl:
            continue
        with _blocks_on({name: block}, path):
            paths.append(_block_alone(block, mode, shape, dtype, train, amp, device, path))
    return BlockCost(name, block.mode, shape, sum(p.numel() for p in block.parameters()), macs, chosen, tuple(paths))


def _block_alone(
    block: NonLocalBlock,
    mode: FakeTensorMode,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    amp: str | None,
    device: str,
    path: str,
) -> PathCost:
    """The block's step alone on a fake input, twice: once under :class:`LiveBytes` for its memory, once under
    the FLOP counter for what it executes (whose module hooks would add tensors of their own to the count)."""
    was = block.training
    block.train(train)
    try:
        kept, peak = _block_step(block, mode, shape, dtype, train, amp, device, LiveBytes())
        flops = executed_flops(lambda: _block_step(block, mode, shape, dtype, train, amp, device, None))
    finally:
        block.train(was)
    return PathCost(path, flops // 2, kept, peak)


def _block_step(
    block: NonLocalBlock,
    mode: FakeTensorMode,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    amp: str | None,
    device: str,
    live: LiveBytes | None,
) -> tuple[int, int]:
    """One step of the block on a fake input (a requires-grad input when training, the mean of the output as the
    loss); returns, counted by ``live`` (zeros without it), the bytes the forward pass keeps for the backward pass
    besides input and output (0 for inference) and the step's peak above parameters, buffers and input."""
    state = {
        n: t if isinstance(t, FakeTensor) else mode.from_tensor(t).requires_grad_(t.requires_grad)
        for n, t in [*block.named_parameters(), *block.named_buffers()]
    }
    kept = 0
    try:
        with mode, live or contextlib.nullcontext():
            x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=train)
            base = 0
            if live is not None:
                live.track(state.values())
                base = live.current  # parameters, buffers and x
                live.reset_peak()
            with torch.set_grad_enabled(train):
                with _autocast(device, amp):
                    z = functional_call(block, state, (x,))
                if train:
                    if live is not None:
                        kept = live.current - base - z.untyped_storage().nbytes()
                    loss = z.float().mean()
                    del z  # only the graph keeps the output, as in a network
                    loss.backward()
    finally:
        for t in state.values():
            t.grad = None
    return max(0, kept), (live.peak - base if live is not None else 0)


def _chosen_path(block: NonLocalBlock, shape: tuple[int, ...], device: str, dtype: torch.dtype) -> str:
    """The path the block runs on an input of ``shape`` on ``device`` with its pairwise step in ``dtype`` (the
    autocast dtype under mixed precision): resolve_impl on its folded problem sizes, as the block plans it."""
    spatial = shape[2:]
    key_spatial = spatial if block.subsample is None else tuple(s // k for s, k in zip(spatial, block.subsample))
    folding = block._folding(spatial)
    with torch.device("meta"):  # fold empty maps only to learn the problems' count and lengths: (1, 1, *S) -> (F, L, 1)
        problems, n, _ = fold(torch.zeros(1, 1, *spatial), folding).shape
        m = fold(torch.zeros(1, 1, *key_spatial), folding).shape[1]
    cq = block.in_channels if block.mode == "gaussian" else block.inter_channels
    return resolve_impl(
        block.mode,
        block.impl,
        n,
        m,
        cq,
        block.inter_channels,
        batch=shape[0] * problems,
        device_type=device,
        dtype=dtype,
        budget=block.planning_budget(device),
    )


@contextlib.contextmanager
def _blocks_on(blocks: Mapping[str, NonLocalBlock], path: str) -> Iterator[None]:
    """Every block whose mode has ``path`` runs on it; their own impl is restored afterwards."""
    saved = {b: b.impl for b in blocks.values()}
    try:
        for b in blocks.values():
            if path in IMPLS_BY_MODE[b.mode]:
                b.impl = path
        yield
    finally:
        for b, impl in saved.items():
            b.impl = impl


@contextlib.contextmanager
def _recording_inputs(
    blocks: Mapping[str, NonLocalBlock], into: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> Iterator[None]:
    """Records each block's input shape and dtype (the last call's) while in this context."""

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            into[name] = (tuple(args[0].shape), args[0].dtype)

        return record

    handles = [b.register_forward_pre_hook(hook(n)) for n, b in blocks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(out: Any) -> Tensor:
    """The output to take the loss of: the tensor itself, or the first tensor of a tuple / dict output."""
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise ValueError(f"the model returned no tensor to take a loss of ({type(out).__name__})")


def _path_order(path: str) -> int:
    order = ("dense", "sdpa", "chunked", "linear", "sorted")
    return order.index(path) if path in order else len(order)


def _mib(n: int, unit: bool = True) -> str:
    value = f"{n / 2**20:,.1f}"
    return value + " MiB" if unit else value


def _format(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(f"{c:>{w}}" if i in right else f"{c:<{w}}" for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), "-" * len(line(header)), *map(line, rows)]
