"""Non-local blocks inserted into any ``nn.Module``: after the submodules named by module paths with globs.

    model = torchvision.models.resnet50()
    nonlocalnet.add_nonlocal(model, ["layer2.[13]", "layer3.[135]"], subsample=2)

Each named submodule's output goes through a new :class:`~nonlocalnet.layers.NonLocalBlock`. Where the block goes:

* the submodule sits in a plain ``nn.Sequential`` (torchvision's ``layer3``, timm's ``stages.2.blocks``): the block
  becomes its next sibling, named ``nl<name>`` (``layer3.nl4`` after ``layer3.4``);
* the submodule is itself a plain ``nn.Sequential``: the block is appended as its last child ``nonlocal_block``;
* otherwise (a block in a ``ModuleList`` that its parent loops over, as PyTorchVideo's ``res_blocks``): the block
  becomes the child ``nonlocal_block`` of the submodule and a forward hook passes the submodule's output through it.

Either way the model's own state-dict keys are unchanged, so its pretrained weights still load (the new keys are the
blocks' own), and since every block starts as the identity (γ = 0, or W_z = 0 without a norm) the model computes
exactly what it computed before, until training moves the blocks.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import NonLocalBlock

SIBLING_PREFIX = "nl"  # nl<name>: the block after <name> in an nn.Sequential
CHILD_NAME = "nonlocal_block"  # the block inside the module it follows (hooked, or last of a Sequential)
# the options the model decides, not the caller: in_channels and dim come from the module (or a dry forward)
_WORKED_OUT = ("in_channels", "dim")
_NORMS_WITH_DIM = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
}
_CONV_DIM = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


@dataclass(frozen=True)
class Insertion:
    """One block inserted: ``block`` (its module path) after ``after``, with ``channels`` and ``dim`` worked out
    from ``source`` ("structure": the submodule's last conv/norm; "forward": its output in a dry forward); ``how``
    is "sibling", "last child" or "hook" (see the module's docstring)."""

    after: str
    block: str
    channels: int
    dim: int
    source: str
    how: str


@dataclass
class InsertionReport:
    """What :func:`add_nonlocal` inserted where; ``str()`` is a table, one row per block."""

    insertions: list[Insertion] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "the block's defaults"
        lines = [f"add_nonlocal: {len(self.insertions)} non-local block(s) ({options})"]
        after = max([len(i.after) for i in self.insertions] + [5])
        block = max([len(i.block) for i in self.insertions] + [5])
        lines.append(f"  {'after':<{after}}  {'block':<{block}}  {'C':>5}  dim  from       how")
        for i in self.insertions:
            lines.append(
                f"  {i.after:<{after}}  {i.block:<{block}}  {i.channels:>5}  {i.dim:>3}  {i.source:<9}  {i.how}"
            )
        return "\n".join(lines)


def add_nonlocal(
    model: nn.Module,
    at: str | Sequence[str],
    *,
    example_input: Tensor | None = None,
    verbose: bool = True,
    return_report: bool = False,
    **block_options: Any,
) -> nn.Module | tuple[nn.Module, InsertionReport]:
    """Inserts a non-local block after each submodule of ``model`` that ``at`` names, in place.

    Args:
        model: any module whose named submodules' outputs are (B, C, *spatial) maps, channels first.
        at: a module path (``"layer3.4"``) or a list of them; each may hold glob patterns matched one path segment
            at a time (``"layer3.[13]"``, ``"stages.2.blocks.*"``: ``*`` never crosses a dot). Every pattern must
            match at least one module; the model's root, non-local blocks and their insides are never matched.
        example_input: a tensor to run the model on once, without gradients, to read each submodule's output
            (channels and number of spatial axes) instead of working them out from its structure. Needed where
            the submodule has no conv or norm (an activation, a pool) or where its last conv and last norm disagree.
        verbose: print the :class:`InsertionReport`.
        return_report: return ``(model, report)`` instead of the model.
        **block_options: :class:`~nonlocalnet.layers.NonLocalBlock`'s keyword options (``mode``, ``subsample``,
            ``norm``, ...), the same for every block; ``in_channels`` and ``dim`` are worked out per block.

    Returns:
        ``model`` (or ``(model, report)``), its outputs unchanged until the new blocks train: each starts as the
        identity.

    Raises:
        ValueError: an unknown block option (named), a pattern that matches no module (with the closest module
            names), a submodule already followed by a non-local block, or channels that cannot be worked out.
    """
    _check_options(block_options)
    patterns = [at] if isinstance(at, str) else list(at)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"at must be a module path or a non-empty list of them; got {at!r}")
    targets = match_modules(model, patterns)
    shapes = _output_shapes(model, targets, example_input) if example_input is not None else {}
    # every block is built (and its options checked) before the model changes
    planned = []
    for path in targets:
        module = model.get_submodule(path)
        _wiring(model, path)  # a module already followed by a block, or never called: refused before any change
        channels, dim, source = _channels_and_dim(path, module, shapes)
        block = NonLocalBlock(channels, dim=dim, **block_options)
        reference = next(module.parameters(), None)
        reference = next(model.parameters(), None) if reference is None else reference
        if reference is not None:
            block = block.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        planned.append((path, block, channels, dim, source))
    report = InsertionReport(options=dict(block_options))
    for path, block, channels, dim, source in planned:
        where, how = _insert(model, path, block)
        report.insertions.append(Insertion(path, where, channels, dim, source, how))
    if verbose:
        print(report)
    return (model, report) if return_report else model


def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The module paths of ``model`` that ``patterns`` match (globs per path segment), in the model's order.

    Raises:
        ValueError: a pattern that matches nothing, with the closest module names.
    """
    names = [name for name in _candidates(model)]
    matched: set[str] = set()
    for pattern in patterns:
        found = [name for name in names if _match(pattern, name)]
        if not found:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            hint = f"; the closest module names: {', '.join(close)}" if close else ""
            raise ValueError(f"no module of {type(model).__name__} matches {pattern!r}{hint}")
        matched.update(found)
    return [name for name in names if name in matched]


def _candidates(model: nn.Module) -> list[str]:
    """Every submodule's path except the root, non-local blocks and what is inside them."""
    names, inside = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, NonLocalBlock):
            inside.append(name + ".")
            continue
        names.append(name)
    return names


