"""Attention pictures: captured weights equal the block's own, coordinates map back to input pixels, every mode
renders, and the visualize command runs end to end on a video file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nonlocalnet.layers import MODES, NonLocal2d, NonLocal3d
from nonlocalnet.viz import capture_attention, cell_centres, find_nonlocal_blocks, render_attention, resolve_block_names

from .helpers import write_video

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class StemAndBlock(nn.Module):
    """A strided stem (the network's stride) followed by a non-local block and a pooled score."""

    def __init__(self, mode="embedded_gaussian", stride=(2, 4, 4), subsample=(1, 2, 2), channels=6):
        super().__init__()
        self.stem = nn.Conv3d(3, channels, stride, stride=stride)
        self.block = NonLocal3d(channels, mode=mode, subsample=subsample)
        with torch.no_grad():  # an active block: random weights, BN statistics not at their defaults
            for p in self.block.parameters():
                p.normal_(0.0, 0.5)
            self.block.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, clip):
        return self.block(self.stem(clip)).mean(dim=(2, 3, 4))


@pytest.mark.parametrize("mode", MODES)
def test_captured_weights_equal_the_blocks_dense_attention(mode):
    model = StemAndBlock(mode).train()
    clip = torch.randn(2, 3, 8, 16, 16)
    captured = capture_attention(model, clip)
    assert list(captured) == ["block"]
    assert model.training and model.block.training  # train/eval flags restored
    assert not model.block._forward_hooks  # hooks removed
    model.eval()
    with torch.no_grad():
        _, expected = model.block(model.stem(clip), return_attention=True)
    got = captured["block"]
    torch.testing.assert_close(got.weights, expected)
    assert got.weights.shape == (2, 4 * 4 * 4, 4 * 2 * 2)
    assert got.mode == mode


def test_capture_leaves_the_model_output_and_statistics_unchanged():
    model = StemAndBlock().eval()
    clip = torch.randn(1, 3, 8, 16, 16)
    before = model(clip)
    stats = model.block.norm.running_var.clone()
    capture_attention(model, clip)
    torch.testing.assert_close(model(clip), before)
    torch.testing.assert_close(model.block.norm.running_var, stats)


def test_coordinates_map_subsampled_keys_back_to_input_pixels():
    # input 8x16x16, stride (2, 4, 4): queries on a 4x4x4 grid; keys max-pooled 1x2x2: a 4x2x2 grid of cells
    # spanning 2 frames x 8 x 8 pixels each.
    att = capture_attention(StemAndBlock(), torch.randn(1, 3, 8, 16, 16))["block"]
    assert att.query_grid == (4, 4, 4) and att.key_grid == (4, 2, 2)
    assert att.query_stride == (2.0, 4.0, 4.0) and att.key_stride == (2.0, 8.0, 8.0)
    assert att.input_size == (8, 16, 16)
    # query 0 covers frames 0-1, rows 0-3, columns 0-3: centre (0.5, 1.5, 1.5)
    assert att.query_coords[0].tolist() == [0.5, 1.5, 1.5]
    # query (t=2, y=3, x=1) = index 2*16 + 3*4 + 1 = 45: frames 4-5, rows 12-15, columns 4-7
    assert att.query_coords[45].tolist() == [4.5, 13.5, 5.5]
    # key (t=0, y=1, x=1) = index 3: rows and columns 8-15, centre 11.5; key 4 is the next frame pair
    assert att.key_coords[3].tolist() == [0.5, 11.5, 11.5]
    assert att.key_coords[4].tolist() == [2.5, 3.5, 3.5]
    assert att.query_index(5, 13, 6) == 45 and att.query_index(4, 12, 4) == 45
    assert att.key_index(5, 13, 6) == 2 * 4 + 1 * 2 + 0
    # every query pixel of a key cell max-pools into that key
    assert att.key_index(*att.query_coords[45].tolist()) == 2 * 4 + 1 * 2 + 0


