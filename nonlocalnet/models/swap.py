"""Other frameworks' non-local blocks, inside a model built by that framework, replaced by ours.

One file because it is one operation: recognising each framework's block, translating its options and weights, and
measuring before and after all serve :func:`swap_nonlocal`.

    report = nonlocalnet.swap_nonlocal(model)      # mmaction2's NL I3D, a timm or PyTorchVideo network, ...
    print(report)                                  # found, swapped, left (and why), per path

A block is recognised by its class (module path and name), never by its attributes alone:

* mmcv's ``mmcv.cnn.bricks.non_local.NonLocal1d/2d/3d`` (mmaction2, mmdetection, mmsegmentation): its ``mode``;
  ``sub_sample`` pools after the φ/g convs (``subsample_position="projection"``); ``use_scale`` (embedded gaussian)
  is ``scale="auto"``; BN or no norm;
* PyTorchVideo's ``pytorchvideo.layers.nonlocal_net.NonLocal``: softmax is the embedded gaussian with
  ``scale="auto"``, or the dot product; its max-pool before φ/g (``subsample_position="input"``); BN or no norm;
* timm's ``timm.layers.non_local_attn.NonLocalAttn``: the embedded gaussian scaled by C^-0.5 (C, not C'), BN;
* PySlowFast's ``slowfast.models.nonlocal_helper.Nonlocal``: as PyTorchVideo's.

Every weight and buffer is carried over (the mapping of mmcv's layout is
:func:`~nonlocalnet.models.checkpoints.mmaction2.mmcv_nonlocal_key`, the one the checkpoint conversion uses); a conv
without bias stays without bias and a norm keeps its eps and momentum, so the new block computes the same function
and trains the same parameters. A block with an
option ours does not reproduce exactly (a GroupNorm, LayerNorm or SyncBatchNorm, a norm without affine parameters
or running statistics, an activation, a conv other than a plain 1x1, an average pool, a subclass that may change the
forward) is left in place, and the report says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import NonLocalBlock
from .checkpoints.mmaction2 import mmcv_nonlocal_key

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
# subclasses of torch's convs that compute what torch's compute (mmcv's wrappers differ only for empty inputs on
# torch <= 1.4)
_SAME_AS_CONV = {"mmcv.cnn.bricks.wrappers.Conv2d", "mmcv.cnn.bricks.wrappers.Conv3d"}


class _Unsupported(Exception):
    """A recognised block with an option our block does not reproduce; the message says which."""


@dataclass
class _Plan:
    """How to build our block for a recognised one: its options, and where each of our entries comes from."""

    in_channels: int
    dim: int
    options: dict[str, Any]
    source: Callable[[str], str]  # our state-dict key -> theirs
    without_bias: tuple[str, ...] = ()  # our convs whose counterpart has no bias
    norm: nn.Module | None = None  # their norm: its eps and momentum are kept


@dataclass(frozen=True)
class SwapEntry:
    """One recognised block: ``path`` in the model, ``kind`` its class, ``swapped`` or left with ``reason``;
    ``options`` are our block's options where it was swapped."""

    path: str
    kind: str
    swapped: bool
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SwapMeasurement:
    """One training step (forward + backward) of the model on the given input, before and after the swap.

    ``*_ms``: the median of ``repeats`` steps, the two models alternating. ``*_saved_mb``: the memory the step
    keeps for its backward pass (the tensors autograd saves, parameters excluded): on any device, and the bulk of
    a training step's peak. ``*_peak_mb``: the peak CUDA memory the step allocates above what was allocated
    before it (None on the CPU)."""

    before_ms: float
    after_ms: float
    before_saved_mb: float
    after_saved_mb: float
    before_peak_mb: float | None
    after_peak_mb: float | None
    repeats: int