def _match(pattern: str, name: str) -> bool:
    """A glob per dot-separated segment: ``layer3.*`` matches ``layer3.0`` but not ``layer3.0.conv1``."""
    parts, segments = pattern.split("."), name.split(".")
    return len(parts) == len(segments) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segments, parts))


def _check_options(options: dict[str, Any]) -> None:
    accepted = [
        name for name, p in inspect.signature(NonLocalBlock.__init__).parameters.items() if p.kind == p.KEYWORD_ONLY
    ]
    for name in options:
        if name in _WORKED_OUT:
            raise ValueError(
                f"add_nonlocal works out {name} for each block from the module it follows; pass "
                f"example_input= where the module's structure does not tell"
            )
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown non-local block option {name!r}{hint}; NonLocalBlock takes {', '.join(accepted)}"
            )


def _output_shapes(model: nn.Module, targets: list[str], example_input: Tensor) -> dict[str, tuple[int, ...]]:
    """Each target's output shape in one forward of ``example_input`` (no gradients; train/eval mode kept, BN
    running statistics restored)."""
    shapes: dict[str, Any] = {}
    handles = []
    for path in targets:

        def record(module: nn.Module, args: Any, output: Any, path: str = path) -> None:
            shapes[path] = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__

        handles.append(model.get_submodule(path).register_forward_hook(record))
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # a dry run must not move BN statistics
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    not_run = [p for p in targets if p not in shapes]
    if not_run:
        raise ValueError(
            f"the example input's forward never ran {', '.join(not_run)}: a block after it would never run either"
        )
    return shapes