def test_coordinates_with_floor_pooling_of_an_odd_grid():
    # 10 columns at stride 2 -> 5 query cells; keys pooled by 2 (floor) -> 2 cells covering columns 0-7
    model = StemAndBlock(stride=(1, 2, 2), subsample=(1, 1, 2))
    att = capture_attention(model, torch.randn(1, 3, 2, 4, 10))["block"]
    assert att.query_grid == (2, 2, 5) and att.key_grid == (2, 2, 2)
    assert att.key_coords[:2, 2].tolist() == [1.5, 5.5]
    assert att.weights.shape == (1, 20, 8)


def test_cell_centres_by_hand():
    centres = cell_centres((1, 2, 3), (1.0, 2.0, 4.0))
    assert centres.shape == (6, 3)
    assert centres[:, 2].tolist() == [1.5, 5.5, 9.5] * 2
    assert centres[:, 1].tolist() == [0.5] * 3 + [2.5] * 3


def test_capture_on_an_image_block_puts_queries_in_frame_zero():
    class Image(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 2, stride=2)
            self.nl = NonLocal2d(4, subsample=2)

        def forward(self, x):
            return self.nl(self.stem(x))

    att = capture_attention(Image(), torch.randn(1, 3, 8, 12))["nl"]
    assert att.query_grid == (1, 4, 6) and att.key_grid == (1, 2, 3)
    assert att.query_coords[:, 0].abs().max() == 0
    assert att.key_coords[0].tolist() == [0.0, 1.5, 1.5]


def test_capture_with_a_memory_input_keeps_memory_cells():
    class WithMemory(nn.Module):
        def __init__(self):
            super().__init__()
            self.nl = NonLocal3d(4, memory_channels=5)

        def forward(self, x):
            return self.nl(x, memory=torch.ones(1, 5, 3, 2, 2))

    att = capture_attention(WithMemory(), torch.randn(1, 4, 2, 2, 2))["nl"]
    assert att.from_memory and att.key_grid == (3, 2, 2) and att.key_stride == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="memory"):
        render_attention(torch.randn(4, 2, 2, 2), att, "unused.png")


def test_resnet_block_strides_follow_the_network():
    from nonlocalnet.models import ResNet3d

    model = ResNet3d((1, 1, 1, 1), clip="8x8", width=4, num_classes=3, nonlocal_locations={"res3": (0,), "res4": (0,)})
    captured = capture_attention(model, torch.randn(3, 8, 64, 64), blocks=["res3.0", "res4.nl0"])
    assert list(captured) == ["res3.nl0", "res4.nl0"]
    # 8x8 layout: time halves once (pool2); res3 has spatial stride 8, res4 16; keys pooled 1x2x2
    assert captured["res3.nl0"].query_stride == (2.0, 8.0, 8.0)
    assert captured["res4.nl0"].query_stride == (2.0, 16.0, 16.0)
    assert captured["res4.nl0"].key_stride == (2.0, 32.0, 32.0)
    assert resolve_block_names(model, "res4.0") == ["res4.nl0"]
    assert resolve_block_names(model, None) == ["res4.nl0"]
    assert resolve_block_names(model, "all") == ["res3.nl0", "res4.nl0"]
    with pytest.raises(ValueError, match="res3.nl0, res4.nl0"):
        capture_attention(model, torch.randn(3, 8, 64, 64), blocks="res4.3")


def test_capture_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="no NonLocalBlock"):
        capture_attention(nn.Conv3d(3, 3, 1), torch.randn(1, 3, 2, 4, 4))
    assert find_nonlocal_blocks(nn.Conv3d(3, 3, 1)) == {}


def test_top_pairs_are_the_largest_weights():
    att = capture_attention(StemAndBlock(), torch.randn(1, 3, 8, 16, 16))["block"]
    pairs = att.top_pairs(5)
    flat = att.weights[0].flatten().sort(descending=True).values[:5]
    assert [round(w, 6) for _, _, w in pairs] == [round(w, 6) for w in flat.tolist()]
    for q, k, w in pairs:
        assert att.weights[0, q, k].item() == w
    only = att.top_pairs(3, query=7)
    assert all(q == 7 for q, _, _ in only)
    far = att.top_pairs(5, min_distance=6.0)
    assert all(torch.dist(att.query_coords[q], att.key_coords[k]) >= 6.0 for q, k, _ in far)