@dataclass
class SwapReport:
    """What :func:`swap_nonlocal` found, swapped and left; ``str()`` is a table."""

    model: nn.Module
    entries: list[SwapEntry] = field(default_factory=list)
    measurement: SwapMeasurement | None = None

    @property
    def swapped(self) -> list[str]:
        return [e.path for e in self.entries if e.swapped]

    @property
    def left(self) -> dict[str, str]:
        """path -> why the block was left in place."""
        return {e.path: e.reason for e in self.entries if not e.swapped}

    def __str__(self) -> str:
        lines = [
            f"swap_nonlocal: {len(self.entries)} non-local block(s) found, {len(self.swapped)} swapped, "
            f"{len(self.left)} left"
        ]
        for e in self.entries:
            what = ", ".join(f"{k}={v!r}" for k, v in e.options.items()) if e.swapped else f"left: {e.reason}"
            lines.append(f"  {e.path}  {e.kind}  {what}")
        if (m := self.measurement) is not None:
            lines.append(
                f"  one training step: {m.before_ms:.1f} -> {m.after_ms:.1f} ms, saved for backward "
                f"{m.before_saved_mb:.1f} -> {m.after_saved_mb:.1f} MB"
                + (f", peak {m.before_peak_mb:.1f} -> {m.after_peak_mb:.1f} MB" if m.before_peak_mb is not None else "")
            )
        return "\n".join(lines)


def swap_nonlocal(
    model: nn.Module, *, measure: Tensor | None = None, repeats: int = 3, impl: str = "auto", verbose: bool = False
) -> SwapReport:
    """Replaces, in place, every non-local block of another framework that ``model`` holds by ours, weights mapped.

    Args:
        model: a model built by mmcv / mmaction2 / mmdetection / mmsegmentation, PyTorchVideo, timm or PySlowFast
            (or any model holding their blocks). A block that is the model itself is not swapped (there is no
            parent to put ours in): swap the model that holds it.
        measure: an input to time one training step (forward, sum of the outputs, backward) on, and to measure the
            memory it keeps for the backward pass, before and after the swap (:class:`SwapMeasurement`); the model
            must accept it as its only argument and return a tensor. The steps leave no gradients (those the model
            held before are cleared too) and no change to buffers (BN statistics).
        repeats: steps timed per model with ``measure`` (after one warm-up step each).
        impl: our block's execution path (see :class:`~nonlocalnet.layers.NonLocalBlock`); the
            function computed is the same.
        verbose: print the report.

    Returns:
        the report: every recognised block's path, whether it was swapped (with our options) or left and why, and
        the measurement if asked. The swapped model is ``report.model`` (the same object as ``model``).
    """
    found = list(_recognised(model))
    report = SwapReport(model)
    plans: list[tuple[str, nn.Module, str, _Plan | str]] = []
    for path, module, kind in found:
        if not path:
            plans.append(
                (path, module, kind, "the model itself is the block: swap_nonlocal replaces blocks inside a model")
            )
            continue
        translate = _TRANSLATORS.get(kind)
        if translate is None:
            base = _recognised_base(module)
            plans.append((path, module, kind, f"a subclass of {base}, whose forward may differ from it"))
            continue
        try:
            plans.append((path, module, kind, translate(module)))
        except _Unsupported as why:
            plans.append((path, module, kind, str(why)))
    before = _measure(model, measure, repeats) if measure is not None else None
    blocks: dict[str, NonLocalBlock] = {}
    for path, module, kind, plan in plans:
        if isinstance(plan, str):
            report.entries.append(SwapEntry(path, kind, False, plan))
            continue
        options = {**plan.options, **({"impl": impl} if impl != "auto" else {})}
        blocks[path] = _build(module, plan, options)
        report.entries.append(SwapEntry(path, kind, True, options=dict(plan.options)))
    for path, block in blocks.items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, block)
    if measure is not None:
        after = _measure(model, measure, repeats, against=before)
        report.measurement = after
    if verbose:
        print(report)
    return report


# --- recognising ---------------------------------------------------------------------------------------------


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _recognised_base(module: nn.Module) -> str | None:
    """The first class of the module's MRO that is a recognised block class."""
    return next((_qualified(c) for c in type(module).__mro__ if _qualified(c) in _TRANSLATORS), None)


