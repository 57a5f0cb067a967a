"""The documentation cannot rot: its code runs, its generated pages are current, the site builds, and no docstring
or comment of the package quotes a timing or a machine.

Code blocks of README.md and docs/*.md run page by page, in order, in one temporary folder per page:
- ```python blocks are executed in one namespace per page;
- ```bash blocks run line by line: ``nonlocalnet ...`` through the CLI (``python -m nonlocalnet.cli``),
  ``python ...`` with this interpreter; leading ``VAR=value`` words set the environment. Any other command is an
  error, so that a block that cannot run says why (below).
- ```text blocks are shown, never run.

An HTML comment on the line before a block changes that (the site does not show it):
- ``<!-- docs-test: skip (reason) -->``: never run (installs, downloads, runs of minutes);
- ``<!-- docs-test: slow -->``: run only in the slow test of the page;
- ``<!-- docs-test: needs NAME -->``: skipped with a reason while ``NAME`` (``nonlocalnet.x``, a dotted attribute,
  or ``command X``, a CLI command) does not exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.M | re.S
)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, m.start("code")) + 1, m["lang"], m["code"], (m["marker"] or "").strip())
        for m in FENCE.finditer(text)
        if m["lang"] in ("python", "bash")
    ]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing(need: str) -> str | None:
    """Why a ``needs`` marker's name does not exist here, or None where it does."""
    if need.startswith("command "):
        from nonlocalnet.cli import COMMANDS

        name = need.split(None, 1)[1]
        return None if name in COMMANDS else f"no command {name!r} yet"
    module, _, attribute = need.rpartition(".")
    try:
        found = importlib.import_module(module)
    except ImportError:
        return f"{module} is not importable"
    return None if hasattr(found, attribute) else f"{need} does not exist yet"


