"""The project's environments and checks as nox sessions (``nox --list``).

Test environments, one per torch:
    tests          the torch this machine's pip installs for ``pip install -e .[test]``
    tests-lowest   the lowest torch / torchvision pyproject.toml declares (requirements/torch-lowest.txt), past any cap
                   in the machine's pip configuration
    tests-newest   the newest torch / torchvision the registry serves, past that cap, with the peers the comparison
                   and conversion tests run against: the ``bench`` extra, requirements/peers-no-deps.txt without their
                   dependencies, and torchcodec 0.N for torch 2.N
Sessions run in the ``tests`` environment: ``slow``, ``distributed``, ``demo``, ``gpu-dry-run``. Their own small
environments: ``lint`` (Ruff), ``docs`` (MkDocs).

Environments live outside the checkout (``$NONLOCALNET_CACHE/nox``, default ``~/.cache/nonlocalnet/nox``) so that a
fresh clone reuses those an earlier run built: the dependencies are installed only when what decides them changes
(a stamp file in the environment holds a hash of it), and the environment is pointed at the calling checkout with
an editable install without dependencies when it points elsewhere. A lock file per environment keeps two runs from
installing into, or re-pointing, the same environment at once. ``nox -s SESSION --reuse-venv=no`` builds one afresh.

Arguments after ``--`` go to pytest (the test sessions) or to the command (``demo``, ``gpu-dry-run``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
ENVDIR = Path(os.environ.get("NONLOCALNET_CACHE", Path.home() / ".cache" / "nonlocalnet")) / "nox"
RUFF = "ruff==0.17.6"  # the same release as .pre-commit-config.yaml's rev (tests/test_install.py checks)

nox.options.envdir = str(ENVDIR)
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]

QUICK = ("-m", "not slow")
# slow tests that build a peer's network with its own package (timm, PyTorchVideo, mmaction2): tests-newest runs them
PEER_SLOW_TESTS = ("tests/test_insert.py", "tests/test_swap.py", "tests/test_zoo_convert.py")


# ---------------------------------------------------------------------------------------------------------------------
# environments


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Holds the lock of environment ``name`` (installs, re-points and the runs in it wait for each other)."""
    ENVDIR.mkdir(parents=True, exist_ok=True)
    with open(ENVDIR / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def newest_release(package: str) -> str | None:
    """The newest release of ``package`` on the registry, past any cap in the pip configuration; None when the
    registry does not answer."""
    env = {**os.environ, "PIP_CONSTRAINT": os.devnull}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(rf"^{re.escape(package)} \(([^)]+)\)$", done.stdout, flags=re.M)
    return found.group(1) if found else None


def requirements_key(extras: str, pins: list[str], python: str, releases: str = "") -> str:
    """A hash of what decides an environment's installed dependencies: the Python version, pyproject.toml's
    requirements and the extras used, the pins, the peers installed without dependencies and (``releases``) the
    newest releases an unpinned install picks."""
    project = nox.project.load_toml(ROOT / "pyproject.toml")["project"]
    optional = project.get("optional-dependencies", {})
    decided = {
        "python": python,
        "requires-python": project.get("requires-python"),
        "dependencies": project["dependencies"],
        "extras": {extra: optional.get(extra) for extra in extras.split(",")},
        "pins": pins,
        "releases": releases,
        "peers": (ROOT / "requirements" / "peers-no-deps.txt").read_text() if "bench" in extras else None,
    }
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:16]


def _pins(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _python_version(venv: Path) -> str:
    """The Python version environment ``venv`` was created with ("none" before it exists)."""
    if not (venv / "pyvenv.cfg").is_file():
        return "none"
    config = (venv / "pyvenv.cfg").read_text()
    found = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+)", config, flags=re.M)
    return found.group(1) if found else "unknown"


