"""Everything a GPU can tell about nonlocalnet, in one run of at most 8 minutes: ``bash benchmarks/gpu.sh``.

    bash benchmarks/gpu.sh                  # on one CUDA device: results in gpu-results/ (gpu.md + logs + JSON)
    bash benchmarks/gpu.sh --out DIR        # elsewhere
    bash benchmarks/gpu.sh --dry-run        # the same steps on the CPU at tiny sizes (CI runs this)

Steps, each a child process with its own time limit (the 8 minutes shared out; a step that runs out keeps the
table rows it printed):

1. ``tests``: the CUDA-marked tests (tests/test_cuda.py: each fast path against dense in float32 / float16 /
   bfloat16, the flash kernel reached under autocast, the kernel the profiler saw, mixed-precision training; nccl
   training on two processes where two devices exist, else skipped).
2. ``block``: benchmarks/block.py, time and peak memory (torch.cuda.max_memory_allocated) of each mode and path,
   the paper's shapes plus res3 of 128-frame clips at batch 8, in float32.
3. ``block_bf16``: the same under bfloat16 autocast (what ``train.amp: bf16`` runs; the precision policy of
   nonlocalnet/layers/pairwise.py decides each path's dtype).
4. ``peers``: benchmarks/compare's table: each peer against our block computing the same function.
5. ``models``: whole networks' training and inference clips/s, eager, channels-last, bfloat16 autocast and
   torch.compile.

``gpu.md`` gathers the device, the versions and every step's tables. ``--dry-run`` runs the same code on the CPU
with tiny shapes, one repeat and a tiny network, and makes no CUDA call.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file from any folder: import the repository's packages, as -m would
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ._common import ROOT, write_atomic

BUDGET_S = 8 * 60 - 15  # from gpu.sh's start (NONLOCALNET_GPU_STARTED), room left for the report
# name -> (share of the budget, what it measures)
STEPS = {
    "tests": (0.15, "CUDA-marked tests (tests/test_cuda.py)"),
    "block": (0.2, "the block's modes and paths, float32 (benchmarks/block.py)"),
    "block_bf16": (0.15, "the block's modes and paths under bfloat16 autocast (benchmarks/block.py)"),
    "peers": (0.2, "peers against our block (benchmarks/compare, table)"),
    "models": (0.3, "whole networks against the peers': eager, channels-last, bf16, compiled (benchmarks/compare)"),
}


def commands(dry_run: bool, out: Path) -> dict[str, list[str]]:
    """The command line of each step: the GPU's, or the same at tiny sizes on the CPU."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    # -v: a line per test as it ends (kept if the step is cut); -rfEsP: reasons, and the kernel line a test prints
    tests = [py, "-m", "pytest", "-v", "-rfEsP", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    block = [py, "-m", "benchmarks.block", "--device", device]
    block_bf16 = block + ["--autocast", "bf16", "--json", str(out / "block_bf16.json")]
    block += ["--json", str(out / "block.json")]
    peers = [
        py,
        "-m",
        "benchmarks.compare",
        "--device",
        device,
        "--sections",
        "table",
        "--json",
        str(out / "peers.json"),
    ]
    models = [
        py,
        "-m",
        "benchmarks.compare",
        "--device",
        device,
        "--sections",
        "models",
        "--model-variants",
        "contiguous",
        "channels_last",
        "bf16",
        "compile",
        "--case-timeout",
        "150",
        "--json",
        str(out / "models.json"),
    ]
    if dry_run:
        for command in (block, block_bf16):
            command += ["--quick", "--shapes", "tiny_res3", "--repeats", "1"]
        peers += ["--quick", "--shapes", "res3", "--repeats", "1"]
        models += ["--quick", "--pairs", "nl_c2d_tiny=pytorchvideo:c2d_r50", "--model-repeats", "1"]
    else:
        models += [
            "--batch",
            "8",
            "--clip",
            "8",
            "224",
            "224",
        ]
    return dict(tests=tests, block=block, block_bf16=block_bf16, peers=peers, models=models)


def run_step(name: str, command: list[str], limit_s: float, out: Path) -> dict:
    """Runs one step, its output into ``<name>.log`` as it comes; its status and time."""
    print(f"[gpu] {name}: {' '.join(command[1:])} (limit {limit_s:.0f} s)", flush=True)
    start = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        # its own session: at the limit the step and the children it measures in stop together
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            code = proc.wait(timeout=limit_s)
            status = "ok" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"stopped at its limit ({limit_s:.0f} s): the rows below are those it finished"
    seconds = time.perf_counter() - start
    print(f"[gpu] {name}: {status}, {seconds:.0f} s", flush=True)
    return dict(name=name, status=status, seconds=seconds, output=log.read_text(errors="replace"))


def device_line(dry_run: bool) -> str:
    if dry_run:
        return f"dry run on the CPU ({platform.machine()}, {torch.get_num_threads()} threads): tiny sizes, not figures"
    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
        f"{torch.cuda.device_count()} device(s); CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    )


def report(results: list[dict], dry_run: bool, total_s: float) -> str:
    """gpu.md: the device and versions, then each step's status and the lines of its output that are tables or
    the test summary."""
    lines = [
        f"# nonlocalnet on {'the CPU (dry run)' if dry_run else 'a GPU'}",
        "",
        f"- device: {device_line(dry_run)}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `bash benchmarks/gpu.sh{' --dry-run' if dry_run else ''}`, {total_s:.0f} s in all",
        "",
    ]
    for r in results:
        lines += [f"## {r['name']}: {STEPS[r['name']][1]}", "", f"{r['status']}, {r['seconds']:.0f} s", ""]
        kept = [
            line
            for line in r["output"].splitlines()
            if line.startswith(("|", "#", "torch ", "FAILED", "ERROR", "SKIPPED"))
            or any(k in line for k in (" passed", " skipped", " failed", " PASSED", " FAILED", " ERROR"))
        ]
        for line, previous in zip(kept, [""] + kept):
            if (line.startswith("|") != previous.startswith("|") or line.startswith("#")) and lines[-1]:
                lines.append("")  # markdown wants a blank line around tables and headings
            lines.append("#" + line if line.startswith("## ") else line)  # the step's tables under its heading
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--out", default=str(ROOT / "gpu-results"), help="folder for gpu.md, logs and JSON")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu.sh: error: torch sees no CUDA device here; use --dry-run to run the same steps on the CPU",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = float(os.environ.get("NONLOCALNET_GPU_STARTED", time.time()))
    results = []
    steps = {name: command for name, command in commands(args.dry_run, out).items() if name in args.steps}
    for i, (name, command) in enumerate(steps.items()):
        # what a step leaves unused goes to the next: each may run until only the later steps' shares are left
        later = sum(STEPS[n][0] for n in list(steps)[i + 1 :]) * BUDGET_S
        left = BUDGET_S - (time.time() - started)
        results.append(run_step(name, command, max(10.0, left - later), out))
    total = time.time() - started
    write_atomic(out / "gpu.md", report(results, args.dry_run, total))
    print(f"[gpu] {total:.0f} s in all; tables in {out / 'gpu.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