def _recognised(model: nn.Module) -> Iterable[tuple[str, nn.Module, str]]:
    """(path, module, class name) of every recognised block (or subclass of one), outermost only."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if _recognised_base(module) is not None:
            inside.append(path + ".")
            yield path, module, _qualified(type(module))


# --- checks shared by the translators -------------------------------------------------------------------------


def _pointwise(conv: nn.Module, dim: int, what: str) -> nn.Module:
    """``conv`` if it is a plain 1x1 convolution of ``dim`` spatial axes, else why not."""
    if type(conv) is not _CONV[dim] and not (_qualified(type(conv)) in _SAME_AS_CONV and isinstance(conv, _CONV[dim])):
        raise _Unsupported(f"{what} is a {type(conv).__name__}, not a plain {_CONV[dim].__name__}")
    if (
        any(k != 1 for k in conv.kernel_size)
        or any(s != 1 for s in conv.stride)
        or any(p != 0 for p in conv.padding)
        or any(d != 1 for d in conv.dilation)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
    ):
        raise _Unsupported(f"{what} is not a 1x1 conv of stride 1 without padding or groups")
    if conv._forward_hooks or conv._forward_pre_hooks:
        raise _Unsupported(f"{what} has forward hooks (spectral norm, weight norm, ...)")
    return conv


def _batch_norm(norm: nn.Module | None, dim: int, what: str) -> str | None:
    """Our ``norm`` option for their norm: None (no norm) or "batch" (a BatchNorm we can copy exactly)."""
    if norm is None:
        return None
    if type(norm) is not _BATCHNORM[dim]:
        raise _Unsupported(
            f"{what} is a {type(norm).__name__}; ours reproduces only {_BATCHNORM[dim].__name__} or no norm"
        )
    if not norm.affine or not norm.track_running_stats:
        raise _Unsupported(f"{what} has no {'affine parameters' if not norm.affine else 'running statistics'}")
    return "batch"


def _max_pool(pool: nn.Module | None, dim: int, what: str) -> tuple[int, ...] | None:
    """The subsample kernel of their pool: a max-pool whose stride is its kernel, without padding or dilation."""
    if pool is None:
        return None
    if type(pool) is not _MAXPOOL[dim]:
        raise _Unsupported(f"{what} is a {type(pool).__name__}; ours subsamples by max-pooling only")

    def axes(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dim

    kernel, stride = axes(pool.kernel_size), axes(pool.stride if pool.stride is not None else pool.kernel_size)
    if (
        kernel != stride
        or any(axes(pool.padding))
        or any(d != 1 for d in axes(pool.dilation))
        or pool.ceil_mode
        or pool.return_indices
    ):
        raise _Unsupported(
            f"{what} ({pool}) is not a max-pool whose stride is its kernel, without padding, dilation or ceil mode"
        )
    return kernel


def _renamed(names: dict[str, str]) -> Callable[[str], str]:
    """Our key -> theirs, by the first part of the key (``theta.weight`` -> ``conv_theta.weight``)."""

    def source(key: str) -> str:
        part, _, rest = key.partition(".")
        return f"{names[part]}.{rest}"

    return source


# --- mmcv ----------------------------------------------------------------------------------------------------


def _from_mmcv(block: nn.Module) -> _Plan:
    dim = {"NonLocal1d": 1, "NonLocal2d": 2, "NonLocal3d": 3}[type(block).__name__]
    mode = block.mode
    parts = {"g": block.g, "out": block.conv_out}
    if mode != "gaussian":
        parts.update(theta=block.theta, phi=block.phi)
    sub_sample = bool(block.sub_sample)
    kernel = None
    modules = {}
    for part, wrapped in parts.items():
        if sub_sample and part in ("g", "phi"):
            if not (isinstance(wrapped, nn.Sequential) and len(wrapped) == 2):
                raise _Unsupported(f"its {part} is not (ConvModule, max-pool) as sub_sample builds it")
            kernel = _max_pool(wrapped[1], dim, f"its {part} pool")
            wrapped = wrapped[0]
        modules[part] = _conv_module(wrapped, dim, part, norm_allowed=part == "out")
    if mode == "gaussian" and sub_sample:
        kernel = _max_pool(block.phi, dim, "its phi pool")
    norm_module = block.conv_out.norm if block.conv_out.with_norm else None
    norm = _batch_norm(norm_module, dim, "the norm of its conv_out")
    without_bias = tuple(part for part, conv in modules.items() if conv.bias is None)
    if mode == "concatenation":
        project = _conv_module(block.concat_project, 2, "concat_project", activation=nn.ReLU)
        if project.bias is not None:
            raise _Unsupported("its concat_project conv has a bias; ours has none")
    options: dict[str, Any] = dict(mode=mode, inter_channels=block.inter_channels, norm=norm)
    if kernel is not None:
        options.update(subsample=kernel, subsample_position="projection")
    if mode == "embedded_gaussian" and block.use_scale:
        options["scale"] = "auto"  # mmcv divides by sqrt(C'), the inter channels: our "auto"
    norm_name = block.conv_out.norm_name if norm_module is not None else "bn"

    def source(key: str) -> str:
        return mmcv_nonlocal_key(key, sub_sample=sub_sample, norm_name=norm_name)

    return _Plan(block.in_channels, dim, options, source, without_bias, norm_module)


def _conv_module(
    module: nn.Module, dim: int, what: str, *, norm_allowed: bool = False, activation: type | None = None
) -> nn.Module:
    """The conv of an mmcv ``ConvModule`` that is conv (then norm) and no other step, checked."""
    if _qualified(type(module)) != "mmcv.cnn.bricks.conv_module.ConvModule":
        raise _Unsupported(f"its {what} is a {type(module).__name__}, not mmcv's ConvModule")
    if module.with_spectral_norm or module.with_explicit_padding:
        raise _Unsupported(f"its {what} ConvModule has spectral norm or explicit padding")
    if module.with_norm and (not norm_allowed or module.order.index("norm") < module.order.index("conv")):
        raise _Unsupported(f"its {what} ConvModule has a norm {'before its conv' if norm_allowed else ''}".strip())
    if activation is None and module.with_activation:
        raise _Unsupported(f"its {what} ConvModule has an activation ({type(module.activate).__name__})")
    if activation is not None and (
        type(module.activate) is not activation or module.order.index("act") < module.order.index("conv")
    ):
        raise _Unsupported(f"its {what} ConvModule's activation is not a {activation.__name__} after the conv")
    return _pointwise(module.conv, dim, f"its {what} conv")


# --- PyTorchVideo and PySlowFast ----------------------------------------------------------------------------

_PYTORCHVIDEO_PARTS = {"theta": "conv_theta", "phi": "conv_phi", "g": "conv_g", "out": "conv_out"}


def _pytorchvideo_like(
    block: nn.Module, pool: nn.Module | None, norm_module: nn.Module | None, norm_name: str
) -> _Plan:
    """PyTorchVideo's NonLocal and PySlowFast's Nonlocal: the same layout (conv_theta, conv_phi, conv_g, conv_out,
    pool before φ/g, a norm), 3D only."""
    convs = {part: _pointwise(getattr(block, name), 3, f"its {name}") for part, name in _PYTORCHVIDEO_PARTS.items()}
    kernel = _max_pool(pool, 3, "its pool")
    norm = _batch_norm(norm_module, 3, "its norm")
    if block.instantiation == "softmax":
        options: dict[str, Any] = dict(mode="embedded_gaussian", scale="auto")  # dim_inner^-0.5 = C'^-0.5
    elif block.instantiation == "dot_product":
        options = dict(mode="dot_product")
    else:
        raise _Unsupported(f"its instantiation {block.instantiation!r} is neither softmax nor dot_product")
    options.update(inter_channels=convs["theta"].out_channels, norm=norm)
    if kernel is not None:
        options.update(subsample=kernel, subsample_position="input")
    names = dict(_PYTORCHVIDEO_PARTS, norm=norm_name)
    without_bias = tuple(part for part, conv in convs.items() if conv.bias is None)
    return _Plan(convs["theta"].in_channels, 3, options, _renamed(names), without_bias, norm_module)


def _from_pytorchvideo(block: nn.Module) -> _Plan:
    return _pytorchvideo_like(block, block.pool, block.norm, "norm")


def _from_slowfast(block: nn.Module) -> _Plan:
    if block.norm_type == "layernorm":
        raise _Unsupported(
            "its norm_type 'layernorm' is a GroupNorm of one group over (C, T, H, W) without affine "
            "parameters; ours normalises each position over the channels"
        )
    if block.norm_type not in ("batchnorm", "none"):
        raise _Unsupported(f"its norm_type {block.norm_type!r} is not one ours reproduces")
    pool = block.pool if block.use_pool else None
    return _pytorchvideo_like(block, pool, block.bn if block.norm_type == "batchnorm" else None, "bn")


# --- timm ----------------------------------------------------------------------------------------------------


def _from_timm(block: nn.Module) -> _Plan:
    convs = {
        part: _pointwise(getattr(block, name), 2, f"its {name}")
        for part, name in (("theta", "t"), ("phi", "p"), ("g", "g"), ("out", "z"))
    }
    norm = _batch_norm(block.norm, 2, "its norm")
    # timm scales θᵀφ by in_channels^-0.5 (C, not C') when use_scale, else by 1
    options = dict(
        mode="embedded_gaussian", inter_channels=convs["theta"].out_channels, norm=norm, scale=float(block.scale)
    )
    without_bias = tuple(part for part, conv in convs.items() if conv.bias is None)
    return _Plan(
        convs["theta"].in_channels,
        2,
        options,
        _renamed({"theta": "t", "phi": "p", "g": "g", "out": "z", "norm": "norm"}),
        without_bias,
        block.norm,
    )


_TRANSLATORS: dict[str, Callable[[nn.Module], _Plan]] = {
    "mmcv.cnn.bricks.non_local.NonLocal1d": _from_mmcv,
    "mmcv.cnn.bricks.non_local.NonLocal2d": _from_mmcv,
    "mmcv.cnn.bricks.non_local.NonLocal3d": _from_mmcv,
    "pytorchvideo.layers.nonlocal_net.NonLocal": _from_pytorchvideo,
    "timm.layers.non_local_attn.NonLocalAttn": _from_timm,
    "timm.models.layers.non_local_attn.NonLocalAttn": _from_timm,  # timm < 0.9 kept its layers under models
    "slowfast.models.nonlocal_helper.Nonlocal": _from_slowfast,
}


# --- building ------------------------------------------------------------------------------------------------


def _build(theirs: nn.Module, plan: _Plan, options: dict[str, Any]) -> NonLocalBlock:
    """Our block for ``theirs``: the same function, its weights and buffers, device, dtype, mode and frozen
    parameters."""
    ours = NonLocalBlock(plan.in_channels, dim=plan.dim, **options)
    for part in plan.without_bias:
        getattr(ours, part).register_parameter("bias", None)  # their conv has none: neither trains one
    if plan.norm is not None:
        ours.norm.eps, ours.norm.momentum = plan.norm.eps, plan.norm.momentum
    their_state = theirs.state_dict()
    mapped, used = {}, set()
    for key, value in ours.state_dict().items():
        src = plan.source(key)
        if src not in their_state or their_state[src].shape != value.shape:
            raise RuntimeError(
                f"{_qualified(type(theirs))}: no entry {src} of shape {tuple(value.shape)} for our "
                f"{key} (its entries: {', '.join(their_state)})"
            )
        mapped[key] = their_state[src]
        used.add(src)
    unplaced = sorted(set(their_state) - used)
    if unplaced:  # a weight we would drop: the mapping is incomplete, a bug rather than a user's error
        raise RuntimeError(f"{_qualified(type(theirs))}: entries with no place in our block: {', '.join(unplaced)}")
    reference = next(theirs.parameters())
    ours = ours.to(device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(mapped)
    for key, parameter in ours.named_parameters():
        parameter.requires_grad_(theirs.get_parameter(plan.source(key)).requires_grad)
    return ours.train(theirs.training)


# --- measuring -----------------------------------------------------------------------------------------------


def _step(model: nn.Module, x: Tensor) -> None:
    out = model(x)
    if not isinstance(out, Tensor):
        raise ValueError(f"measure= needs a model that returns a tensor; it returned a {type(out).__name__}")
    out.float().sum().backward()


def saved_for_backward_mb(model: nn.Module, x: Tensor) -> float:
    """The storage one forward of ``model`` on ``x`` keeps for the backward pass (the tensors autograd saves, each
    storage once, parameters excluded), in MB."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values()) / 2**20


def _peak_mb(model: nn.Module, x: Tensor) -> float | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    _step(model, x)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - base) / 2**20


def _measure(model: nn.Module, x: Tensor, repeats: int, against: dict | None = None) -> Any:
    """The step's time and memory (a dict before the swap; the :class:`SwapMeasurement` against it after)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1; got {repeats}")
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BN statistics: the steps must not move them
    _step(model, x)  # warm-up
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        _step(model, x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    result = dict(
        ms=sorted(times)[len(times) // 2] * 1e3, saved=saved_for_backward_mb(model, x), peak=_peak_mb(model, x)
    )
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if against is None:
        return result
    return SwapMeasurement(
        against["ms"], result["ms"], against["saved"], result["saved"], against["peak"], result["peak"], repeats
    )
