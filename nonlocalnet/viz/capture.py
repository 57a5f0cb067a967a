"""What each non-local block attends to: its (N, M) weights, with every query and key placed in the input clip.

A block deep in a network sees a feature map that is smaller than the clip by the network's stride, and its
keys may be max-pooled further (``subsample``). :func:`capture_attention` runs the model once with forward
hooks on its :class:`~nonlocalnet.layers.NonLocalBlock` modules; each hook re-runs its block on the input it
was given with ``return_attention=True`` and records the normalised weights f/C(x) together with the
coordinates of the centre of every query and key cell in input-frame pixels:

    stride s   = input size / feature-map size              (per axis: frames, rows, columns)
    query i    -> centre (i + 0.5) * s - 0.5                 (a pixel p spans [p, p + 1), so pixel centres are
                                                               integers and a cell of s pixels is centred
                                                               at its middle)
    key j      -> centre (j + 0.5) * k * s - 0.5             (k = the block's max-pool kernel = stride)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import NonLocalBlock, find_nonlocal_blocks  # find_nonlocal_blocks: exported here too
from ..layers.folding import Folding, fold, scatter_attention

__all__ = ["BlockAttention", "capture_attention", "cell_centres", "find_nonlocal_blocks", "resolve_block_names"]


@dataclass(frozen=True)
class BlockAttention:
    """The attention of one non-local block on one batch, placed in the input clip.

    Coordinates are always (t, y, x): frame index, row, column of the input, pixel centres at integers.
    For image blocks (dim=2) t is 0; for sequence blocks (dim=1) the sequence axis is t and y = x = 0.

    Attributes:
        name: the block's module name in the model (``model.get_submodule(name)``).
        mode: the block's pairwise function ("embedded_gaussian", "dot_product", ...).
        weights: (B, N, M) normalised weights f/C(x), float32 on the CPU; row i holds query i's weights over
            the M keys, both flattened in (t, h, w) order. Dot-product weights can be negative.
        query_grid: (T', H', W') of the block's input (N = product).
        key_grid: (Tk, Hk, Wk) of its keys after subsampling (M = product).
        query_stride: input pixels (frames, rows, columns) per query cell.
        key_stride: input pixels per key cell (query_stride times the subsampling kernel).
        query_coords: (N, 3) centre of each query cell in input pixels.
        key_coords: (M, 3) centre of each key cell in input pixels; in memory-grid cells (stride 1 times the
            kernel) when the keys came from a ``memory`` tensor rather than the clip.
        input_size: (T, H, W) of the input clip.
        from_memory: True if the block attended over a ``memory`` tensor (a feature bank), not the clip.
        reach: (N, M) bool, True where query i may attend to key j at all (the block's ``extent`` and
            ``temporal_groups``); None when every query sees every key. Outside it the weights are exactly 0,
            which for signed (dot-product) weights is not the same as "not attended".
    """

    name: str
    mode: str
    weights: Tensor
    query_grid: tuple[int, int, int]
    key_grid: tuple[int, int, int]
    query_stride: tuple[float, float, float]
    key_stride: tuple[float, float, float]
    query_coords: Tensor
    key_coords: Tensor
    input_size: tuple[int, int, int]
    from_memory: bool = False
    reach: Tensor | None = None

    @property
    def signed(self) -> bool:
        """Whether the weights can be negative (dot product), so a diverging colour map is needed."""
        return self.mode == "dot_product" or bool((self.weights < 0).any())

    def query_index(self, t: float, y: float, x: float) -> int:
        """Index of the query cell that contains the input pixel (t, y, x)."""
        return _cell_index((t, y, x), self.query_grid, self.query_stride)

    def key_index(self, t: float, y: float, x: float) -> int:
        """Index of the key cell that contains the input pixel (t, y, x) (clip keys only)."""
        return _cell_index((t, y, x), self.key_grid, self.key_stride)

    def key_map(self, query: int, batch: int = 0) -> Tensor:
        """Query ``query``'s weights over the key grid: (Tk, Hk, Wk)."""
        return self.weights[batch, query].reshape(self.key_grid)  # (M,) -> (Tk, Hk, Wk)

    def top_pairs(
        self, k: int, batch: int = 0, query: int | None = None, min_distance: float = 0.0
    ) -> list[tuple[int, int, float]]:
        """The k strongest (query, key, weight) pairs, strongest first.

        Strength is the weight, or its absolute value when the weights are signed.

        Args:
            k: how many pairs.
            batch: the batch element.
            query: only this query's pairs; None = over all queries.
            min_distance: skip pairs whose key centre lies closer than this (input pixels, over (y, x) and
                frames together) to the query centre, e.g. to leave out a query attending to itself.
        """
        weights = self.weights[batch]  # (N, M)
        strength = weights.abs() if self.signed else weights.clone()
        if min_distance > 0:
            dist = torch.cdist(self.query_coords, self.key_coords)  # (N, 3), (M, 3) -> (N, M)
            strength[dist < min_distance] = float("-inf")
        if query is not None:
            mask = torch.full_like(strength, float("-inf"))
            mask[query] = 0.0
            strength = strength + mask
        flat = strength.flatten()  # (N * M,)
        k = min(k, int(torch.isfinite(flat).sum()))
        values, order = flat.topk(k)
        m = weights.shape[1]
        return [(int(i) // m, int(i) % m, float(weights.flatten()[i])) for i in order]


def capture_attention(
    model: nn.Module, clip: Tensor, blocks: str | Sequence[str] | None = None
) -> dict[str, BlockAttention]:
    """Runs ``model`` on ``clip`` once and returns what its non-local blocks attend to.

    The forward pass runs in eval mode under ``torch.no_grad()`` (the model's train/eval flags are restored
    afterwards), so BatchNorm uses its running statistics and nothing in the model changes.

    Args:
        model: any module containing :class:`~nonlocalnet.layers.NonLocalBlock` modules; it is called as
            ``model(clip)``.
        clip: the input, (B, C, T, H, W) or (C, T, H, W) for video models, (B, C, H, W) for image models; the
            trailing ``dim`` axes are the input size that query and key cells are mapped back to.
        blocks: names of the blocks to capture (module names such as "res4.nl5", see
            :func:`find_nonlocal_blocks`, or the paper's "res4.5"); a single name, or None for every block.

    Returns:
        block name -> :class:`BlockAttention`, in the order the blocks ran.

    Raises:
        ValueError: if the model has no non-local block, a requested name is not one, or a block's input does
            not match the clip's number of spatial axes.
    """
    available = find_nonlocal_blocks(model)
    if not available:
        raise ValueError(f"{type(model).__name__} contains no NonLocalBlock to capture")
    if blocks is None:
        names = list(available)
    else:
        requested = [blocks] if isinstance(blocks, str) else list(blocks)
        names = [_alias(n, available) for n in requested]
        unknown = [r for r, n in zip(requested, names) if n is None]
        if unknown:
            raise ValueError(
                f"not non-local blocks of this model: {', '.join(unknown)}; its blocks are: {', '.join(available)}"
            )
    if clip.dim() == 4 and any(available[n].dim == 3 for n in names):
        clip = clip.unsqueeze(0)  # (C, T, H, W) -> (1, C, T, H, W)

    records: dict[str, BlockAttention] = {}
    running: set[str] = set()  # blocks whose hook is re-running them: their inner call must not recurse

    def make_hook(name: str):
        def hook(module: NonLocalBlock, args: tuple, kwargs: dict, output: object) -> None:
            if name in running:
                return
            x = args[0]
            memory = kwargs.get("memory", args[1] if len(args) > 1 else None)
            running.add(name)
            try:
                _, weights = module(x, memory=memory, return_attention=True)
            finally:
                running.discard(name)
            records[name] = _place(
                name,
                module,
                weights,
                tuple(x.shape[2:]),
                None if memory is None else tuple(memory.shape[2:]),
                tuple(clip.shape[2:]),
            )

        return hook

    handles = [available[n].register_forward_hook(make_hook(n), with_kwargs=True) for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(clip)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    missing = [n for n in names if n not in records]
    if missing:
        raise ValueError(f"these non-local blocks did not run in the forward pass: {', '.join(missing)}")
    return records


def resolve_block_names(model: nn.Module, block: str | None) -> list[str]:
    """Module names of the blocks a user asks for.

    Args:
        model: the model.
        block: a module name ("res4.nl5"), the paper's "stage.index" ("res4.5": the block after residual block 5
            of res4), "all" (every block) or None (the last block).

    Raises:
        ValueError: the model has no non-local block, or ``block`` names none of them.
    """
    available = list(find_nonlocal_blocks(model))
    if not available:
        raise ValueError(f"{type(model).__name__} contains no NonLocalBlock")
    if block is None:
        return [available[-1]]
    if block == "all":
        return available
    name = _alias(block, available)
    if name is not None:
        return [name]
    raise ValueError(f"{block!r} is not a non-local block of this model; its blocks are: {', '.join(available)}")


def cell_centres(grid: Sequence[int], stride: Sequence[float]) -> Tensor:
    """Centres of the cells of a (T, H, W) grid whose cells span ``stride`` input pixels: (prod(grid), 3).

    Cell i along an axis covers input pixels [i * s, (i + 1) * s), so its centre is (i + 0.5) * s - 0.5.
    """
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5) * s - 0.5 for n, s in zip(grid, stride)]
    t, y, x = torch.meshgrid(*axes, indexing="ij")  # each (T, H, W)
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3).float()  # (T, H, W, 3) -> (T*H*W, 3)


def _alias(name: str, available: Mapping | Sequence[str]) -> str | None:
    """``name`` itself if it is a block, else "stage.i" read as "stage.nl{i}" if that is one, else None."""
    if name in available:
        return name
    stage, _, index = name.rpartition(".")
    alias = f"{stage}.nl{index}"
    return alias if index.isdigit() and alias in available else None


def _place(
    name: str,
    block: NonLocalBlock,
    weights: Tensor,
    query_spatial: tuple[int, ...],
    memory_spatial: tuple[int, ...] | None,
    input_spatial: tuple[int, ...],
) -> BlockAttention:
    dim = block.dim
    if len(input_spatial) < dim:
        raise ValueError(
            f"block {name} works on {dim} spatial axes but the input clip has only "
            f"{len(input_spatial)} ({input_spatial}); cannot map its cells back to the input"
        )
    input_spatial = input_spatial[-dim:]
    kernel = block.subsample or (1,) * dim
    query_stride = tuple(i / q for i, q in zip(input_spatial, query_spatial))
    if memory_spatial is None:
        key_source, source_stride = query_spatial, query_stride
    else:
        key_source, source_stride = memory_spatial, (1.0,) * dim  # memory cells, not input pixels
    key_spatial = tuple(s // k for s, k in zip(key_source, kernel))  # max-pool, floor mode
    key_stride = tuple(s * k for s, k in zip(source_stride, kernel))
    if math.prod(query_spatial) != weights.shape[1] or math.prod(key_spatial) != weights.shape[2]:
        raise ValueError(
            f"block {name}: attention of shape {tuple(weights.shape)} does not match queries "
            f"{query_spatial} and keys {key_spatial}"
        )
    to3 = _to_thw(dim)
    reach = None if memory_spatial is not None else _reach(block, query_spatial, key_spatial)
    return BlockAttention(
        name=name,
        mode=block.mode,
        weights=weights.detach().float().cpu(),
        query_grid=to3(query_spatial, 1),
        key_grid=to3(key_spatial, 1),
        query_stride=to3(query_stride, 1.0),
        key_stride=to3(key_stride, 1.0),
        query_coords=cell_centres(to3(query_spatial, 1), to3(query_stride, 1.0)),
        key_coords=cell_centres(to3(key_spatial, 1), to3(key_stride, 1.0)),
        input_size=to3(input_spatial, 1),
        from_memory=memory_spatial is not None,
        reach=reach,
    )


def _reach(block: NonLocalBlock, query_spatial: tuple[int, ...], key_spatial: tuple[int, ...]) -> Tensor | None:
    """(N, M) bool: which keys each query can see under the block's extent and temporal groups; None = all."""
    extent, frames_per_group = block.extent, block.temporal_groups
    if extent == "spacetime" and frames_per_group == 1:
        return None
    groups = query_spatial[0] // frames_per_group if extent == "spacetime" else 1
    folding = Folding(extent, groups)
    # fold a dummy map of each side to learn the problem sizes: (1, 1, *S) -> (F, L, 1)
    problems, queries = fold(torch.zeros(1, 1, *query_spatial), folding).shape[:2]
    keys = fold(torch.zeros(1, 1, *key_spatial), folding).shape[1]
    ones = torch.ones(problems, queries, keys)
    return scatter_attention(ones, folding, 1, query_spatial, key_spatial)[0] > 0  # (N, M)


def _to_thw(dim: int):
    """Pads per-axis values of a dim-axis map to (t, y, x): images get t, sequences get y and x."""

    def pad(values: Iterable, fill):
        values = tuple(values)
        if dim == 3:
            return values
        if dim == 2:
            return (fill,) + values
        return values + (fill, fill)

    return pad


def _cell_index(point: Sequence[float], grid: Sequence[int], stride: Sequence[float]) -> int:
    """The cell holding an input pixel; a pixel outside the clip is an error, not the nearest edge cell."""
    extent = [n * s for n, s in zip(grid, stride)]
    if not all(0 <= p < e for p, e in zip(point, extent)):
        shown = ", ".join(f"{p:g}" for p in point)
        raise ValueError(
            f"position (t, y, x) = ({shown}) lies outside the clip ({extent[0]:g} frames of "
            f"{extent[1]:g} x {extent[2]:g} pixels)"
        )
    index = 0
    for p, n, s in zip(point, grid, stride):
        i = min(max(int((p + 0.5) // s), 0), n - 1)  # pixel p spans [p, p + 1): its centre p + 0.5 / s
        index = index * n + i
    return index
