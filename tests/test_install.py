"""The package as a user installs it: `pip install .` (not editable) finds its configs and runs its commands."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
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
    shipped = _run(
        [
            python,
            "-c",
            "from nonlocalnet.io import packaged_configs as p; "
            "print(sorted(f.relative_to(p()).as_posix() for f in p().rglob('*.yaml')))",
        ],
        tmp_path,
    ).stdout
    assert sorted(eval(shipped)) == sorted(
        f.relative_to(REPO / "configs").as_posix() for f in (REPO / "configs").rglob("*.yaml")
    )

    run = tmp_path / "run"
    run.mkdir()
    _run(
        [
            cli,
            "demo",
            "--out",
            "demo",
            "--iterations",
            "2",
            "--variants",
            "baseline",
            "dot_product",
            "--no-progress",
            "data.test_size=8",
            "data.train_size=32",
            "train.batch_size=8",
            "train.precise_bn_batches=1",
        ],
        run,
    )
    result = json.loads((run / "demo" / "results.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["baseline", "dot_product"]
    assert result["config"] == "synthetic/nl_c2d_tiny.yaml"
    # a checkout's config path works from the installed package too
    _run(
        [
            cli,
            "train",
            "--config",
            "configs/synthetic/c2d_tiny.yaml",
            "--no-progress",
            "output_dir=tiny",
            "train.iterations=1",
            "data.train_size=8",
            "data.test_size=4",
            "train.batch_size=4",
            "train.precise_bn_batches=1",
        ],
        run,
    )
    assert (run / "tiny" / "model_final.safetensors").is_file()
    done = _run(
        [
            cli,
            "detect-train",
            "--config",
            "tiny_shapes",
            "output_dir=det",
            "device=cpu",
            "train.max_iters_per_epoch=1",
            "train.epochs=1",
            "data.num_train=4",
            "data.num_val=2",
        ],
        run,
    )
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
    with pytest.raises(
        FileNotFoundError,
        match=r"'i3d_r50_32x2' is ambiguous: 2 shipped configs are called so "
        r"\(charades/i3d_r50_32x2.yaml, kinetics/i3d_r50_32x2.yaml\)",
    ):
        find_config("i3d_r50_32x2")  # kinetics/ and charades/
    with pytest.raises(
        FileNotFoundError,
        match=r"not found: 'tiny_shape' is no file, nor a shipped config "
        r"\(keypointrcnn_r101_fpn_nl_1x, maskrcnn_r50_fpn_nl_1x, tiny_figures, tiny_shapes\)$",
    ):
        find_config("tiny_shape", folder="coco")


def test_the_lowest_environment_pins_the_declared_lower_bounds():
    # CI tests requirements/torch-lowest.txt as the bottom of the range: it must be what pyproject.toml declares
    declared = dict(re.findall(r'"(torch|torchvision)>=([\d.]+)"', (REPO / "pyproject.toml").read_text()))
    pins = dict(
        re.findall(
            r"^(torch|torchvision)==([\d.]+)$", (REPO / "requirements" / "torch-lowest.txt").read_text(), flags=re.M
        )
    )
    assert declared == pins and set(pins) == {"torch", "torchvision"}


@functools.cache
def _noxfile():  # loaded once: each load registers the sessions with nox again
    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("noxfile", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_test_script_names_an_unknown_torch_choice():
    env = {**os.environ, "NONLOCALNET_TORCH": "oldest"}
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "test.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown NONLOCALNET_TORCH 'oldest': expected default, lowest or newest"


def test_the_newest_release_is_none_when_the_registry_does_not_answer(monkeypatch):
    # the newest environment then reuses the one it has, or stops saying so (noxfile.py's tests-newest)
    noxfile = _noxfile()
    for name, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_CONFIG_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(name, value)
    assert noxfile.newest_release("torchvision") is None


def test_an_environment_is_reinstalled_when_its_pins_or_python_change_only():
    noxfile = _noxfile()
    key = noxfile.requirements_key("test", ["torch==2.4.1"], "3.11")
    assert key == noxfile.requirements_key("test", ["torch==2.4.1"], "3.11")
    assert (
        len(
            {
                key,
                noxfile.requirements_key("test", ["torch==2.5.0"], "3.11"),
                noxfile.requirements_key("test", ["torch==2.4.1"], "3.12"),
                noxfile.requirements_key("test,bench", ["torch==2.4.1"], "3.11"),
                noxfile.requirements_key("test", ["torch==2.4.1"], "3.11", "torch 2.15.0"),
            }
        )
        == 5
    )


def test_the_lint_session_and_pre_commit_run_the_same_ruff():
    hook = re.search(r"ruff-pre-commit\n\s+rev: v([\d.]+)", (REPO / ".pre-commit-config.yaml").read_text())
    session = re.search(r'^RUFF = "ruff==([\d.]+)"', (REPO / "noxfile.py").read_text(), flags=re.M)
    assert hook and session and hook.group(1) == session.group(1)
