"""Measuring helpers shared by the benchmarks: peak resident memory, round-robin timing, formatting, child
processes.

Peak memory on CPU is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over one forward+backward. glibc keeps freed blocks below its (growing) mmap threshold resident in the heap,
which hides later allocations from the resident set; :data:`MALLOC_ENV` (for a child process) or
:func:`track_allocations_exactly` (in the running process) maps every tensor fresh and returns it on free, so
the resident set follows the live tensors.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from nonlocalnet.io import write_text_atomic as write_atomic  # noqa: F401  (the scripts' writer)
from nonlocalnet.models.flops import executed_flops as count_flops  # noqa: F401  (the scripts' flop count)

# for a child process that measures memory: every allocation above 16 KiB is its own mapping, freed on free
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Resets the peak resident set (VmHWM) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def track_allocations_exactly() -> None:
    """From now on, every allocation above 16 KiB is mapped fresh and unmapped on free (as :data:`MALLOC_ENV`),
    and the freed memory the heap still holds is given back, so that the resident set follows live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 16384)
    libc.mallopt(_M_TRIM_THRESHOLD, 0)
    libc.malloc_trim(0)


def peak_rss_rise_mb(fn: Callable[[], object]) -> float:
    """Runs ``fn`` and returns how far the resident set rose above its level before the call, in MB."""
    before = status_kb("VmRSS")
    reset_peak_rss()
    fn()
    return max(0.0, (status_kb("VmHWM") - before) / 1024)


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory ``fn`` adds, in MB: torch.cuda's peak allocation on CUDA, the resident set's rise on CPU
    (with :func:`track_allocations_exactly` in force, so that memory freed before the call is given back)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    track_allocations_exactly()
    return peak_rss_rise_mb(fn)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(
    steps: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: bool = True
) -> dict[str, float]:
    """Median seconds of each step, the steps interleaved round-robin so that machine drift hits them alike."""
    if warmup:
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(n: int = 2048, seconds: float = 1.0, device: str = "cpu") -> float:
    """Achieved GFLOP/s of a plain (n x n) @ (n x n) float32 matrix multiply: the practical limit."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed / 1e9


def fmt(value: float | None, suffix: str = "", digits: int = 2) -> str:
    """A table cell: — for missing, fixed digits below 100, integers above."""
    if value is None:
        return "—"
    return f"{value:.{digits}f}{suffix}" if abs(value) < 100 else f"{value:.0f}{suffix}"


# ---- fresh child processes -------------------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository: a child imports ``benchmarks`` from here


def run_child(target: str, spec: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``target`` ("package.module:function") on ``spec`` in a fresh Python process, so that one
    measurement's allocations cannot hide another's and a crash or an out-of-memory kill is reported instead of
    ending the benchmark. Returns the function's result, or ``status`` saying why there is none (killed, timed
    out, raised) with the ``POINT`` lines the child printed before (``partial``)."""
    module, function = target.split(":")
    code = (
        f"import json, sys; from {module} import {function} as f; "
        "print('RESULT ' + json.dumps(f(json.loads(sys.argv[1]))))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=dict(os.environ, **(env or {})),
        )
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return dict(status=f"failed: timed out after {timeout:g} s", partial=_points(stdout))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = tail[-1][:160] if tail else f"exit code {proc.returncode}"
    return dict(status=f"failed: {reason}", partial=_points(proc.stdout))


def print_point(point: dict[str, Any]) -> None:
    """One measurement a child reports as it goes (kept by :func:`run_child` if the child dies later)."""
    print("POINT " + json.dumps(point), flush=True)


def _points(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("POINT ")]


def provenance(module: str, argv: list[str] | None, device: str = "cpu") -> dict[str, str]:
    """What a benchmark's JSON records beside its rows, for the docs' benchmark page (scripts/gen_docs.py): the
    command that reproduces it, the machine, the torch version and the date (UTC)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return dict(
        command=" ".join(["python", "-m", module, *args]),
        machine=machine(device),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
    )


def machine(device: str = "cpu") -> str:
    """The machine the numbers come from, for the tables' titles."""
    where = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
        if device == "cpu"
        else torch.cuda.get_device_name(torch.device(device))
    )
    return f"torch {torch.__version__}, {where}"
