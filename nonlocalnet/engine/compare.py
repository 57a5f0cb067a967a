"""The main job: a miniature of the paper's Table 2(a) on the built-in long-range data.

A C2D baseline and the same network with one non-local block of each instantiation are trained with the same
recipe and seed, tested on the same held-out clips and compared: top-1, parameters, multiply-adds and training
time, plus how often each block's strongest attention from one shape lands on the other shape.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import write_text_atomic
from ..layers import MODES
from .config import load_config

VARIANTS = ("baseline",) + tuple(MODES)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "nl_c2d_tiny.yaml"


def variant_config(config: str | os.PathLike | None, variant: str, out: Path, overrides: Sequence[str] = ()):
    """The run config of one variant: the NL config with the variant's mode, or without NL for the baseline."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    items = [f"output_dir={out / variant}"]
    if variant == "baseline":
        # the same network without its blocks
        items += ["model.options.nonlocal_locations=null"]
    else:
        items += [f"model.options.nonlocal_options.mode={variant}"]
    cfg = load_config(config or DEFAULT_CONFIG, list(overrides) + items)
    if variant == "baseline":
        from ..models import list_models

        plain = re.sub(r"^nl\d*_", "", cfg["model"]["name"])  # nl_c2d_tiny -> c2d_tiny, nl1_c2d_r50 -> c2d_r50
        if plain in list_models():
            cfg["model"]["name"] = plain
    return cfg


def run_comparison(out: str | os.PathLike, *, config: str | os.PathLike | None = None,
                   variants: Sequence[str] = VARIANTS, overrides: Sequence[str] = (), attention_clips: int = 256,
                   pictures: bool = True, echo=print) -> dict[str, Any]:
    """Trains and tests every variant; writes ``results.md``, ``results.json`` and attention pictures to ``out``.

    Returns:
        {"rows": [...], "markdown": str, "seconds": float, ...}.
    """
    from ..data import build_dataset
    from ..models.flops import count_cost
    from ..viz import attention_hits, render_object_attention
    from .trainer import build_model, train
    from safetensors.torch import load_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rows = []
    for variant in variants:
        cfg = variant_config(config, variant, out, overrides)
        echo(f"[compare] {variant}: training {cfg['model']['name']} for {cfg['train']['iterations']} iterations "
             f"(seed {cfg['seed']})")
        report = train(cfg)
        model = build_model(cfg)
        model.load_state_dict(load_file(os.fspath(Path(cfg["output_dir"]) / "model_final.safetensors")))
        model.eval()
        data = cfg["data"]
        cost = count_cost(model, (1, 3, data["frames"], data["image_size"], data["image_size"]))
        row = {"variant": variant, "mode": None if variant == "baseline" else variant,
               "top1": report["top1"], "videos": report["videos"], "params": cost.params, "macs": cost.macs,
               "train_seconds": report["train_seconds"], "mean_class_accuracy": report["mean_class_accuracy"]}
        if variant != "baseline" and data["type"] == "synthetic":
            test_set = build_dataset(data, "test", cfg["seed"])
            items = [test_set[i] for i in range(min(attention_clips, len(test_set)))]
            clips = torch.stack([it["clip"] for it in items])
            objects = torch.stack([it["objects"] for it in items])
            hits = attention_hits(model, clips, objects)
            row.update(attention_hit_rate=hits.rate, attention_chance_rate=hits.chance_rate,
                       attention_block=hits.block)
            if pictures:
                picture = out / f"attention_{variant}.png"
                render_object_attention(model, items[0]["clip"], items[0]["objects"], picture,
                                        title=f"{variant}: label {int(items[0]['label'])}")
                row["picture"] = picture.name
        rows.append(row)
        echo(f"[compare] {variant}: top-1 {100 * row['top1']:.1f}% in {row['train_seconds']:.0f} s")
    seconds = time.perf_counter() - began
    markdown = results_markdown(rows, cfg)
    result = {"rows": rows, "markdown": markdown, "seconds": seconds, "seed": cfg["seed"],
              "iterations": cfg["train"]["iterations"], "threads": torch.get_num_threads(),
              "config": os.fspath(config or DEFAULT_CONFIG), "overrides": list(overrides)}
    write_text_atomic(out / "results.md", markdown + "\n")
    write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    return result


def results_markdown(rows: Sequence[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """The comparison table (markdown)."""
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    lines = ["| model | top-1 (%) | vs baseline | params | multiply-adds | train time (s) | top key on other shape |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "C2D baseline" if r["variant"] == "baseline" else f"C2D + NL {r['variant'].replace('_', ' ')}"
        gap = "" if base is None or r is base else f"{100 * (r['top1'] - base['top1']):+.1f}"
        hit = "" if "attention_hit_rate" not in r else \
            f"{100 * r['attention_hit_rate']:.0f}% (chance {100 * r['attention_chance_rate']:.0f}%)"
        lines.append(f"| {name} | {100 * r['top1']:.1f} | {gap} | {r['params']:,} | {r['macs'] / 1e6:.1f} M | "
                     f"{r['train_seconds']:.0f} | {hit} |")
    data = cfg["data"]
    lines.append("")
    lines.append(f"Built-in long-range data ({data['num_classes']} classes, {data['frames']}x{data['image_size']}"
                 f"x{data['image_size']} clips, {data['test_size']} test clips), {cfg['train']['iterations']} "
                 f"iterations of batch {cfg['train']['batch_size']}, seed {cfg['seed']}; chance is "
                 f"{100 / data['num_classes']:.0f}%.")
    return "\n".join(lines)