def _install(session: nox.Session, kind: str) -> None:
    """Installs the dependencies of environment ``kind`` (default, lowest, newest) into the session's virtualenv
    unless its stamp says they are installed, then points its editable nonlocalnet at this checkout."""
    venv = Path(session.virtualenv.location)
    python = _python_version(venv)
    stamp = venv / ".nonlocalnet-requirements"
    extras, pins, releases = "test", [], ""
    if kind == "lowest":
        if tuple(map(int, python.split("."))) >= (3, 13):
            session.error(
                f"the lowest torch ({' '.join(_pins(ROOT / 'requirements' / 'torch-lowest.txt'))}) has "
                f"no wheels for Python {python}; run nox with Python 3.12 or older (PYTHON=python3.12 "
                "bash scripts/test.sh, or python3.12 -m nox)"
            )
        pins = _pins(ROOT / "requirements" / "torch-lowest.txt")
    elif kind == "newest":
        extras = "test,bench"
        vision = newest_release("torchvision")
        if vision is None:
            if stamp.is_file():
                session.log(f"the registry did not answer; reusing {venv}")
                _point_at_checkout(session, venv)
                return
            session.error(f"the registry did not answer and there is no newest environment yet in {ENVDIR}")
        # torchvision pinned, torch the newest it accepts (a torch released before its torchvision would make both
        # pins impossible); the key still changes with either release
        pins = [f"torchvision=={vision}"]
        releases = f"torch {newest_release('torch')}"
    key = requirements_key(extras, pins, python, releases)
    if stamp.is_file() and stamp.read_text().strip() == key:
        _point_at_checkout(session, venv)
        return
    session.log(f"installing nonlocalnet's dependencies into {venv}" + (f" with {', '.join(pins)}" if pins else ""))
    env = {"PYTHONWARNINGS": "ignore:Editable installation"}  # setuptools' note on every editable install
    if pins:  # the pins are the point of this environment: a cap in the machine's pip config does not apply to it
        (venv / "pins.txt").write_text("\n".join(pins) + "\n")
        env["PIP_CONSTRAINT"] = str(venv / "pins.txt")
    session.install("--upgrade", "pip", env=env)
    session.install("-e", f"{ROOT}[{extras}]", env=env)
    if "bench" in extras:  # peers whose declared dependencies the tests do not need (see the file)
        session.install("--no-deps", "-r", str(ROOT / "requirements" / "peers-no-deps.txt"), env=env)
        # torchcodec is built against one torch release: 0.N for 2.N (its own compatibility table)
        minor = session.run_install("python", "-c", "import torch; print(torch.__version__.split('.')[1])", silent=True)
        done = session.install("--no-deps", f"torchcodec==0.{str(minor).strip()}.*", env=env, success_codes=[0, 1])
        if done is False:
            session.log(f"no torchcodec 0.{str(minor).strip()} on the registry: the torchcodec tests skip")
    session.run_install("python", "-c", "import nonlocalnet, torch, torchvision.ops")  # loudly, if it did not work
    stamp.write_text(key + "\n")
    _mark_pointed(venv)
    session.log(
        session.run_install(
            "python",
            "-c",
            "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}')",
            silent=True,
        ).strip()
    )


def _pointed_key() -> str:
    return f"{ROOT}\n{hashlib.sha256((ROOT / 'pyproject.toml').read_bytes()).hexdigest()[:16]}\n"


def _mark_pointed(venv: Path) -> None:
    (venv / ".nonlocalnet-checkout").write_text(_pointed_key())


def _point_at_checkout(session: nox.Session, venv: Path) -> None:
    """A cached environment serves many checkouts: its editable nonlocalnet must be this one, installed from this
    pyproject.toml (entry points, package data); re-installed without dependencies if not."""
    pointed = venv / ".nonlocalnet-checkout"
    if pointed.is_file() and pointed.read_text() == _pointed_key():
        return
    session.run_install(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "-e",
        str(ROOT),
        env={"PYTHONWARNINGS": "ignore:Editable installation"},
        silent=True,
        external=True,
    )
    _mark_pointed(venv)


@contextlib.contextmanager
def _tests_env(session: nox.Session) -> Iterator[str]:
    """Yields the ``tests`` environment's interpreter, its dependencies installed (by ``nox -s tests
    --install-only`` where its stamp is missing or stale) and pointed at this checkout, holding its lock."""
    venv = ENVDIR / "tests"
    stamp = venv / ".nonlocalnet-requirements"
    if not (stamp.is_file() and stamp.read_text().strip() == requirements_key("test", [], _python_version(venv))):
        session.run(
            sys.executable,
            "-m",
            "nox",
            "--noxfile",
            str(ROOT / "noxfile.py"),
            "--envdir",
            str(ENVDIR),
            "-s",
            "tests",
            "--install-only",
            external=True,
        )
    with _locked("tests"):
        _point_at_checkout(session, venv)
        yield str(venv / "bin" / "python")