def _channels_and_dim(path: str, module: nn.Module, shapes: dict[str, Any]) -> tuple[int, int, str]:
    if path in shapes:
        shape = shapes[path]
        if not isinstance(shape, tuple):
            raise ValueError(
                f"{path} returns a {shape}, not a tensor: a non-local block needs a (B, C, *spatial) map after it"
            )
        if len(shape) not in (3, 4, 5):
            raise ValueError(
                f"{path} returns a tensor of shape {shape}; a non-local block takes (B, C, L), "
                f"(B, C, H, W) or (B, C, T, H, W)"
            )
        return shape[1], len(shape) - 2, "forward"
    convs = [m for m in module.modules() if isinstance(m, tuple(_CONV_DIM))]
    norms = [m for m in module.modules() if _norm_channels(m) is not None]
    if not convs:
        raise ValueError(
            f"{path} ({type(module).__name__}) has no convolution to tell its output's channels and "
            f"axes; pass example_input= to read them from a forward"
        )
    conv = convs[-1]
    channels, dim = conv.out_channels, next(d for t, d in _CONV_DIM.items() if isinstance(conv, t))
    if norms:
        norm = norms[-1]
        norm_dim = next((d for t, d in _NORMS_WITH_DIM.items() if isinstance(norm, t)), dim)
        if _norm_channels(norm) != channels or norm_dim != dim:
            raise ValueError(
                f"{path} ({type(module).__name__}): its last conv has {channels} output channels "
                f"({dim}-D) but its last norm {_norm_channels(norm)} ({norm_dim}-D); pass "
                f"example_input= to read its output from a forward"
            )
    return channels, dim, "structure"


def _norm_channels(module: nn.Module) -> int | None:
    """The channels a norm layer normalises (BatchNorm, InstanceNorm, GroupNorm, a LayerNorm over one axis,
    torchvision's FrozenBatchNorm2d); None for anything else."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if type(module).__name__ == "FrozenBatchNorm2d" and isinstance(getattr(module, "weight", None), Tensor):
        return module.weight.shape[0]
    return None


def _plain_sequential(module: nn.Module) -> bool:
    """An nn.Sequential whose forward is Sequential's: it runs its children in order, a new one included."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _wiring(model: nn.Module, path: str) -> tuple[str, str]:
    """Where the block after ``path`` goes (its path) and how it is wired, or why it cannot go there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = parent.get_submodule(name)
    if _plain_sequential(parent):
        nl_name = f"{SIBLING_PREFIX}{name}" if name.isdigit() else f"{SIBLING_PREFIX}_{name}"
        existing = parent._modules.get(nl_name)
        if isinstance(existing, NonLocalBlock):
            raise ValueError(f"{path} is already followed by a non-local block ({_join(parent_path, nl_name)})")
        if existing is not None:
            raise ValueError(
                f"cannot name the non-local block after {path} {nl_name!r}: {parent_path or 'the model'} "
                f"already has a module of that name"
            )
        return _join(parent_path, nl_name), "sibling"
    if isinstance(module._modules.get(CHILD_NAME), NonLocalBlock):
        raise ValueError(f"{path} is already followed by a non-local block ({path}.{CHILD_NAME})")
    if CHILD_NAME in module._modules:
        raise ValueError(f"{path} already has a child named {CHILD_NAME!r}")
    if _plain_sequential(module):
        return f"{path}.{CHILD_NAME}", "last child"
    if type(module).forward is nn.Module.forward:
        raise ValueError(
            f"{path} is a {type(module).__name__}, a container that is never called itself; name "
            f"the modules inside it ({path}.*)"
        )
    return f"{path}.{CHILD_NAME}", "hook"


def _insert(model: nn.Module, path: str, block: NonLocalBlock) -> tuple[str, str]:
    """Puts ``block`` after the module at ``path`` (as :func:`_wiring` says); returns the block's path and how it
    is wired."""
    where, how = _wiring(model, path)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if how == "sibling":
        nl_name = where.rpartition(".")[2]
        children: OrderedDict[str, nn.Module] = OrderedDict()
        for child_name, child in parent._modules.items():
            children[child_name] = child
            if child_name == name:
                children[nl_name] = block
        parent._modules.clear()
        parent._modules.update(children)
        return where, how
    module = parent.get_submodule(name)
    module.add_module(CHILD_NAME, block)
    if how == "hook":
        module.register_forward_hook(apply_nonlocal_block)
    return where, how


def apply_nonlocal_block(module: nn.Module, args: Any, output: Any) -> Tensor:
    """The forward hook of a module that holds an inserted block: its output through the block."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{type(module).__name__} returned a {type(output).__name__}, but the non-local block "
            f"inserted after it takes a tensor"
        )
    return module._modules[CHILD_NAME](output)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name
