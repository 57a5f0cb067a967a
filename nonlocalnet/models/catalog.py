"""The registered models as data a person reads: one :class:`ModelInfo` per name (parameters, default clip, where
the non-local blocks sit), rendered as a Markdown table by :func:`models_markdown` and printed by
``nonlocalnet models``. Everything here is read from the registry, so a table made from it lists exactly the names
that :func:`~nonlocalnet.models.create_model` builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .registry import get_model_entry, list_aliases, list_models


@dataclass(frozen=True)
class ModelInfo:
    """What one registered name builds.

    Attributes:
        name: the registered name.
        aliases: other names that build it (``nl_i3d_r50_32x2`` for ``nl_i3d_r50``).
        summary: the registry's one line.
        parameters: learnable parameters at the registered defaults (400 classes; the tiny networks' 2).
        clip: the default clip layout ("32x2", "8x8", "128x1", ...).
        nonlocal_locations: stage -> indices of the residual blocks a non-local block follows; empty for none.
        nonlocal_mode: the blocks' pairwise function, or None without blocks.
    """

    name: str
    aliases: tuple[str, ...]
    summary: str
    parameters: int
    clip: str
    nonlocal_locations: Mapping[str, tuple[int, ...]]
    nonlocal_mode: str | None

    @property
    def placement(self) -> str:
        """The non-local placement in one line: ``res3: 1, 3; res4: 1, 3, 5`` (``-`` for none)."""
        if not self.nonlocal_locations:
            return "-"
        return "; ".join(f"{stage}: {', '.join(map(str, blocks))}" for stage, blocks in self.nonlocal_locations.items())


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered name (or alias); the model is built on the meta device (no memory)."""
    entry = get_model_entry(name)
    with torch.device("meta"):
        model = entry.builder()
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ == "NonLocalBlock"}
    locations: Any = getattr(model, "nonlocal_locations", {}) or {}
    aliases = tuple(a for a, target in list_aliases().items() if target == entry.name)
    return ModelInfo(
        entry.name,
        aliases,
        entry.summary,
        sum(p.numel() for p in model.parameters()),
        getattr(model, "clip_name", None) or "-",
        {stage: tuple(i) for stage, i in locations.items()},
        next(iter(blocks.values())).mode if blocks else None,
    )


def model_infos(pattern: str | None = None) -> list[ModelInfo]:
    """The :class:`ModelInfo` of every registered name matching a glob (``"nl*_r50*"``), matched against the
    names and their aliases; sorted by name."""
    names = set(list_models(pattern))
    names |= set(list_aliases(pattern).values())
    return [model_info(name) for name in sorted(names)]


def models_markdown(pattern: str | None = None) -> str:
    """A Markdown table of the registered models (name, aliases, clip, non-local blocks, parameters, summary)."""
    rows = ["| name | also | clip | non-local blocks | parameters | what |", "|---|---|---|---|---|---|"]
    for info in model_infos(pattern):
        also = ", ".join(f"`{a}`" for a in info.aliases) or "-"
        blocks = "-" if info.nonlocal_mode is None else f"{info.placement} ({info.nonlocal_mode})"
        rows.append(f"| `{info.name}` | {also} | {info.clip} | {blocks} | {info.parameters:,} | {info.summary} |")
    return "\n".join(rows)