def _commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _run_bash(block: Block, cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    for command in _commands(block.code):
        words = shlex.split(command, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[:1] == ["nonlocalnet"]:
            argv = [sys.executable, "-m", "nonlocalnet.cli", *words[1:]]
        elif words[:1] == ["python"]:
            argv = [sys.executable, *words[1:]]
        else:
            pytest.fail(
                f"{block.where}: cannot run {command!r}; mark the block "
                "<!-- docs-test: skip (reason) --> or write it as ```text"
            )
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{block.where}: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def run_page(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool) -> int:
    """Runs a page's blocks in order (the slow ones only when ``slow``); returns how many ran."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in blocks_of(page):
        marker = block.marker
        if marker.startswith("skip"):
            assert re.fullmatch(r"skip \(.+\)", marker), f"{block.where}: a skip says why: skip (reason)"
            continue
        if marker.startswith("needs "):
            why = _missing(marker.split(None, 1)[1])
            if why:
                continue
        elif marker == "slow":
            if not slow:
                continue
        elif marker:
            pytest.fail(f"{block.where}: unknown docs-test marker {marker!r}")
        if block.lang == "python":
            code = "\n" * (block.line - 1) + block.code  # tracebacks give the page's own line numbers
            exec(compile(code, str(block.page), "exec"), namespace)  # noqa: S102 - our own documentation
        else:
            _run_bash(block, tmp_path)
        ran += 1
    return ran


def _has_slow_blocks(page: Path) -> bool:
    return any(b.marker == "slow" for b in blocks_of(page))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_blocks_of_each_page_run(page, tmp_path, monkeypatch):
    needs = [b.marker.split(None, 1)[1] for b in blocks_of(page) if b.marker.startswith("needs ")]
    run_page(page, tmp_path, monkeypatch, slow=False)
    missing = [why for why in map(_missing, needs) if why]
    if missing:
        pytest.skip(f"the page's other blocks ran; not yet here: {'; '.join(missing)}")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _has_slow_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_of_each_page_runs_slow_ones_included(page, tmp_path, monkeypatch):
    assert run_page(page, tmp_path, monkeypatch, slow=True) > 0


def test_a_block_that_cannot_run_is_refused_unless_marked(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```bash\nbash scripts/demo.sh\n```\n")
    with pytest.raises(pytest.fail.Exception, match="cannot run 'bash scripts/demo.sh'"):
        run_page(page, tmp_path, monkeypatch, slow=True)
    page.write_text(
        "<!-- docs-test: skip (runs for minutes) -->\n```bash\nbash scripts/demo.sh\n```\n"
        "```python\nx = 1\n```\n```text\nnot run\n```\n"
    )
    assert run_page(page, tmp_path, monkeypatch, slow=True) == 1


def test_a_failing_block_fails_the_page_naming_its_line(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```bash\npython -c 'import sys; sys.exit(3)'\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:4: python -c 'import sys; sys.exit\(3\)'"):
        run_page(page, tmp_path, monkeypatch, slow=False)


# --- generated pages ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cli.md", "benchmarks.md"])
def test_generated_page_is_what_the_generator_gives_now(name):
    gen = _gen_docs()
    assert (ROOT / "docs" / name).read_text() == gen.PAGES[name](), (
        f"docs/{name} is stale: run python scripts/gen_docs.py {name}"
    )


@pytest.mark.slow  # counts every registered model's multiply-adds on fake tensors
def test_the_zoo_page_is_what_the_generator_gives_now():
    assert (ROOT / "docs" / "zoo.md").read_text() == _gen_docs().render_zoo(), (
        "docs/zoo.md is stale: run python scripts/gen_docs.py zoo.md"
    )


def test_the_zoo_page_names_every_registered_model():
    from nonlocalnet.models import list_models

    names_table = (ROOT / "docs" / "zoo.md").read_text().split("\n## ")[0]  # the page's first table: every name
    listed = re.findall(r"^\| `([\w.]+)` \|", names_table, flags=re.M)
    assert listed == list_models()


def test_every_command_has_its_section_in_the_cli_reference():
    from nonlocalnet.cli import COMMANDS

    sections = re.findall(r"^## (\S+)$", (ROOT / "docs" / "cli.md").read_text(), flags=re.M)
    assert sections == list(COMMANDS)


def test_a_benchmark_json_renders_as_one_table_with_its_facts(tmp_path):
    gen = _gen_docs()
    (tmp_path / "block.json").write_text(
        '{"command": "python -m benchmarks.block", "machine": "x86_64, 2 CPUs", "torch": "2.14.1", '
        '"date": "2026-12-06", "rows": [{"shape": "res3", "path": "sdpa", "ms": 140.25, "mb": null}]}'
    )
    page = gen.render_benchmarks(tmp_path)
    block = page.split("## block", 1)[1].split("## compare", 1)[0]
    assert "`command: python -m benchmarks.block`; machine: x86_64, 2 CPUs; torch: 2.14.1; date: 2026-12-06" in block
    assert "| shape | path | ms | mb |\n|---|---|---|---|\n| res3 | sdpa | 140 | — |" in block
    assert "Not measured" not in block and "Not measured since the JSON format" in page.split("## compare", 1)[1]


# --- the site ----------------------------------------------------------------------------------------------------
def _mkdocs() -> str | None:
    local = Path(sys.executable).with_name("mkdocs")
    return str(local) if local.exists() else shutil.which("mkdocs")


@pytest.mark.skipif(_mkdocs() is None, reason="mkdocs is not installed (pip install '.[docs]')")
def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run(
        [_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "conventions" / "index.html").is_file()


def test_every_page_of_the_docs_is_in_the_sites_nav():
    yaml = pytest.importorskip("yaml")

    def entries(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (entries(value) if isinstance(value, list) else [value])

    nav = set(entries(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == nav, f"in docs/ but not in the nav: {sorted(pages - nav)}; in the nav only: {sorted(nav - pages)}"


def test_the_readme_is_a_portal():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert 150 <= len(lines) <= 250, len(lines)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b|\b\d+ min \d+ s\b", "\n".join(lines)), "dates or CI timings"


# --- docstrings and comments -------------------------------------------------------------------------------------
# what a timing, a machine or a dated run looks like in prose
PROVENANCE = re.compile(
    r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us)\b"  # durations
    r"|\b\d+(?:\.\d+)?\s?(?:GFLOP/s|TFLOP/s|clips/s|items/s|it/s)"  # rates
    r"|\b\d+(?:\.\d+)?(?:x|×|%) (?:faster|slower)\b"  # speed-ups
    r"|\bmeasured (?:here|on|at)\b"  # "measured here, ..."
    r"|\b(?:H100|H200|A100|V100|EPYC|Xeon|AVX-?512|AVX2)\b"  # machines and instruction sets
    r"|\b20[2-3]\d-\d\d-\d\d\b"  # dates
)


def _prose_of(source: str) -> list[tuple[int, str]]:
    """The docstrings and comments of a Python source, with their line numbers."""
    import ast
    import io
    import tokenize

    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


def test_the_pattern_finds_timings_machines_and_dates():
    hits = [
        "6 against 14 ms here",
        "measured here, PyAV 18.1",
        "on an H200",
        "AVX-512 kernels",
        "since 2026-12-02",
        "89 GFLOP/s",
        "11.7 against 16.0 ms",
        "4-6x faster forward",
        "1.5× slower",
    ]
    assert all(PROVENANCE.search(text) for text in hits)
    reasons = [
        "a chunk of 256 MB",
        "torch 2.4's compile tracer refuses it",
        "max-pool with kernel 2",
        "O(N·C'²) memory",
        "mean time left",
    ]
    assert not any(PROVENANCE.search(text) for text in reasons)


def test_no_docstring_or_comment_of_the_package_quotes_a_timing_or_a_machine():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {PROVENANCE.search(text)[0]!r}"
        for path in sorted((ROOT / "nonlocalnet").rglob("*.py"))
        for line, text in _prose_of(path.read_text())
        if PROVENANCE.search(text)
    ]
    assert not offenders, "figures belong on the benchmark pages, provenance in commits:\n" + "\n".join(offenders)
