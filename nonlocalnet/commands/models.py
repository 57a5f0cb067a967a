"""``nonlocalnet models [PATTERN]``: the registered model names with their parameters, clip and non-local blocks."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "pattern",
        nargs="?",
        default=None,
        help="a glob over the names and their aliases, e.g. 'nl*_r50*' (default: every model)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (as docs/models.md shows)")


def run(args: argparse.Namespace) -> int:
    from ..models.catalog import model_infos, models_markdown
    from ..models.registry import closest_names, list_aliases, list_models

    infos = model_infos(args.pattern)
    if not infos:
        close = closest_names(args.pattern, list_models() + list(list_aliases()))
        hint = f"; did you mean {', '.join(close)}?" if close else " (quote it so the shell does not expand it)"
        raise ValueError(f"no model matches {args.pattern!r}{hint}")
    if args.markdown:
        print(models_markdown(args.pattern))
        return 0
    rows = [("name", "parameters", "clip", "non-local blocks", "also")]
    rows += [
        (
            i.name,
            f"{i.parameters / 1e6:.2f}M",
            i.clip,
            "-" if i.nonlocal_mode is None else f"{i.placement} ({i.nonlocal_mode})",
            ", ".join(i.aliases) or "-",
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(
        f"{len(infos)} model(s); build one with nonlocalnet.models.create_model(NAME, num_classes=..., pretrained=PATH)"
    )
    return 0
