"""Did each non-local block learn anything? Per block: how much its attention depends on the query, how spread
its weights are, where its strongest keys lie, and whether its output adds anything to its input.

A block stuck at the identity (γ = 0: the non-local term is zero) or at uniform attention (every query averages
every key alike, the same for all queries: a global pooling) is the most common reason a non-local block "did not
help"; GCNet measured the second in trained networks by the distance between different queries' attention maps.

Definitions, for one block on one clip, its weights w (N queries x M keys, :func:`capture_attention`):

- Attention map of query i: p_i = |w_i| / Σ_j |w_ij| (the softmax rows themselves for the (embedded) gaussian;
  the dot-product and concatenation weights f/M are made a distribution the same way). Rows that are all zero
  (a concatenation query whose ReLU passes no key) have no map and are left out.
- ``query_distance``: the mean cosine distance 1 - p_iᵀp_k / (‖p_i‖ ‖p_k‖) over all ordered pairs i ≠ k of
  sampled queries (every query when N <= ``max_queries``, else ``max_queries`` queries evenly spaced in (t, h, w)
  order). Between 0 (every query attends alike: query-independent) and 1 (no two queries share a key: e.g.
  every query attends to itself alone).
- ``entropy``: the mean over queries of -Σ_j p_ij log p_ij / log M_i, M_i the keys query i can reach (its extent
  and temporal group; M without them): 1 for uniform attention, 0 for one key. Queries that reach one key only
  are left out.
- ``offset``: the mean over queries of |Δt|, |Δy|, |Δx| between the query cell's centre and the centre of its
  strongest key (argmax_j p_ij; ties go to the first key in (t, h, w) order), in input frames and pixels.
- ``contribution``: ‖z - x‖ / ‖x‖ over the batch, the size of the non-local term Norm(W_z y) against the block's
  input x: 0 for a block at the identity.
- ``gamma``: the mean |γ| of the norm after W_z (None without a norm); ``w_z_norm``: the Frobenius norm of W_z.

Over several clips each value is the mean of the clips' values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers import NonLocalBlock, find_nonlocal_blocks
from .capture import BlockAttention, capture_attention

__all__ = [
    "BlockDiagnosis",
    "DEAD_CONTRIBUTION",
    "UNIFORM_ENTROPY",
    "diagnose_attention",
    "diagnosis_table",
    "draw_diagnosis",
    "inactive_blocks",
    "warn_inactive_blocks",
]

log = logging.getLogger("nonlocalnet")

# a block whose non-local term is below this fraction of its input adds nothing: still at the identity
DEAD_CONTRIBUTION = 1e-2
# a block whose normalised entropy is above this attends (all but) uniformly: still a global average
UNIFORM_ENTROPY = 0.99


@dataclass(frozen=True)
class BlockDiagnosis:
    """The diagnosis of one block (see the module's docstring for the definitions).

    Attributes:
        name: the block's module name.
        mode: its pairwise function.
        query_distance: mean cosine distance between sampled queries' attention maps, in [0, 1].
        entropy: mean normalised entropy of the attention maps, in [0, 1].
        offset: mean (|Δt|, |Δy|, |Δx|) from a query to its strongest key, in input frames / pixels.
        contribution: ‖z - x‖ / ‖x‖.
        gamma: mean |γ| of the norm after W_z; None for a block without a norm.
        w_z_norm: ‖W_z‖ (Frobenius).
        queries: queries sampled for ``query_distance`` (per clip).
    """

    name: str
    mode: str
    query_distance: float
    entropy: float
    offset: tuple[float, float, float]
    contribution: float
    gamma: float | None
    w_z_norm: float
    queries: int

    @property
    def at_identity(self) -> bool:
        """The non-local term is negligible: the block still passes its input through unchanged."""
        return self.contribution < DEAD_CONTRIBUTION

    @property
    def uniform(self) -> bool:
        """Its attention is all but uniform over the keys."""
        return self.entropy > UNIFORM_ENTROPY


def diagnose_attention(
    model: nn.Module,
    clips: Tensor | Iterable[Tensor],
    blocks: str | Sequence[str] | None = None,
    max_queries: int = 256,
) -> dict[str, BlockDiagnosis]:
    """Diagnoses each non-local block of ``model`` on one clip or several (see the module's docstring).

    Args:
        model: any module with :class:`~nonlocalnet.layers.NonLocalBlock` modules, called as ``model(clip)``; it
            runs in eval mode without gradients and is left as it was.
        clips: one input (B, C, T, H, W) or (C, T, H, W), or an iterable of them (a video list's clips).
        blocks: block names (see :func:`~nonlocalnet.viz.capture.capture_attention`); None for every block.
        max_queries: queries sampled per clip for ``query_distance`` (its cost is quadratic in them).

    Returns:
        block name -> :class:`BlockDiagnosis`, in the order the blocks ran.
    """
    if max_queries < 2:
        raise ValueError(f"max_queries must be at least 2 (a distance needs two queries); got {max_queries}")
    batches = [clips] if isinstance(clips, Tensor) else list(clips)
    if not batches:
        raise ValueError("no clip to diagnose")
    available = find_nonlocal_blocks(model)
    per_clip: dict[str, list[tuple[float, float, tuple[float, float, float], float, int]]] = {}
    for clip in batches:
        ratios: dict[str, float] = {}
        handles = [block.register_forward_hook(_ratio_hook(name, ratios)) for name, block in available.items()]
        try:
            attention = capture_attention(model, clip, blocks)
        finally:
            for h in handles:
                h.remove()
        for name, record in attention.items():
            distance, queries = _query_distance(record, max_queries)
            per_clip.setdefault(name, []).append((distance, _entropy(record), _offset(record), ratios[name], queries))
    out = {}
    for name, values in per_clip.items():
        block = available[name]
        gamma = None if block.norm_type is None else float(block.norm.weight.detach().abs().mean())
        out[name] = BlockDiagnosis(
            name=name,
            mode=block.mode,
            query_distance=_mean([v[0] for v in values]),
            entropy=_mean([v[1] for v in values]),
            offset=tuple(_mean([v[2][a] for v in values]) for a in range(3)),  # type: ignore[arg-type]
            contribution=_mean([v[3] for v in values]),
            gamma=gamma,
            w_z_norm=float(block.out.weight.detach().float().norm()),
            queries=values[0][4],
        )
    return out


def inactive_blocks(diagnoses: dict[str, BlockDiagnosis]) -> list[str]:
    """One line per block still at the identity or at uniform attention; empty when every block works."""
    lines = []
    for d in diagnoses.values():
        if d.at_identity:
            gamma = "" if d.gamma is None else f", mean |γ| {d.gamma:.2g}"
            lines.append(
                f"non-local block {d.name} is still at the identity: its term is {d.contribution:.2g} of "
                f"its input (below {DEAD_CONTRIBUTION:g}{gamma}, ‖W_z‖ {d.w_z_norm:.2g})"
            )
        if d.uniform:
            lines.append(
                f"non-local block {d.name} still attends uniformly: normalised entropy {d.entropy:.3f} "
                f"(above {UNIFORM_ENTROPY:g}; 1 = uniform), query distance {d.query_distance:.3f}"
            )
    return lines


def warn_inactive_blocks(model: nn.Module, clip: Tensor, iteration: int) -> list[str]:
    """Logs a warning for each block of ``model`` still at the identity or at uniform attention on ``clip``
    after ``iteration`` training steps; the training loop calls it once, at ``train.check_blocks_after``.

    The check builds each block's N x M weights for the one clip; where they do not fit (the block's
    ``attention_budget_bytes``, or the device's memory) it says so in a warning and training goes on.

    Returns:
        The warnings logged (none for a model without non-local blocks).
    """
    if not find_nonlocal_blocks(model):
        return []
    try:
        diagnoses = diagnose_attention(model, clip)
    except (ValueError, torch.OutOfMemoryError) as exc:
        log.warning(
            "after %d steps, the non-local blocks could not be checked: %s", iteration, " ".join(str(exc).split())
        )
        return []
    lines = [f"after {iteration} steps, {line}" for line in inactive_blocks(diagnoses)]
    for line in lines:
        log.warning("%s", line)
    return lines


def diagnosis_table(diagnoses: dict[str, BlockDiagnosis]) -> str:
    """The diagnoses as a text table, one block a line, with a flag column."""
    header = (
        "block",
        "mode",
        "query dist",
        "entropy",
        "|Δt|",
        "|Δy|",
        "|Δx|",
        "‖term‖/‖x‖",
        "mean |γ|",
        "‖W_z‖",
        "flag",
    )
    rows = []
    for d in diagnoses.values():
        flags = [f for f, on in (("identity", d.at_identity), ("uniform", d.uniform)) if on]
        rows.append(
            (
                d.name or "(model)",
                d.mode,
                f"{d.query_distance:.3f}",
                f"{d.entropy:.3f}",
                *(f"{v:.1f}" for v in d.offset),
                f"{d.contribution:.3g}",
                "-" if d.gamma is None else f"{d.gamma:.3g}",
                f"{d.w_z_norm:.3g}",
                ",".join(flags) or "-",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i in (0, 1, 10) else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *map(line, rows)])


def draw_diagnosis(diagnoses: dict[str, BlockDiagnosis], path: str | Path) -> Path:
    """A PNG of bar charts, one bar per block: query distance, entropy, the term's size and the strongest keys'
    mean offsets; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    names = list(diagnoses)
    ds = list(diagnoses.values())
    x = range(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(4 + 2.2 * max(4, len(names)), 3.6))
    panels = [
        ("query distance (0: same for all)", [d.query_distance for d in ds], (0, 1), None),
        ("entropy / log M (1: uniform)", [d.entropy for d in ds], (0, 1), UNIFORM_ENTROPY),
        ("‖non-local term‖ / ‖x‖", [d.contribution for d in ds], None, DEAD_CONTRIBUTION),
    ]
    for ax, (title, values, limits, threshold) in zip(axes, panels):
        ax.bar(x, values, color="tab:blue")
        if threshold is not None:  # the warning's threshold
            ax.axhline(threshold, color="tab:gray", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(*(limits or (0, None)))  # sizes start at 0 even when every bar is 0
    width = 0.27
    for k, (label, colour) in enumerate(
        (("|Δt| frames", "tab:orange"), ("|Δy| px", "tab:green"), ("|Δx| px", "tab:red"))
    ):
        axes[3].bar([i + (k - 1) * width for i in x], [d.offset[k] for d in ds], width, label=label, color=colour)
    axes[3].set_title("strongest key from its query", fontsize=9)
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# --- the measures --------------------------------------------------------------------------------------------------


def _ratio_hook(name: str, into: dict[str, float]):
    def hook(_block: NonLocalBlock, args: tuple, output: Tensor) -> None:
        if name not in into:  # capture re-runs the block on the same input: the first call is the one
            x = args[0].detach().float()
            into[name] = float((output.detach().float() - x).norm() / x.norm().clamp_min(1e-30))

    return hook


def _maps(record: BlockAttention) -> tuple[Tensor, Tensor]:
    """(p (B, N, M) attention maps, (B, N) bool: rows that have one)."""
    w = record.weights.abs().double()  # (B, N, M)
    total = w.sum(-1, keepdim=True)  # (B, N, 1)
    valid = total.squeeze(-1) > 0
    return w / total.clamp_min(1e-300), valid


def _query_distance(record: BlockAttention, max_queries: int) -> tuple[float, int]:
    p, valid = _maps(record)
    n = p.shape[1]
    index = torch.linspace(0, n - 1, min(n, max_queries)).round().long().unique()
    distances = []
    for b in range(p.shape[0]):
        rows = p[b, index][valid[b, index]]  # (Q, M)
        q = rows.shape[0]
        if q < 2:
            continue
        unit = rows / rows.norm(dim=-1, keepdim=True)  # (Q, M)
        cosine = unit @ unit.t()  # (Q, M) @ (M, Q) -> (Q, Q)
        off_diagonal = (1 - cosine).sum() - (1 - cosine.diagonal()).sum()
        distances.append(float(off_diagonal) / (q * (q - 1)))
    return _mean(distances), len(index)


def _entropy(record: BlockAttention) -> float:
    p, valid = _maps(record)
    reach = record.reach
    keys = (
        torch.full(p.shape[1:2], float(p.shape[2]), dtype=torch.float64) if reach is None else reach.sum(-1).double()
    )  # (N,) keys each query can reach
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))  # 0 log 0 = 0
    entropy = -plogp.sum(-1) / keys.clamp_min(2).log()  # (B, N)
    keep = valid & (keys > 1)
    return float(entropy[keep].mean()) if keep.any() else math.nan


def _offset(record: BlockAttention) -> tuple[float, float, float]:
    p, valid = _maps(record)
    strongest = p.argmax(-1)  # (B, N); the first of equal maxima
    delta = (record.key_coords[strongest] - record.query_coords).abs()  # (B, N, 3) - (N, 3)
    delta = delta[valid]  # (V, 3)
    if not len(delta):
        return (math.nan,) * 3
    return tuple(float(v) for v in delta.mean(0))  # type: ignore[return-value]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan
