"""Where the paper puts its non-local blocks, as data you can read.

A placement maps a stage name to the 0-based indices of the residual blocks that a non-local block follows:
``{"res3": (1, 3), "res4": (1, 3, 5)}`` is "after blocks 1 and 3 of res3 and after blocks 1, 3 and 5 of res4".
The stages are res2..res5 of a bottleneck ResNet; R50 has (3, 4, 6, 3) blocks in them, R101 (3, 4, 23, 3).

Table 2(b) and (c) of the paper, and the official code's R101 layout, are below; :func:`check_locations` checks
any placement against a network's stage depths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Table 2(d): which keys each query sees (the extent= option of the block), used with the 5-block layout

STAGES = ("res2", "res3", "res4", "res5")

R50_LAYERS = (3, 4, 6, 3)
R101_LAYERS = (3, 4, 23, 3)

# Table 2(c), ResNet-50
NL1_R50 = {"res4": (4,)}  # 1 block: right before the last block of res4
NL5_R50 = {"res3": (1, 3), "res4": (1, 3, 5)}  # 5 blocks: every other block of res3 and res4
NL10_R50 = {"res3": (0, 1, 2, 3), "res4": (0, 1, 2, 3, 4, 5)}  # 10 blocks: every block of res3 and res4

# ResNet-101: the paper adds blocks "to the corresponding residual blocks"; the official code's layout
NL1_R101 = {"res4": (21,)}  # right before the last block of res4
NL5_R101 = {"res3": (1, 3), "res4": (6, 13, 20)}  # official: res3 every 2nd block, res4 every 7th

# Table 2(b): one block right before the last block of each stage (ResNet-50)
STAGE_ABLATION_R50 = {
    "res2": {"res2": (1,)},
    "res3": {"res3": (2,)},
    "res4": {"res4": (4,)},
    "res5": {"res5": (1,)},
}


def before_last_block(layers: Sequence[int], stage: str) -> dict[str, tuple[int, ...]]:
    """One block right before the last residual block of ``stage``, for any stage depths.

    Args:
        layers: residual blocks in res2..res5.
        stage: "res2" .. "res5".

    Returns:
        A placement with one block, e.g. ``{"res4": (4,)}`` for R50.
    """
    depth = _stage_depths(layers)[_check_stage(stage)]
    if depth < 2:
        raise ValueError(f"{stage} has {depth} block(s); 'before the last block' needs at least 2")
    return {stage: (depth - 2,)}


def check_locations(
    locations: Mapping[str, Sequence[int]] | None, layers: Sequence[int], what: str = "nonlocal_locations"
) -> dict[str, tuple[int, ...]]:
    """Checks a placement against the stage depths and returns it normalised (sorted tuples, known stages).

    Args:
        locations: stage name -> block indices (0-based) that a non-local block follows; None for none.
        layers: residual blocks in res2..res5.
        what: the argument's name, for the error messages (the same check serves other per-block sets).

    Returns:
        ``{stage: sorted indices}`` for every stage with at least one block.

    Raises:
        ValueError: an unknown stage, an index that is not an int, out of range or repeated.
    """
    depths = _stage_depths(layers)
    if locations is None:
        return {}
    if not isinstance(locations, Mapping):
        raise ValueError(f"{what} must map a stage name to block indices, e.g. {{'res4': (4,)}}; got {locations!r}")
    out: dict[str, tuple[int, ...]] = {}
    for stage, indices in locations.items():
        depth = depths[_check_stage(stage, what)]
        if isinstance(indices, int) or not isinstance(indices, Sequence):
            raise ValueError(f"{what}[{stage!r}] must be a sequence of block indices, e.g. (1, 3); got {indices!r}")
        for index in indices:
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(f"{what}[{stage!r}] holds {index!r}, not a block index (int)")
            if not 0 <= index < depth:
                raise ValueError(
                    f"{what}[{stage!r}] names residual block {index}, but {stage} has {depth} "
                    f"blocks (indices 0..{depth - 1}); layers={tuple(layers)}"
                )
        if len(set(indices)) != len(indices):
            raise ValueError(f"{what}[{stage!r}] repeats an index: {tuple(indices)}")
        if indices:
            out[stage] = tuple(sorted(indices))
    return out


def min_layers(locations: Mapping[str, Sequence[int]], at_least: int = 1) -> tuple[int, int, int, int]:
    """The smallest stage depths that hold a placement (e.g. to build a tiny copy of a registered model).

    Args:
        locations: stage name -> block indices.
        at_least: the depth of stages without a non-local block, and the least depth of any stage.

    Returns:
        Blocks in res2..res5.
    """
    depths = [at_least] * len(STAGES)
    for stage, indices in locations.items():
        if indices:
            depths[_check_stage(stage)] = max(at_least, max(indices) + 1)
    return tuple(depths)  # type: ignore[return-value]


def _check_stage(stage: str, what: str = "nonlocal_locations") -> int:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} in {what}; stages are {', '.join(STAGES)}")
    return STAGES.index(stage)


def _stage_depths(layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(layers)
    if len(layers) != len(STAGES) or not all(isinstance(n, int) and n >= 1 for n in layers):
        raise ValueError(f"layers must be 4 positive ints (blocks in res2..res5), e.g. (3, 4, 6, 3); got {layers!r}")
    return layers