def _pytest_args(session: nox.Session, default: tuple[str, ...] = QUICK, workers: str | None = None) -> list[str]:
    """pytest's arguments: the session's marker ``default`` unless the arguments give one (-m), on ``workers``
    processes (NONLOCALNET_TEST_WORKERS, else 2)."""
    args = list(session.posargs)
    marked = any(arg.startswith("-m") for arg in args)
    workers = workers or os.environ.get("NONLOCALNET_TEST_WORKERS", "2")
    return ["-n", workers, *([] if marked else default), *args]


# ---------------------------------------------------------------------------------------------------------------------
# sessions


@nox.session
def tests(session: nox.Session) -> None:
    """The quick tests on the torch this machine's pip installs (arguments go to pytest: -m slow, -k, files)."""
    with _locked("tests"):
        _install(session, "default")
        session.run("python", "-m", "pytest", *_pytest_args(session))


@nox.session(name="tests-lowest")
def tests_lowest(session: nox.Session) -> None:
    """The quick tests on the lowest torch / torchvision declared (requirements/torch-lowest.txt)."""
    with _locked("tests-lowest"):
        _install(session, "lowest")
        session.run("python", "-m", "pytest", *_pytest_args(session))


@nox.session(name="tests-newest")
def tests_newest(session: nox.Session) -> None:
    """The quick tests on the newest torch / torchvision, with the peers (bench extra, mmaction2, torchcodec), then
    (without arguments) the slow tests that need a peer's package, which skip in every other environment."""
    with _locked("tests-newest"):
        _install(session, "newest")
        session.run("python", "-m", "pytest", *_pytest_args(session))
        if not session.posargs:
            session.run("python", "-m", "pytest", "-n", "2", "-m", "slow and not distributed", *PEER_SLOW_TESTS)


@nox.session(venv_backend="none")
def slow(session: nox.Session) -> None:
    """The slow tests that run beside others (export, compile, end-to-end training), in the tests environment."""
    with _tests_env(session) as python:
        session.run(python, "-m", "pytest", *_pytest_args(session, ("-m", "slow and not distributed")), external=True)


@nox.session(venv_backend="none")
def distributed(session: nox.Session) -> None:
    """The tests that start several processes, one worker at a time, in the tests environment.

    Two torchrun ranks beside another heavy test overload two cores."""
    with _tests_env(session) as python:
        session.run(python, "-m", "pytest", *_pytest_args(session, ("-m", "distributed"), workers="1"), external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The demo on the built-in data (``nonlocalnet demo --out outputs/demo``; arguments go to the command)."""
    with _tests_env(session) as python:
        session.run(
            python,
            "-m",
            "nonlocalnet.cli",
            "demo",
            "--out",
            str(ROOT / "outputs" / "demo"),
            *session.posargs,
            external=True,
        )


@nox.session(name="gpu-dry-run", venv_backend="none")
def gpu_dry_run(session: nox.Session) -> None:
    """benchmarks/gpu.sh's steps on the CPU at tiny sizes, no CUDA call (into a temporary folder unless --out)."""
    args = list(session.posargs) or ["--out", tempfile.mkdtemp(prefix="nonlocalnet-gpu-")]
    with _tests_env(session) as python:
        session.run(
            "bash",
            str(ROOT / "benchmarks" / "gpu.sh"),
            "--dry-run",
            *args,
            env={"NONLOCALNET_PYTHON": python},
            external=True,
        )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff's checks and its format check over the repository (the rules in pyproject.toml)."""
    with _locked("lint"):
        stamp = Path(session.virtualenv.location) / ".nonlocalnet-requirements"
        if not stamp.is_file() or stamp.read_text().strip() != RUFF:
            session.install(RUFF)
            stamp.write_text(RUFF + "\n")
        session.run("ruff", "check", str(ROOT), *session.posargs)
        session.run("ruff", "format", "--check", str(ROOT))


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built strictly (a broken link or a missing page is an error).

    The environment holds the ``docs`` extra's requirements alone: MkDocs reads the sources, it does not import
    nonlocalnet, so torch and the rest stay out of it."""
    extra = nox.project.load_toml(ROOT / "pyproject.toml")["project"].get("optional-dependencies", {}).get("docs")
    if not extra:
        session.error("pyproject.toml declares no docs extra ([project.optional-dependencies] docs = [...])")
    with _locked("docs"):
        stamp = Path(session.virtualenv.location) / ".nonlocalnet-requirements"
        key = hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:16]
        if not (stamp.is_file() and stamp.read_text().strip() == key):
            session.install(*extra)
            stamp.write_text(key + "\n")
        session.run(
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            tempfile.mkdtemp(prefix="nonlocalnet-site-"),
        )
