"""The package as a user installs it: `pip install .` (not editable) finds its configs and runs its commands."""
from __future__ import annotations

import json
import re
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_real_install_finds_its_configs_and_runs_the_demo_and_detection(tmp_path):
    # a copy of what the wheel is built from, so nothing of the checkout is importable from the run folder
    source = tmp_path / "source"
    shutil.copytree(REPO / "nonlocalnet", source / "nonlocalnet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    python, cli = venv / "bin" / "python", venv / "bin" / "nonlocalnet"
    # the new environment sees this one's dependencies (torch, ...) as plain paths: no .pth of this one runs,
    # so this one's editable nonlocalnet stays out of it
    paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(purelib.stdout.strip()) / "dependencies.pth").write_text("\n".join(paths) + "\n")
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", source], tmp_path)

    where = _run([python, "-c", "import nonlocalnet, sys; print(nonlocalnet.__file__)"], tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv), where
    shipped = _run([python, "-c", "from nonlocalnet.io import packaged_configs as p; "
                                  "print(sorted(f.relative_to(p()).as_posix() for f in p().rglob('*.yaml')))"],
                   tmp_path).stdout
    assert sorted(eval(shipped)) == sorted(f.relative_to(REPO / "configs").as_posix()
                                           for f in (REPO / "configs").rglob("*.yaml"))

    run = tmp_path / "run"
    run.mkdir()
    _run([cli, "demo", "--out", "demo", "--iterations", "2", "--variants", "baseline", "dot_product",
          "--no-progress", "data.test_size=8", "data.train_size=32", "train.batch_size=8",
          "train.precise_bn_batches=1"], run)
    result = json.loads((run / "demo" / "results.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["baseline", "dot_product"]
    assert result["config"] == "synthetic/nl_c2d_tiny.yaml"
    # a checkout's config path works from the installed package too
    _run([cli, "train", "--config", "configs/synthetic/c2d_tiny.yaml", "--no-progress", "output_dir=tiny",
          "train.iterations=1", "data.train_size=8", "data.test_size=4", "train.batch_size=4",
          "train.precise_bn_batches=1"], run)
    assert (run / "tiny" / "model_final.safetensors").is_file()
    done = _run([cli, "detect-train", "--config", "tiny_shapes", "output_dir=det", "device=cpu",
                 "train.max_iters_per_epoch=1", "train.epochs=1", "data.num_train=4", "data.num_val=2"], run)
    assert (run / "det" / "model_final.safetensors").is_file(), done.stdout[-2000:]


def test_shipped_configs_are_found_by_checkout_path_relative_path_or_stem(tmp_path, monkeypatch):
    from nonlocalnet.io import find_config, packaged_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here
    expected = packaged_configs() / "synthetic" / "c2d_tiny.yaml"
    assert expected.is_file()
    for name in ("configs/synthetic/c2d_tiny.yaml", "synthetic/c2d_tiny.yaml", "synthetic/c2d_tiny", "c2d_tiny"):
        assert find_config(name) == expected, name
    assert find_config("tiny_shapes", folder="coco") == packaged_configs() / "coco" / "tiny_shapes.yaml"
    own = tmp_path / "c2d_tiny.yaml"  # a file of the user's wins over a shipped one of the same name
    own.write_text("seed: 3\n")
    assert find_config("c2d_tiny.yaml").resolve() == own
    with pytest.raises(FileNotFoundError, match=r"'i3d_r50_32x2' is ambiguous: 2 shipped configs are called so "
                                                r"\(charades/i3d_r50_32x2.yaml, kinetics/i3d_r50_32x2.yaml\)"):
        find_config("i3d_r50_32x2")  # kinetics/ and charades/
    with pytest.raises(FileNotFoundError, match=r"not found: 'tiny_shape' is no file, nor a shipped config "
                                                r"\(keypointrcnn_r101_fpn_nl_1x, maskrcnn_r50_fpn_nl_1x, tiny_figures, tiny_shapes\)$"):
        find_config("tiny_shape", folder="coco")


def test_the_lowest_environment_pins_the_declared_lower_bounds():
    # CI tests requirements/torch-lowest.txt as the bottom of the range: it must be what pyproject.toml declares
    declared = dict(re.findall(r'"(torch|torchvision)>=([\d.]+)"', (REPO / "pyproject.toml").read_text()))
    pins = dict(re.findall(r"^(torch|torchvision)==([\d.]+)$", (REPO / "requirements" / "torch-lowest.txt").read_text(),
                           flags=re.M))
    assert declared == pins and set(pins) == {"torch", "torchvision"}


def test_setup_says_what_is_wrong_when_the_registry_does_not_answer(tmp_path):
    # a Python whose pip cannot reach the registry: no newest environment can be resolved, and none is cached
    fake = tmp_path / "python3"
    fake.write_text("#!/usr/bin/env bash\n"
                    'if [ "$1 $2 $3" = "-m pip index" ]; then echo "ERROR: network unreachable" >&2; exit 1; fi\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "NONLOCALNET_ENVS": str(tmp_path / "envs")}
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "newest"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: the registry did not answer and there is no newest environment yet in {tmp_path / 'envs'}")
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "oldest"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown environment 'oldest'" in done.stderr
