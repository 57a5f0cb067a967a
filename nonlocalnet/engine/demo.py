"""The demo: a miniature of the paper's Table 2(a) on the built-in long-range data.

A C2D baseline and the same network with one non-local block of each instantiation are trained with the same
recipe and seed, tested on the same held-out clips and compared: top-1, parameters, multiply-adds and training
time, plus how often each block's strongest attention from one shape lands on the other shape.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..io import write_text_atomic
from ..layers import MODES
from .config import load_config

VARIANTS = ("baseline",) + tuple(MODES)
DEFAULT_CONFIG = "synthetic/nl_c2d_tiny.yaml"  # shipped in the package (nonlocalnet.io.find_config)


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


def default_jobs(variants: int, threads: int = 1) -> int:
    """As many processes of ``threads`` threads as the cores this process may run on hold, at most one per network."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(variants, cores // threads))


def run_demo(
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    variants: Sequence[str] = VARIANTS,
    overrides: Sequence[str] = (),
    attention_clips: int = 256,
    pictures: bool = True,
    jobs: int | None = None,
    threads: int = 1,
    echo=print,
) -> dict[str, Any]:
    """Trains and tests every variant; writes ``results.md``, ``results.json`` and attention pictures to ``out``.

    The networks train as ``jobs`` parallel processes of ``threads`` torch threads each (default: one
    single-thread process per core). A network's results depend on the seed, its thread count and the torch
    build, not on ``jobs``: one process per core is faster than one network at a time on every core (the tiny
    networks' operations are too small to split across threads) and does not stall when another program holds
    a core, as threads waiting on each other at every operation do.

    Returns:
        {"rows": [...], "markdown": str, "seconds": float, ...}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    variants = list(variants)
    jobs = default_jobs(len(variants), max(1, threads)) if jobs is None else jobs
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be positive; got jobs={jobs}, threads={threads}")
    jobs = min(jobs, len(variants))
    cfg = variant_config(config, variants[-1], out, overrides)
    _clear_previous_runs(out, variants, echo)
    echo(
        f"[demo] training {len(variants)} networks for {cfg['train']['iterations']} iterations "
        f"(seed {cfg['seed']}), {jobs} at a time, {threads} thread(s) each"
    )
    began = time.perf_counter()
    task = dict(config=config, out=out, overrides=list(overrides), attention_clips=attention_clips, pictures=pictures)
    if jobs == 1:
        rows = []
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for variant in variants:
                rows.append(run_variant(variant, **task))
                _report_row(rows[-1], echo)
        finally:
            torch.set_num_threads(previous)
    else:
        rows = _run_in_processes(variants, task, jobs, threads, cfg, echo)
    seconds = time.perf_counter() - began
    markdown = results_markdown(rows, cfg)
    result = {
        "rows": rows,
        "markdown": markdown,
        "seconds": seconds,
        "seed": cfg["seed"],
        "iterations": cfg["train"]["iterations"],
        "threads": threads,
        "jobs": jobs,
        "torch": torch.__version__,
        "config": os.fspath(config or DEFAULT_CONFIG),
        "overrides": list(overrides),
    }
    write_text_atomic(out / "results.md", markdown + "\n")
    write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    return result


def _clear_previous_runs(out: Path, variants: Sequence[str], echo) -> None:
    """The demo owns its networks' run directories: a rerun replaces them (saying so), the table with them.

    (``nonlocalnet train`` itself never reuses a directory; the demo's runs are reproducible from the seed.)
    """
    import shutil

    from .rundir import RUN_FILES

    for variant in variants:
        run = out / variant
        if run.is_dir() and any((run / name).exists() for name in (*RUN_FILES, "config.yaml")):
            echo(f"[demo] replacing the previous demo's run in {run}")
            shutil.rmtree(run)


def run_variant(
    variant: str,
    *,
    config: str | os.PathLike | None,
    out: Path,
    overrides: Sequence[str],
    attention_clips: int,
    pictures: bool,
    on_iteration=None,
) -> dict[str, Any]:
    """Trains and tests one network of the comparison; its row of the table."""
    from safetensors.torch import load_file

    from ..data import build_dataset
    from ..models.flops import count_cost
    from ..viz import attention_hits, render_object_attention
    from .trainer import build_model, train

    cfg = variant_config(config, variant, out, overrides)
    report = train(cfg, on_iteration=on_iteration, log_lines=False)  # the demo shows each network's progress
    model = build_model(cfg)
    model.load_state_dict(load_file(os.fspath(Path(cfg["output_dir"]) / "model_final.safetensors")))
    model.eval()
    data = cfg["data"]
    cost = count_cost(model, (1, 3, data["frames"], data["image_size"], data["image_size"]))
    row = {
        "variant": variant,
        "mode": None if variant == "baseline" else variant,
        "model": cfg["model"]["name"],
        "top1": report["top1"],
        "videos": report["videos"],
        "params": cost.params,
        "macs": cost.macs,
        "train_seconds": report["train_seconds"],
        "mean_class_accuracy": report["mean_class_accuracy"],
    }
    if variant != "baseline" and data["type"] == "synthetic":
        test_set = build_dataset(data, "test", cfg["seed"])
        items = [test_set[i] for i in range(min(attention_clips, len(test_set)))]
        clips = torch.stack([it["clip"] for it in items])
        objects = torch.stack([it["objects"] for it in items])
        hits = attention_hits(model, clips, objects)
        row.update(attention_hit_rate=hits.rate, attention_chance_rate=hits.chance_rate, attention_block=hits.block)
        if pictures:
            picture = out / f"attention_{variant}.png"
            render_object_attention(
                model,
                items[0]["clip"],
                items[0]["objects"],
                picture,
                title=f"{variant}: label {int(items[0]['label'])}",
            )
            row["picture"] = picture.name
    return row


def _report_row(row: dict[str, Any], echo) -> None:
    echo(f"[demo] {row['variant']}: top-1 {100 * row['top1']:.1f}% in {row['train_seconds']:.0f} s of training")


# --- one process per network ----------------------------------------------------------------------------------

_progress = None  # in a worker process: the queue its training progress goes to


def _start_worker(threads: int, progress) -> None:
    global _progress
    torch.set_num_threads(threads)
    _progress = progress


def _worker(variant: str, task: dict[str, Any]) -> dict[str, Any]:
    def on_iteration(iteration: int) -> None:
        if iteration % 10 == 0:
            _progress.put((variant, iteration))

    return run_variant(variant, **task, on_iteration=on_iteration)


def _run_in_processes(
    variants: list[str], task: dict[str, Any], jobs: int, threads: int, cfg: dict[str, Any], echo
) -> list[dict[str, Any]]:
    """Runs :func:`run_variant` for each variant in ``jobs`` fresh processes; the rows in ``variants`` order."""
    import multiprocessing
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    progress = context.Queue()
    iterations = cfg["train"]["iterations"]
    bars = {
        v: tqdm(
            total=iterations,
            desc=f"{v:<17}",
            unit="it",
            position=i,
            leave=False,
            dynamic_ncols=True,
            disable=not cfg["progress"],
        )
        for i, v in enumerate(variants)
    }
    rows: dict[str, dict[str, Any]] = {}
    started: set[str] = set()
    try:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(threads, progress)
        ) as pool:
            quiet = {**task, "overrides": [*task["overrides"], "progress=false"]}  # the bars are drawn here
            pending = {pool.submit(_worker, v, quiet): v for v in variants}
            try:
                while pending:
                    done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    while True:
                        try:
                            variant, iteration = progress.get_nowait()
                        except queues.Empty:
                            break
                        if variant not in started:  # the bar's clock starts with the network, not the job
                            started.add(variant)
                            bars[variant].reset(total=iterations)
                        bars[variant].update(iteration - bars[variant].n)
                    for future in done:
                        variant = pending.pop(future)
                        rows[variant] = future.result()  # a failed network stops the comparison with its error
                        bars[variant].update(iterations - bars[variant].n)
                        bars[variant].close()
                        _report_row(rows[variant], tqdm.write if cfg["progress"] else echo)
            except BaseException:
                # stop the other networks now rather than after they finish training
                for future in pending:
                    future.cancel()
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.terminate()
                raise
    finally:
        for bar in bars.values():
            bar.close()
        progress.close()
    return [rows[v] for v in variants]


def results_markdown(rows: Sequence[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """The comparison table (markdown)."""
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    lines = [
        "| model | top-1 (%) | vs baseline | params | multiply-adds | train time (s) | top key on other shape |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "C2D baseline" if r["variant"] == "baseline" else f"C2D + NL {r['variant'].replace('_', ' ')}"
        gap = "" if base is None or r is base else f"{100 * (r['top1'] - base['top1']):+.1f}"
        hit = (
            ""
            if "attention_hit_rate" not in r
            else f"{100 * r['attention_hit_rate']:.0f}% (chance {100 * r['attention_chance_rate']:.0f}%)"
        )
        lines.append(
            f"| {name} | {100 * r['top1']:.1f} | {gap} | {r['params']:,} | {r['macs'] / 1e6:.1f} M | "
            f"{r['train_seconds']:.0f} | {hit} |"
        )
    data = cfg["data"]
    lines.append("")
    lines.append(
        f"Built-in long-range data ({data['num_classes']} classes, {data['frames']}x{data['image_size']}"
        f"x{data['image_size']} clips, {data['test_size']} test clips), {cfg['train']['iterations']} "
        f"iterations of batch {cfg['train']['batch_size']}, seed {cfg['seed']}; chance is "
        f"{100 / data['num_classes']:.0f}%."
    )
    return "\n".join(lines)