def _hot_centre(path: Path, other: Path) -> tuple[float, float]:
    """Centre (row, column) of the pixels where the heat map is hot in ``path`` and the picture differs from
    ``other`` (the same picture with the hot key cell elsewhere, so the colour bar and the frames cancel)."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    b = np.asarray(Image.open(other).convert("RGB")).astype(int)
    # inferno's hot end (pale yellow) at alpha 0.55 over the (black) frame: red and green high, blue lower
    hot = (a[..., 0] > 100) & (a[..., 1] > 100) & (a[..., 2] < a[..., 0] - 30) & (np.abs(a - b).sum(-1) > 60)
    rows, cols = np.nonzero(hot)
    assert len(rows) > 20, f"no hot cell found in {path.name}"
    return float(rows.mean()), float(cols.mean())


def test_the_rendered_heat_map_is_hottest_where_the_weights_are_largest(tmp_path):
    import dataclasses

    clip = torch.zeros(1, 3, 8, 16, 16)  # a uniform (black) clip: only the heat map colours the panels
    att = capture_attention(StemAndBlock(), clip)["block"]
    tk, hk, wk = att.key_grid  # (4, 2, 2): four panels of 2x2 key cells

    def render(t: int, y: int, x: int, name: str) -> Path:
        weights = torch.zeros_like(att.weights)
        weights[..., (t * hk + y) * wk + x] = 1.0  # every query puts all its weight on key cell (t, y, x)
        path = tmp_path / f"{name}.png"
        render_attention(
            clip, dataclasses.replace(att, weights=weights), path, query=(3, 10, 5), top_k=1, max_panels=tk, title=""
        )
        return path

    bottom_left, top_right, next_panel = render(1, 1, 0, "bl"), render(1, 0, 1, "tr"), render(2, 1, 0, "np")
    (y_bl, x_bl), (y_tr, x_tr) = _hot_centre(bottom_left, top_right), _hot_centre(top_right, bottom_left)
    y_np, x_np = _hot_centre(next_panel, bottom_left)
    panel = x_np - x_bl  # the next frame's panel: the same cell one panel width to the right
    assert panel > 0 and abs(y_np - y_bl) < 2
    # within a panel, the hot cell is a half panel away: below / left of the other corner
    assert y_bl - y_tr == pytest.approx(panel / 2, rel=0.25) and x_tr - x_bl == pytest.approx(panel / 2, rel=0.25)


def test_the_query_ring_and_the_box_outlines_sit_on_their_pixels(tmp_path):
    import dataclasses

    from PIL import Image

    clip = torch.zeros(1, 3, 8, 16, 16)  # black frames
    att = capture_attention(StemAndBlock(), clip)["block"]
    weights = torch.zeros_like(att.weights)
    weights[..., 0] = 1.0  # all weight on key 0, in a panel not drawn: no arrow, a black heat map on frame 2
    out = tmp_path / "overlay.png"
    summary = render_attention(
        clip,
        dataclasses.replace(att, weights=weights),
        out,
        query=(2, 10, 5),
        top_k=1,
        max_panels=1,
        title="",
        boxes=[(2, 1, 1, 15, 15), (2, 4, 8, 12, 14)],
        box_labels=["", ""],
    )
    assert summary["panels"] == [2] and summary["query_coords"] == (2.5, 9.5, 5.5)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]

    def bounds(mask):
        rows, cols = np.nonzero(mask)
        assert len(rows) > 20
        return rows.min(), rows.max(), cols.min(), cols.max(), rows.mean(), cols.mean()

    # the first box (cyan) frames input pixels 1..14: its outline gives the panel's scale and where pixel 7.5 lies
    top, bottom, left, right, _, _ = bounds((r < 80) & (g > 200) & (b > 200))
    scale = (right - left) / 14
    assert (bottom - top) / 14 == pytest.approx(scale, rel=0.05)
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2

    def at(y: float, x: float) -> tuple[float, float]:
        return centre_y + (y - 7.5) * scale, centre_x + (x - 7.5) * scale

    # the second box (yellow) covers rows 4..11 and columns 8..13: centre (7.5, 10.5), 8 x 6 pixels
    top, bottom, left, right, _, _ = bounds((r > 200) & (g > 200) & (b < 80))
    expected_y, expected_x = at(7.5, 10.5)
    assert (top + bottom) / 2 == pytest.approx(expected_y, abs=scale / 2)
    assert (left + right) / 2 == pytest.approx(expected_x, abs=scale / 2)
    assert (bottom - top, right - left) == pytest.approx((8 * scale, 6 * scale), rel=0.1)
    # the lime ring is centred on the query cell's centre (y, x) = (9.5, 5.5)
    _, _, _, _, ring_y, ring_x = bounds((r < 80) & (g > 200) & (b < 80))
    assert (ring_y, ring_x) == pytest.approx(at(9.5, 5.5), abs=scale / 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("query", [(3, 10, 5), None])
def test_every_mode_renders_a_png(tmp_path, mode, query):
    clip = torch.randn(1, 3, 8, 16, 16)
    att = capture_attention(StemAndBlock(mode), clip)["block"]
    out = tmp_path / "pics" / f"{mode}.png"
    summary = render_attention(clip, att, out, query=query, top_k=4)
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 2000
    assert summary["panels"] == [0, 2, 4, 6]  # one frame per temporal key cell
    if query is not None:  # the query's four strongest keys, strongest first
        assert summary["query"] == att.query_index(*query)
        assert summary["pairs"] == att.top_pairs(4, query=summary["query"])
    else:  # the strongest pairs over all queries, keys within one key cell of their query left out
        key_cell = max(att.key_stride[1:])  # 8 input pixels: stem stride 4, subsampled by 2
        assert summary["pairs"] == att.top_pairs(4, min_distance=key_cell)
        assert summary["query"] == summary["pairs"][0][0]
    signed = bool((att.weights < 0).any())
    assert signed == (mode == "dot_product")  # the softmax and ReLU modes cannot go negative
    assert summary["cmap"] == ("RdBu_r" if mode == "dot_product" else "inferno")


def test_render_limits_panels_and_checks_the_clip(tmp_path):
    clip = torch.randn(1, 3, 16, 8, 8)
    att = capture_attention(StemAndBlock(stride=(1, 2, 2)), clip)["block"]  # 16 temporal key cells
    summary = render_attention(clip, att, tmp_path / "a.png", query=(9, 3, 3), max_panels=4)
    assert len(summary["panels"]) == 4 and 9 in summary["panels"]
    frames = (np.random.default_rng(0).random((16, 8, 8, 3)) * 255).astype(np.uint8)
    decoded = render_attention(frames, att, tmp_path / "b.png", query=(9, 3, 3), max_panels=4)  # uint8 frames too
    same = ("query", "pairs", "panels")
    assert {k: decoded[k] for k in same} == {k: summary[k] for k in same}
    with pytest.raises(ValueError, match="captured on an input"):
        render_attention(torch.randn(3, 8, 8, 8), att, tmp_path / "c.png")


def test_visualised_clip_is_the_test_loaders_clip_of_the_same_frames(tmp_path):
    from nonlocalnet.data import transforms
    from nonlocalnet.data.video_dataset import VideoListDataset
    from nonlocalnet.viz.loading import read_clip

    # noise frames shrunk 46 -> 32 (anti-aliasing shows) and cropped to 28 from 32x43 (the centre of 15 columns
    # of slack is 7.5: the test loader rounds it up to 8)
    frames = np.random.default_rng(0).integers(0, 256, (20, 46, 62, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mp4", frames, codec="mpeg4", rate=8)
    (tmp_path / "list.txt").write_text("clip.mp4 0\n")
    test_set = VideoListDataset(
        tmp_path / "list.txt",
        tmp_path,
        split="test",
        num_classes=1,
        frames=4,
        sampling_rate=3,
        test_scale=32,
        crop_size=28,
        test_clips=1,
        test_crops=1,
    )
    expected = test_set[0]["clip"]
    start = int(transforms.uniform_clip_indices(len(frames), 4, 3, clip=0, num_clips=1)[0])
    raw, clip = read_clip(tmp_path / "clip.mp4", frames=4, sampling_rate=3, start=start, size=32, crop=28)
    assert torch.equal(clip, expected)
    # the frames drawn are the pixels the model is given
    assert torch.equal(transforms.normalize(transforms.to_channels_first(torch.from_numpy(raw))), expected)


def test_visualize_command_end_to_end(tmp_path, capsys, monkeypatch):
    from nonlocalnet import cli
    from nonlocalnet.cli import main
    from nonlocalnet.models import create_model, save_weights

    # the lead registers the command in cli.COMMANDS; the test does not depend on it being there yet
    monkeypatch.setitem(cli.COMMANDS, "visualize", ("nonlocalnet.commands.visualize", "attention pictures"))
    options = dict(layers=(1, 1, 1, 1), width=4, nonlocal_locations={"res3": (0,), "res4": (0,)})
    model = create_model("nl_c2d_r50_8x8", num_classes=3, **options)
    save_weights(model, tmp_path / "model.safetensors", metadata={"model": "nl_c2d_r50_8x8"})
    frames = np.zeros((20, 64, 64, 3), dtype=np.uint8)
    frames[:, 10:30, 10:30] = 220
    write_video(tmp_path / "clip.mp4", frames, codec="mpeg4", rate=8)
    base = [
        "visualize",
        "--checkpoint",
        str(tmp_path / "model.safetensors"),
        "--video",
        str(tmp_path / "clip.mp4"),
        "--set",
        "layers=[1,1,1,1]",
        "--set",
        "width=4",
        "--set",
        "nonlocal_locations={res3: [0], res4: [0]}",
        "--sampling-rate",
        "2",
    ]
    assert main(base + ["--block", "res4.0", "--query", "2,20,20", "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG_SIGNATURE
    printed = capsys.readouterr().out.splitlines()
    # res4 of 8 frames of 64x64: a 4x4x4 grid of cells of 2 frames x 16 x 16 pixels; pixel (2, 20, 20) is in cell
    # (1, 1, 1), query 1*16 + 1*4 + 1 = 21
    assert printed[0].startswith(
        f"res4.nl0: wrote {tmp_path / 'one.png'}; query at (t, y, x) = (2.5, 23.5, 23.5); "
        "strongest pairs, query (t, y, x) -> key (t, y, x) weight: (2.5, 23.5, 23.5)->("
    )
    import re

    pairs = printed[0].split("weight: ")[1].split(", (")  # key pairs as coordinates, not flat indices
    assert all(re.fullmatch(r"\(?[\d.]+, [\d.]+, [\d.]+\)->\([\d.]+, [\d.]+, [\d.]+\) [-\d.e]+", p) for p in pairs)
    assert json.loads(printed[-1])["blocks"] == ["res4.nl0"] and json.loads(printed[-1])["clip"] == [3, 8, 64, 64]
    assert main(base + ["--block", "all", "--out", str(tmp_path / "all.png")]) == 0
    assert (tmp_path / "all_res3_nl0.png").is_file() and (tmp_path / "all_res4_nl0.png").is_file()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["blocks"] == ["res3.nl0", "res4.nl0"]
    assert main(base[:4] + [str(tmp_path / "missing.mp4")] + base[5:]) == 2
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    assert main(base[:4] + [str(tmp_path / "bad.mp4")] + base[5:]) == 2
    assert main(base + ["--block", "res2.9"]) == 2
    assert main(base + ["--query", "99,10,10"]) == 2  # an 8-frame clip: clamped to the last frame before
    err = capsys.readouterr().err
    assert "no video at" in err and "cannot decode" in err and "not a non-local block" in err
    assert "error: position (t, y, x) = (99, 10, 10) lies outside the clip (8 frames of 64 x 64 pixels)" in err


def test_wide_footage_gets_wide_panels_and_a_one_hot_weight_is_outlined(tmp_path):
    import dataclasses

    from PIL import Image

    clip = torch.zeros(1, 3, 8, 16, 64)  # 4:1 footage, black
    att = capture_attention(StemAndBlock(), clip)["block"]
    tk, hk, wk = att.key_grid  # (4, 2, 8): key cells of 2 frames x 8 x 8 pixels
    weights = torch.zeros_like(att.weights)
    weights[..., (1 * hk + 1) * wk + 6] = 1.0  # one-hot: every query on key cell (1, 1, 6)
    out = tmp_path / "wide.png"
    summary = render_attention(
        clip, dataclasses.replace(att, weights=weights), out, query=(3, 10, 5), top_k=1, max_panels=2, title=""
    )
    assert summary["strongest_key"] == (2.5, 11.5, 51.5)  # the cell's centre: frames 2-3, rows 8-15, columns 48-55
    width, height = Image.open(out).size
    assert width / height > 2 * 4 * 0.8  # two panels of the frames' 4:1 aspect (square panels gave 2:1)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    rows, cols = np.nonzero((r < 60) & (g > 150) & (g < 230) & (b > 220))  # the deep sky blue dashed outline
    assert len(rows) > 10
    # a small square around the cell, on the right-hand panel (frames 2-3), in its right part (columns 48-55 of 64)
    assert summary["panels"][-1] in (2, 3) and np.ptp(rows) < height / 2 and np.ptp(cols) < width / 8
    assert cols.mean() > 0.7 * width  # the right panel spans about 0.5-0.95 of the picture; the cell 75-86% of it


# --- does the block look at the other object? ------------------------------------------------------------------


class MarkerModel(nn.Module):
    """A stem that averages 2x4x4 input cells, then one NL block whose attention is set by hand.

    Channel 0 of the clip marks object A, channel 1 object B. With ``cross=True`` θ reads a position's A marker
    and φ a key's B marker (and the other way round), so a query on A attends to B and a query on B to A;
    with ``cross=False`` each object attends to itself.
    """

    def __init__(self, cross=True, mode="embedded_gaussian", extent="spacetime"):
        super().__init__()
        self.stem = nn.AvgPool3d((2, 4, 4))
        self.block = NonLocal3d(3, mode=mode, inter_channels=2, subsample=(1, 2, 2), extent=extent)
        with torch.no_grad():
            for p in self.block.parameters():
                p.zero_()
            self.block.theta.weight[0, 0] = 20.0  # θ_0 = 20 * A marker
            self.block.theta.weight[1, 1] = 20.0  # θ_1 = 20 * B marker
            self.block.phi.weight[0, 1 if cross else 0] = 1.0
            self.block.phi.weight[1, 0 if cross else 1] = 1.0

    def forward(self, clip):
        return self.block(self.stem(clip))


def _marker_clips(boxes):
    """Clips (B, 3, 8, 32, 32): channel 0 = 1 inside object A's box, channel 1 = 1 inside B's."""
    clips = torch.zeros(len(boxes), 3, 8, 32, 32)
    for b, objects in enumerate(boxes):
        for channel, (frame, y0, x0, y1, x1) in enumerate(objects):
            clips[b, channel, frame, y0:y1, x0:x1] = 1.0
    return clips


# A at frame 2 (rows 8-15, columns 0-7); B at frame 5, aligned to one key cell or straddling four
TRUE_BOXES = [[(2, 8, 0, 16, 8), (5, 16, 16, 24, 24)], [(2, 8, 0, 16, 8), (5, 18, 20, 26, 28)]] * 2


def test_hit_rate_counts_top_keys_on_the_other_object():
    from nonlocalnet.viz import attention_hit_rate, attention_hits

    clips = _marker_clips(TRUE_BOXES)
    declared = torch.tensor(TRUE_BOXES)
    declared[2:, 1] = torch.tensor([7, 0, 24, 8, 32])  # clips 2, 3: B declared where nothing is
    model = MarkerModel(cross=True)
    result = attention_hits(model, clips, declared, "block", batch_size=3)  # two batches
    # clips 0, 1 hit both ways; clips 2, 3: A's top key is on the real B, not the declared one, and the query at
    # the declared B sees no marker (uniform weights, top key 0 = frames 0-1, rows and columns 0-7, not on A)
    assert result.hits.tolist() == [[True, True]] * 2 + [[False, False]] * 2
    assert result.rate == 0.5 and attention_hit_rate(model, clips, declared, "block") == 0.5
    assert result.block == "block"
    # the query at A is the cell containing its continuous centre (frame 2, y = 12, x = 4 on the pixel-edge
    # grid): query cells are 2 frames x 4 x 4 pixels, so cell (1, 3, 1) of the 4x8x8 grid
    assert result.queries[:, 0].tolist() == [1 * 64 + 3 * 8 + 1] * 4
    # keys are 2 frames x 8 x 8 pixels: an aligned B overlaps 1 of the 64 key cells, a straddling B 4
    assert result.chance[:2, 0].tolist() == [1 / 64, 4 / 64]
    assert result.top_keys[0, 0] == 2 * 16 + 2 * 4 + 2  # key (t=2, y=2, x=2) = frames 4-5, pixels 16-23
    assert result.top_keys[2, 1] == 0
    # self-attention instead: every query's top key is on its own object, never on the other one
    assert attention_hit_rate(MarkerModel(cross=False), clips, torch.tensor(TRUE_BOXES), "block") == 0.0


def test_hit_rate_only_counts_keys_the_block_can_reach():
    from nonlocalnet.viz import attention_hits

    # dot product, attention within each frame only; A and B share frame 2. Every reachable weight is negative
    # and B's the least negative; unreachable keys hold exact zeros that must not win.
    boxes = [[(2, 8, 0, 16, 8), (2, 16, 16, 24, 24)]]
    model = MarkerModel(mode="dot_product", extent="space")
    with torch.no_grad():
        model.block.theta.weight.zero_()
        model.block.theta.bias[0] = 1.0  # θ = (1, 0) everywhere
        model.block.phi.weight.zero_()
        model.block.phi.weight[0, 1] = 1.0
        model.block.phi.bias[0] = -1.0  # φ_0 = B marker - 1: -0.5 at B (after pooling), -1 elsewhere
    result = attention_hits(model, _marker_clips(boxes), torch.tensor(boxes), "block")
    assert result.hits.tolist() == [[True, False]]  # B -> A: B's top key is B itself
    assert result.top_weights[0, 0] < 0
    assert result.chance[0].tolist() == [1 / 16, 1 / 16]  # 16 reachable keys in the query's frame pair
    # objects in frames the block cannot connect: never a hit, and chance 0
    far = [[(2, 8, 0, 16, 8), (6, 16, 16, 24, 24)]]
    result = attention_hits(model, _marker_clips(far), torch.tensor(far), "block")
    assert result.hits.tolist() == [[False, False]] and result.chance.tolist() == [[0.0, 0.0]]
    captured = capture_attention(model, _marker_clips(far))["block"]
    assert captured.reach.shape == (256, 64) and captured.reach.sum(1).unique().tolist() == [16]


def test_reach_follows_temporal_groups_of_frames():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv3d(3, 4, (1, 2, 2), stride=(1, 2, 2))
            self.nl = NonLocal3d(4, temporal_groups=2, subsample=(1, 2, 2))  # 2 frames per group

        def forward(self, x):
            return self.nl(self.stem(x))

    att = capture_attention(Grouped(), torch.randn(1, 3, 6, 8, 8))["nl"]
    # queries 6x4x4 = 96, keys 6x2x2 = 24; query frame t sees the 2 x 4 keys of frames 2 * (t // 2) + {0, 1}
    frame_of_query = torch.arange(96) // 16
    frame_of_key = torch.arange(24) // 4
    expected = (frame_of_query[:, None] // 2) == (frame_of_key[None, :] // 2)
    assert torch.equal(att.reach, expected)
    assert att.weights[0][~att.reach].abs().max() == 0
    torch.testing.assert_close(att.weights[0].sum(1), torch.ones(96))


def test_hit_rate_rejects_bad_boxes():
    from nonlocalnet.viz import attention_hit_rate

    clips = _marker_clips(TRUE_BOXES[:1])
    with pytest.raises(ValueError, match=r"\(B=1, 2, 5\)"):
        attention_hit_rate(MarkerModel(), clips, torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not lie in a clip of 8 frames of 32x32"):
        attention_hit_rate(MarkerModel(), clips, torch.tensor([[(8, 0, 0, 4, 4), (0, 0, 0, 4, 4)]]))
    with pytest.raises(ValueError, match="does not lie"):
        attention_hit_rate(MarkerModel(), clips, torch.tensor([[(0, 4, 0, 4, 4), (0, 0, 0, 4, 4)]]))  # empty box
    with pytest.raises(ValueError, match="not a non-local block"):
        attention_hit_rate(MarkerModel(), clips, torch.tensor(TRUE_BOXES[:1]), "res4.2")


def test_hit_rate_on_a_resnet_block_by_its_paper_name():
    from nonlocalnet.models import ResNet3d
    from nonlocalnet.viz import attention_hits

    model = ResNet3d((1, 1, 1, 1), clip="8x8", width=4, num_classes=3, nonlocal_locations={"res3": (0,)})
    boxes = torch.tensor([[(1, 0, 0, 8, 8), (6, 24, 24, 32, 32)]] * 2)
    result = attention_hits(model, torch.randn(2, 3, 8, 32, 32), boxes, "res3.0")
    assert result.block == "res3.nl0" and 0.0 <= result.rate <= 1.0
    # res3 of the 8x8 layout: stride (2, 8, 8), keys pooled 1x2x2 -> 4x2x2 cells of 2 frames x 16 x 16 pixels;
    # each 8x8 box overlaps exactly one of the 16 cells
    assert result.chance.unique().tolist() == [1 / 16]


def test_object_picture_outlines_both_objects(tmp_path):
    from nonlocalnet.viz import render_object_attention

    clip = _marker_clips(TRUE_BOXES[:1])[0]
    summary = render_object_attention(
        MarkerModel(), clip, torch.tensor(TRUE_BOXES[0]), tmp_path / "ab.png", block_name="block", top_k=3
    )
    assert (tmp_path / "ab.png").read_bytes()[:8] == PNG_SIGNATURE
    assert summary["hit"] and summary["chance"] == 1 / 64 and summary["block"] == "block"
    assert 2 in summary["panels"] and 5 in summary["panels"]  # the objects' own frames are shown
    assert summary["boxes"] == [tuple(b) for b in TRUE_BOXES[0]]
    assert summary["pairs"][0][1] == 2 * 16 + 2 * 4 + 2  # the strongest arrow goes from A to B
    frames = (clip.permute(1, 2, 3, 0) * 255).to(torch.uint8).numpy()  # drawn from uint8 frames instead
    back = render_object_attention(
        MarkerModel(),
        clip,
        torch.tensor(TRUE_BOXES[0]),
        tmp_path / "ba.png",
        block_name="block",
        source=1,
        frames=frames,
        max_panels=2,
    )
    assert back["hit"] and sorted(back["panels"]) == [2, 5]
