"""One config for all processes of a job (issue 31, item 8): under torchrun every process compares its config
with process 0's before training and refuses a difference, naming the keys."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, lrs: list[str], results) -> None:
    import torch.distributed as dist

    from nonlocalnet.engine.config import ConfigError, load_config
    from nonlocalnet.engine.distributed import check_same_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        check_same_config(load_config("configs/synthetic/nl_c2d_tiny.yaml", [f"train.lr={lrs[rank]}"]))
        results[rank] = "same"
    except ConfigError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("lrs", [["0.01", "0.5"], ["0.01", "0.01"]])
def test_processes_started_with_different_configs_refuse_naming_the_keys(lrs):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), lrs, results), nprocs=2)
    if lrs[0] == lrs[1]:
        assert dict(results) == {0: "same", 1: "same"}
        return
    expected = (
        "the processes of this job were started with different configs: train.lr (rank 0: 0.01, rank 1: "
        "0.5); start every process with the same config and overrides"
    )
    assert dict(results) == {0: expected, 1: expected}  # every process raises the same: the CLI says it once


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_gamma=-1", "train.lr_gamma must be greater than 0 and at most 1; got -1"),
        ("model.pretrained=/nonexistent/w.safetensors", "model.pretrained: no file at /nonexistent/w.safetensors"),
    ],
)
def test_a_user_error_every_process_meets_under_torchrun_is_printed_once(tmp_path, override, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "nonlocalnet.cli",
            "train",
            "--config",
            "configs/synthetic/nl_c2d_tiny.yaml",
            override,
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert lines == [f"nonlocalnet train: error: {message}"]
