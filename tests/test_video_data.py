"""Real-video data: list files, PyAV decoding, the paper's clip sampling and transforms, corrupt / missing videos.

The videos are tiny real .mp4 files written with PyAV in a temporary folder. In the "time" videos frame t is a
flat grey of value ``10 + 6 t``, so the frames a clip took can be read back from its pixels; the "ramp" video is
a static horizontal ramp ``20 + 4 x``, so crops and flips can be read back from theirs.
"""

from __future__ import annotations

import logging
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from nonlocalnet.data import decode_errors, decoders, pyav_decoder, transforms, video_dataset
from nonlocalnet.data.collate import collate
from nonlocalnet.data.decoders import read_frames
from nonlocalnet.data.video_dataset import VideoListDataset
from nonlocalnet.data.video_list import read_video_list

from .helpers import write_video

LOSSLESS = {"gop": 5, "lossless": True}  # lossless H.264, a key frame every 5 frames

HEIGHT, WIDTH = 40, 56


needs_torchcodec = pytest.mark.skipif(
    not decoders.decoder_available("torchcodec"),
    reason="torchcodec and FFmpeg's shared libraries (pip install torchcodec; apt install ffmpeg)",
)


def _time_video(count: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    values = 10 + 6 * np.arange(count, dtype=np.uint8)
    return np.broadcast_to(values[:, None, None, None], (count, height, width, 3)).copy()


def _ramp_video(count: int) -> np.ndarray:
    ramp = (20 + 4 * np.arange(WIDTH)).astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (count, HEIGHT, WIDTH, 3)).copy()


def _frame_ids(clip: torch.Tensor) -> list[int]:
    """Frame indices of a normalised (3, T, H, W) clip of a time video, read from its grey values."""
    grey = (clip * transforms.STD + transforms.MEAN).mean(dim=(0, 2, 3))  # (T,)
    return ((grey - 10) / 6).round().long().tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    (root / "k").mkdir()
    write_video(root / "k" / "a.mp4", _time_video(40), **LOSSLESS)
    write_video(root / "k" / "b.mp4", _time_video(24), **LOSSLESS)
    write_video(root / "k" / "short.mp4", _time_video(5), **LOSSLESS)
    write_video(root / "k" / "ramp.mp4", _ramp_video(12), **LOSSLESS)
    write_video(root / "k" / "portrait.mp4", _time_video(12, height=WIDTH, width=HEIGHT), **LOSSLESS)
    noise = np.random.default_rng(1).integers(0, 256, (24, HEIGHT, WIDTH, 3), np.uint8)
    write_video(root / "k" / "noise.mp4", noise, **LOSSLESS)  # every pixel differs: conversions and regions show
    (root / "k" / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    return root


def _list(tmp_path: Path, lines: list[str], name: str = "list.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _dataset(tmp_path: Path, root: Path, lines: list[str], **kwargs) -> VideoListDataset:
    options = dict(split="train", num_classes=5, frames=4, sampling_rate=3, train_scale=(40, 48), crop_size=32)
    options.update(kwargs)
    return VideoListDataset(_list(tmp_path, lines), root, **options)


# ------------------------------------------------------------------------------------------------ pure transforms


def test_train_clip_indices_window_of_frames_times_rate_at_the_drawn_start():
    # 8x8 on 100 frames: a window of 64 frames, start uniform in [0, 36]
    index = transforms.train_clip_indices(100, 8, 8, torch.Generator().manual_seed(3))
    start = int(torch.randint(37, (1,), generator=torch.Generator().manual_seed(3)))
    assert index.tolist() == [start + 8 * k for k in range(8)]
    starts = {int(transforms.train_clip_indices(100, 8, 8, torch.Generator().manual_seed(s))[0]) for s in range(400)}
    assert min(starts) == 0 and max(starts) == 36
    # 32x2: 64 consecutive frames, every other one kept; a video of exactly 64 frames has a single position
    assert transforms.train_clip_indices(64, 32, 2, torch.Generator()).tolist() == list(range(0, 64, 2))


def test_short_video_indices_repeat_the_last_frame():
    assert transforms.train_clip_indices(10, 4, 4, torch.Generator()).tolist() == [0, 4, 8, 9]
    assert transforms.uniform_clip_indices(3, 4, 2, 1, 10).tolist() == [0, 2, 2, 2]


def test_uniform_clip_indices_evenly_spaced_from_start_to_end():
    # 100 frames, 8x2 (window 16): delta 84; starts round(k * 84 / 9)
    starts = [int(transforms.uniform_clip_indices(100, 8, 2, k, 10)[0]) for k in range(10)]
    assert starts == [0, 9, 19, 28, 37, 47, 56, 65, 75, 84]
    assert transforms.uniform_clip_indices(100, 8, 2, 9, 10).tolist() == list(range(84, 100, 2))
    assert transforms.uniform_clip_indices(100, 8, 2, 0, 1).tolist() == list(range(42, 58, 2))  # one clip: centred
    with pytest.raises(ValueError, match="clip must be in"):
        transforms.uniform_clip_indices(100, 8, 2, 10, 10)


def test_short_side_resize_shapes_and_bilinear_values():
    assert transforms.short_side_resize(torch.zeros(3, 2, 40, 56), 256).shape == (3, 2, 256, 358)  # floor(56 * 6.4)
    assert transforms.short_side_resize(torch.zeros(3, 2, 56, 40), 256).shape == (3, 2, 358, 256)
    assert torch.equal(
        transforms.short_side_resize(torch.full((3, 1, 40, 56), 77, dtype=torch.uint8), 20),
        torch.full((3, 1, 20, 28), 77, dtype=torch.uint8),
    )
    noise = torch.randint(0, 256, (3, 2, 40, 56), dtype=torch.uint8)
    for size in (24, 64):  # shrinking and enlarging: the uint8 path is the float one, rounded
        fast, exact = transforms.short_side_resize(noise, size), transforms.short_side_resize(noise.float(), size)
        assert fast.dtype == torch.uint8 and (fast.float() - exact).abs().max() <= 1.01
    image = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).expand(1, 1, 2, 2)
    up = transforms.short_side_resize(image, 4)[0, 0]
    assert torch.allclose(up[0], torch.tensor([0.0, 2.5, 7.5, 10.0]))
    assert torch.allclose(up[:, 0], torch.tensor([0.0, 5.0, 15.0, 20.0]))


def test_spatial_crop_offsets_three_crops_along_the_long_side():
    assert [transforms.spatial_crop_offset(256, 358, 224, j, 3) for j in range(3)] == [(16, 0), (16, 67), (16, 134)]
    assert [transforms.spatial_crop_offset(358, 256, 224, j, 3) for j in range(3)] == [(0, 16), (67, 16), (134, 16)]
    assert transforms.spatial_crop_offset(256, 358, 224, 0, 1) == (16, 67)
    assert transforms.spatial_crop_offset(5, 10, 4, 0, 1) == (1, 3)  # (5 - 4) / 2 rounds up
    clip = torch.arange(6 * 8.0).reshape(1, 1, 6, 8)
    assert transforms.spatial_crop(clip, 6, 2, 3)[0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="does not fit"):
        transforms.spatial_crop(clip, 7, 0, 3)


def test_random_crop_flip_and_normalize():
    clip = torch.arange(10 * 12.0).reshape(1, 1, 10, 12)
    generator = torch.Generator().manual_seed(5)
    reference = torch.Generator().manual_seed(5)
    top, left = int(torch.randint(3, (1,), generator=reference)), int(torch.randint(5, (1,), generator=reference))
    assert torch.equal(transforms.random_crop(clip, 8, generator), clip[..., top : top + 8, left : left + 8])
    assert transforms.horizontal_flip(clip)[0, 0, 0, :3].tolist() == [11.0, 10.0, 9.0]
    flips = [
        bool(transforms.random_horizontal_flip(clip, torch.Generator().manual_seed(s))[0, 0, 0, 0] == 11)
        for s in range(200)
    ]
    assert 60 < sum(flips) < 140
    assert transforms.normalize(torch.tensor([0, 114.75, 172.125, 255])).tolist() == pytest.approx(
        [-2.0, 0.0, 1.0, 2.4444], abs=1e-4
    )


# ------------------------------------------------------------------------------------------------------ list files


def test_list_files_single_and_multi_label(tmp_path):
    single = _list(tmp_path, ["# comment", "k/a.mp4 3", "", "dir with space/b.mp4 0"], "single.txt")
    assert read_video_list(single, num_classes=4) == [("k/a.mp4", 3), ("dir with space/b.mp4", 0)]
    multi = _list(tmp_path, ["k/a.mp4 3,1,3", "k/b.mp4 0 2", "k/c.mp4 4,"], "multi.txt")
    assert read_video_list(multi, num_classes=5, multi_label=True) == [
        ("k/a.mp4", (1, 3)),
        ("k/b.mp4", (0, 2)),
        ("k/c.mp4", (4,)),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("k/b.mp4 7", "line 2: label 7 out of range"),
        ("k/b.mp4 x", "line 2: label 'x' is not a non-negative integer"),
        ("k/b.mp4", "line 2: expected 'path label'"),
        ("k/b.mp4 1,2", "line 2: several labels"),
    ],
)
def test_malformed_list_line_names_file_and_line(tmp_path, line, message):
    path = _list(tmp_path, ["k/a.mp4 1", line])
    with pytest.raises(ValueError, match=message) as info:
        read_video_list(path, num_classes=5)
    assert str(path) in str(info.value)


def test_multi_label_items_are_multi_hot(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/a.mp4 3,1", "k/b.mp4 0"], multi_label=True)
    item = data[0]
    assert item["label"].dtype == torch.float32 and item["label"].tolist() == [0, 1, 0, 1, 0]
    assert data.targets.tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="line 1: label 9 out of range"):
        _dataset(tmp_path, videos, ["k/a.mp4 1,9"], multi_label=True)


def test_missing_files_reported_together(tmp_path, videos, caplog):
    lines = ["k/a.mp4 0", "k/gone1.mp4 1", "k/b.mp4 2", "k/gone2.mp4 3", "other/gone3.mp4 4"]
    with pytest.raises(FileNotFoundError, match="3 of 5 videos") as info:
        _dataset(tmp_path, videos, lines)
    assert all(name in str(info.value) for name in ("gone1.mp4", "gone2.mp4", "other/gone3.mp4"))
    with caplog.at_level(logging.WARNING, logger=video_dataset.__name__):
        data = _dataset(tmp_path, videos, lines, skip_missing=True)
    assert len(data) == 2 and data.labels == [0, 2] and "gone3.mp4" in caplog.text


# ------------------------------------------------------------------------------------------------------ train items


def test_train_item_shapes_normalisation_and_stride(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/a.mp4 3", "k/b.mp4 1"])
    assert len(data) == 2
    starts = set()
    for epoch in range(8):
        data.set_epoch(epoch)
        item = data[0]
        assert item["clip"].shape == (3, 4, 32, 32) and item["clip"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].item() == 3
        assert item["video"].item() == 0 and item["skipped"].item() == 0
        # flat grey frames stay flat: every pixel of frame t is 10 + 6 t (colour conversion is off by at most 1)
        ids = _frame_ids(item["clip"])
        assert (item["clip"][:, 0] * transforms.STD + transforms.MEAN - (10 + 6 * ids[0])).abs().max() <= 1.001
        assert ids == [ids[0] + 3 * k for k in range(4)] and 0 <= ids[0] <= 40 - 12
        starts.add(ids[0])
    assert len(starts) > 3


def test_train_item_reproducible_from_seed_and_epoch(tmp_path, videos):
    lines = ["k/a.mp4 0", "k/ramp.mp4 1"]
    first, second = _dataset(tmp_path, videos, lines, seed=7), _dataset(tmp_path, videos, lines, seed=7)
    first.set_epoch(2), second.set_epoch(2)
    assert all(torch.equal(first[i]["clip"], second[i]["clip"]) for i in range(2))
    items = []
    for epoch in range(4):
        first.set_epoch(epoch)
        items.append(first[0]["clip"])
    assert not all(torch.equal(items[0], other) for other in items[1:])
    other_seed = _dataset(tmp_path, videos, lines, seed=8)
    other_seed.set_epoch(0)
    first.set_epoch(0)
    assert not all(torch.equal(first[i]["clip"], other_seed[i]["clip"]) for i in range(2))


def test_train_flip_and_crop_read_back_from_a_ramp(tmp_path, videos):
    # 40x56 frames kept at short side 40, a random 40x40 crop: columns x0..x0+39 of the ramp 20 + 4x, maybe mirrored
    data = _dataset(tmp_path, videos, ["k/ramp.mp4 0"], train_scale=(40, 40), crop_size=40)
    flipped, lefts = 0, set()
    for epoch in range(12):
        data.set_epoch(epoch)
        # (W,) mean over channels and rows
        row = (data[0]["clip"] * transforms.STD + transforms.MEAN)[:, 0].mean(dim=(0, 1))
        columns = ((row - 20) / 4).round().long().tolist()
        if columns[0] > columns[-1]:
            flipped += 1
            columns = columns[::-1]
        assert columns == list(range(columns[0], columns[0] + 40)) and 0 <= columns[0] <= 16
        lefts.add(columns[0])
    assert 0 < flipped < 12 and len(lefts) > 3


def test_short_video_repeats_its_last_frame(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/short.mp4 0"])  # 5 frames, 4x3 needs 12
    assert _frame_ids(data[0]["clip"]) == [0, 3, 4, 4]
    test = _dataset(tmp_path, videos, ["k/short.mp4 0"], split="test", test_clips=2, test_crops=1, test_scale=40)
    assert [_frame_ids(test[i]["clip"]) for i in range(2)] == [[0, 3, 4, 4], [0, 3, 4, 4]]


def test_corrupt_video_skipped_counted_and_logged(tmp_path, videos, caplog):
    data = _dataset(tmp_path, videos, ["k/corrupt.mp4 0", "k/a.mp4 1", "k/b.mp4 2"])
    with caplog.at_level(logging.WARNING, logger=video_dataset.__name__):
        item = data[0]
    assert item["skipped"].item() == 1 and item["video"].item() in (1, 2)  # one corrupt video, however often drawn
    assert {int(i) for i in item["skipped_ids"] if i >= 0} == {0}
    assert item["label"].item() == item["video"].item()  # the label is the replacement's
    assert "corrupt.mp4" in caplog.text
    again = _dataset(tmp_path, videos, ["k/corrupt.mp4 0", "k/a.mp4 1", "k/b.mp4 2"])[0]
    assert torch.equal(again["clip"], item["clip"]) and again["video"] == item["video"]  # replacement reproducible
    # test split: the next video takes the view, and says so
    test = _dataset(
        tmp_path,
        videos,
        ["k/a.mp4 0", "k/corrupt.mp4 1", "k/b.mp4 2"],
        split="test",
        test_clips=2,
        test_crops=1,
        test_scale=40,
    )
    views = [test[i] for i in range(len(test))]
    assert [v["video"].item() for v in views] == [0, 0, 2, 2, 2, 2]
    assert [v["skipped"].item() for v in views] == [0, 0, 1, 1, 0, 0]
    assert [v["skipped_ids"][0].item() for v in views] == [-1, -1, 1, 1, -1, -1]
    assert torch.equal(views[2]["clip"], views[4]["clip"])


def test_only_corrupt_videos_raise_after_max_retries(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/corrupt.mp4 0"], max_retries=3)
    with pytest.raises(
        video_dataset.CorruptData, match=r"every video listed in .*list.txt failed to decode \(1 videos\)"
    ):
        data[0]
    data = _dataset(tmp_path, videos, ["k/corrupt.mp4 0"] * 30 + ["k/a.mp4 1"], max_retries=3)
    with pytest.raises(video_dataset.CorruptData, match="item 0 of .*: 4 videos in a row failed to decode"):
        data[0]  # 30 of 31 corrupt: four draws in a row fail (seed 0)
    test = _dataset(tmp_path, videos, ["k/corrupt.mp4 0"] * 3, split="test", test_clips=1, test_crops=1, test_scale=40)
    with pytest.raises(video_dataset.CorruptData, match=r"every video listed .* \(3 videos\)"):
        test[0]


def test_a_long_run_of_corrupt_videos_costs_their_views_not_the_test(tmp_path, videos):
    # 11 corrupt entries in a row, more than max_retries + 1: the walk to the next good video goes on
    lines = ["k/a.mp4 0"] + ["k/corrupt.mp4 1"] * 11 + ["k/b.mp4 2"]
    test = _dataset(tmp_path, videos, lines, split="test", test_clips=1, test_crops=1, test_scale=40, max_retries=3)
    views = [test[i] for i in range(len(test))]
    assert [v["video"].item() for v in views] == [0] + [12] * 12
    assert [v["skipped"].item() for v in views] == [0] + list(range(11, 0, -1)) + [0]
    # every corrupt video is named by its own views, whatever the width of skipped_ids (here 4)
    named = {int(i) for v in views for i in v["skipped_ids"] if i >= 0}
    assert named == set(range(1, 12)) and views[1]["skipped_ids"].tolist() == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------------- test items


def test_test_views_clips_evenly_spaced_and_three_crops(tmp_path, videos):
    data = _dataset(
        tmp_path,
        videos,
        ["k/a.mp4 0", "k/ramp.mp4 1"],
        split="test",
        frames=4,
        sampling_rate=2,
        test_clips=3,
        test_crops=3,
        test_scale=40,
        crop_size=40,
    )
    assert len(data) == 2 * 9 and data.view(13) == (1, 1, 1)
    # 40 frames, window 8: starts 0, 16, 32; the three crops of one clip show the same frames
    assert [_frame_ids(data[i]["clip"]) for i in range(0, 9, 3)] == [[0, 2, 4, 6], [16, 18, 20, 22], [32, 34, 36, 38]]
    assert all(data[i]["video"].item() == i // 9 for i in range(18))
    # crops of the 40x56 ramp: left / centre / right columns start at 0, 8, 16
    full = _dataset(
        tmp_path,
        videos,
        ["k/ramp.mp4 1"],
        split="test",
        frames=4,
        sampling_rate=2,
        test_clips=3,
        test_crops=1,
        test_scale=40,
        crop_size=None,
    )
    frame = full[0]["clip"]
    assert frame.shape == (3, 4, 40, 56)
    for j, left in enumerate((0, 8, 16)):
        view = data[9 + j]["clip"]
        assert view.shape == (3, 4, 40, 40)
        assert torch.equal(view, frame[..., left : left + 40])
        first = (view * transforms.STD + transforms.MEAN)[:, :, :, 0].mean()
        assert abs(first.item() - (20 + 4 * left)) <= 1.001


def test_test_crops_of_portrait_frames_run_top_to_bottom(tmp_path, videos):
    data = _dataset(
        tmp_path, videos, ["k/portrait.mp4 0"], split="test", test_clips=1, test_crops=3, test_scale=20, crop_size=20
    )
    full = _dataset(
        tmp_path, videos, ["k/portrait.mp4 0"], split="test", test_clips=1, test_crops=1, test_scale=20, crop_size=None
    )[0]["clip"]
    assert full.shape == (3, 4, 28, 20)
    assert [torch.equal(data[j]["clip"], full[..., top : top + 20, :]) for j, top in enumerate((0, 4, 8))] == [True] * 3


def test_seeking_gives_the_frames_of_decoding_from_the_start(videos, monkeypatch):
    calls = []
    original = pyav_decoder._decode_after_seek

    def spy(*args):
        result = original(*args)
        calls.append(result)
        return result

    monkeypatch.setattr(pyav_decoder, "_decode_after_seek", spy)
    sample = lambda count: torch.arange(count - 20, count, 3)  # noqa: E731  (starts past the seek threshold)
    sought, index = read_frames(videos / "k" / "a.mp4", sample, seek=True)
    assert calls == [True]  # the seek path was taken and agreed with the time stamps
    plain, _ = read_frames(videos / "k" / "a.mp4", sample, seek=False)
    assert np.array_equal(sought, plain) and index.tolist() == list(range(20, 40, 3))
    assert ((sought.reshape(len(index), -1).mean(1) - 10) / 6).round().tolist() == index.tolist()


@pytest.mark.parametrize("reported", [100, None])
def test_wrong_or_missing_frame_count_falls_back_to_counting(videos, monkeypatch, reported):
    monkeypatch.setattr(pyav_decoder, "_frame_count", lambda container, stream: reported)
    counts = []

    def sample(count):
        counts.append(count)
        return transforms.uniform_clip_indices(count, 4, 2, 0, 1)

    frames, index = read_frames(videos / "k" / "a.mp4", sample)
    assert counts == ([100, 40] if reported else [40])  # the container said 100; the video has 40
    assert index.tolist() == [16, 18, 20, 22]
    assert ((frames.reshape(4, -1).mean(1) - 10) / 6).round().tolist() == [16, 18, 20, 22]


@pytest.mark.parametrize("reported", [40, None])
def test_read_frames_names_a_bad_video_and_lets_a_sampling_error_through(videos, monkeypatch, reported):
    with pytest.raises(decode_errors.VideoDecodeError, match="corrupt.mp4: InvalidDataError"):
        read_frames(videos / "k" / "corrupt.mp4", lambda count: torch.arange(1))
    monkeypatch.setattr(
        pyav_decoder, "_frame_count", lambda container, stream: reported
    )  # the first pass or the fallback

    def sample(count):
        raise ValueError(f"a bug in the sampler, not a bad video ({count} frames)")

    with pytest.raises(ValueError, match=r"a bug in the sampler, not a bad video \(40 frames\)") as info:
        read_frames(videos / "k" / "a.mp4", sample)
    assert not isinstance(info.value, decode_errors.VideoDecodeError)


def test_dataloader_with_two_workers_matches_in_process_items(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/a.mp4 0", "k/b.mp4 1", "k/short.mp4 2", "k/ramp.mp4 3"], seed=3)
    data.set_epoch(1)
    loader = DataLoader(data, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b["clip"].shape for b in batches] == [(2, 3, 4, 32, 32)] * 2
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 2, 3]
    assert torch.cat([b["skipped"] for b in batches]).tolist() == [0, 0, 0, 0]
    assert torch.equal(batches[1]["clip"][0], data[2]["clip"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_item_of_an_epoch_is_the_same_with_0_and_2_workers(tmp_path, videos, split):
    lines = ["k/a.mp4 0", "k/corrupt.mp4 1", "k/b.mp4 2", "k/short.mp4 3", "k/ramp.mp4 4"]
    options = dict(seed=5) if split == "train" else dict(split="test", test_clips=2, test_crops=3, test_scale=40)
    epochs = {}
    for workers in (0, 2):
        data = _dataset(tmp_path, videos, lines, **options)
        data.set_epoch(2)
        epochs[workers] = list(DataLoader(data, batch_size=3, num_workers=workers, shuffle=False))
    assert len(epochs[0]) == len(epochs[2]) == -(-len(data) // 3)
    for a, b in zip(epochs[0], epochs[2]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_invalid_options_are_named(tmp_path, videos):
    with pytest.raises(ValueError, match="test_crops=1"):
        _dataset(tmp_path, videos, ["k/a.mp4 0"], split="test", crop_size=None, test_crops=3)
    with pytest.raises(ValueError, match="split must be one of"):
        _dataset(tmp_path, videos, ["k/a.mp4 0"], split="val")
    with pytest.raises(ValueError, match="larger than the smallest train scale"):
        _dataset(tmp_path, videos, ["k/a.mp4 0"], crop_size=64)


def test_normalize_gives_the_plain_formulas_values_contiguous_from_any_layout():
    """One allocation and in-place arithmetic, the same values as (x.float() - 114.75) / 57.375 element by
    element: the clip a training item returns does not depend on the layout the transforms left it in."""
    frames = torch.randint(0, 256, (4, 30, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clip = transforms.to_channels_first(frames)[..., 3:27, 5:29].flip(-1)  # permuted, cropped, mirrored: not contiguous
    out = transforms.normalize(clip)
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape == (3, 4, 24, 24)
    assert torch.equal(out, (clip.float() - 114.75) / 57.375)
    assert out[0, 1, 2, 3] == (float(frames[1, 5, 29 - 1 - 3, 0]) - 114.75) / 57.375  # channel 0 = red, mirrored


# ------------------------------------------------------------------------------ decoding: regions, RGB, decoders


def test_a_scaled_training_crop_is_the_square_of_the_scaled_frame(tmp_path, videos):
    # the 40x56 ramp 20 + 4x scaled to short side 80 and cropped to 32x32: a 16-pixel square of the frame, doubled,
    # so 2 levels an output pixel (inside: the outermost output pixels sit half a source pixel from the square's
    # edge), starting at a whole source column
    data = _dataset(tmp_path, videos, ["k/ramp.mp4 0"], train_scale=(80, 80), crop_size=32)
    lefts, flipped = set(), 0
    for epoch in range(12):
        data.set_epoch(epoch)
        clip = data[0]["clip"]
        assert clip.shape == (3, 4, 32, 32)
        row = (clip * transforms.STD + transforms.MEAN)[:, 0].mean(dim=(0, 1))  # (32,)
        if row[0] > row[-1]:
            flipped, row = flipped + 1, row.flip(0)
        assert abs((row[30] - row[1]).item() - 2 * 29) <= 1.5
        assert (row[2:31] - row[1:30]).sub(2).abs().max() <= 1.5
        left = (row[0].item() - 20) / 4
        assert abs(left - round(left)) <= 0.3 and 0 <= round(left) <= WIDTH - 16
        lefts.add(round(left))
    assert 0 < flipped < 12 and len(lefts) > 3


def test_random_scaled_crop_regions():
    generator = torch.Generator().manual_seed(0)
    sides, flips = set(), 0
    for _ in range(200):
        rows, columns = transforms.random_scaled_crop(256, 456, (256, 320), 224, generator)
        side = rows.stop - rows.start
        assert 0 <= rows.start and rows.stop <= 256 and len(range(456)[columns]) == side
        sides.add(side)
        flips += columns.step == -1
    # 224 * 256 / s for s in 256..320: 224 (s = 256) down to 179 (s = 320)
    assert min(sides) == 179 and max(sides) == 224 and 60 < flips < 140
    again = [transforms.random_scaled_crop(40, 56, (80, 80), 32, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert again[0] == again[1] and again[0][0].stop - again[0][0].start == 16


def test_clip_indices_are_the_frames_an_item_takes(tmp_path, videos):
    data = _dataset(tmp_path, videos, ["k/a.mp4 0", "k/b.mp4 1"])
    for epoch in range(3):
        data.set_epoch(epoch)
        assert _frame_ids(data[0]["clip"]) == data.clip_indices(0, 40).tolist()
        assert _frame_ids(data[1]["clip"]) == data.clip_indices(1, 24).tolist()
    test = _dataset(
        tmp_path,
        videos,
        ["k/a.mp4 0"],
        split="test",
        frames=4,
        sampling_rate=2,
        test_clips=3,
        test_crops=3,
        test_scale=40,
        crop_size=40,
    )
    assert [test.clip_indices(i, 40).tolist() for i in (0, 4, 8)] == [[0, 2, 4, 6], [16, 18, 20, 22], [32, 34, 36, 38]]


def test_frames_are_pyavs_rgb_and_a_region_is_their_slices(videos):
    path = videos / "k" / "noise.mp4"
    index = torch.tensor([0, 3, 3, 17, 23])
    with av.open(str(path)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    frames, _ = read_frames(path, lambda count: index)
    assert np.array_equal(frames, np.stack([every[i] for i in index.tolist()]))
    assert pyav_decoder._Clip.threads == {"threads": 1}  # PyAV 14 and later would convert on every core otherwise
    for rows, columns in [
        (slice(3, 20), slice(5, 30)),
        (slice(0, 40), slice(29, 4, -1)),
        (slice(2, 10), slice(9, None, -1)),
        (slice(0, 40), slice(55, None, -1)),
    ]:
        part, _ = read_frames(path, lambda count: index, region=lambda h, w: (rows, columns))
        assert part.flags.c_contiguous and np.array_equal(part, frames[:, rows, columns])
    with pytest.raises(ZeroDivisionError):  # a bug in the caller's region comes through as itself, not a bad video
        read_frames(path, lambda count: index, region=lambda h, w: 1 / 0)
    with pytest.raises(ValueError, match="step 1 or -1") as info:
        read_frames(path, lambda count: index, region=lambda h, w: (slice(0, 9), slice(8, 0, -2)))
    assert not isinstance(info.value, decode_errors.VideoDecodeError)
    sought, _ = read_frames(path, lambda count: torch.arange(17, 24, 2), region=lambda h, w: (rows, columns))
    assert np.array_equal(sought, np.stack(every[17:24:2])[:, rows, columns])  # the seek path as well


def test_a_region_cut_before_conversion_is_the_slice_of_the_converted_frame(tmp_path, monkeypatch):
    # only the region of a 4:2:0 frame is converted (at even bounds, then trimmed): the very pixels of converting
    # the whole frame, whatever the parity of each bound, mirrored or not, on a width no SIMD block divides
    path = tmp_path / "noise.mp4"
    write_video(path, np.random.default_rng(2).integers(0, 256, (6, 66, 138, 3), np.uint8), **LOSSLESS)
    with av.open(str(path)) as container:
        every = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    cuts, cut = [], pyav_decoder._cut
    monkeypatch.setattr(pyav_decoder, "_cut", lambda frame, window: cuts.append(window) or cut(frame, window))
    index = torch.tensor([1, 4, 4])
    rng = np.random.default_rng(0)
    for top, left in [(0, 0), (1, 0), (0, 1), (1, 1), (3, 7)]:
        for bottom, right in [(66, 138), (65, 137), (41, 100), (40, 101)]:
            mirror = bool(rng.integers(2))
            columns = slice(right - 1, left - 1 if left else None, -1) if mirror else slice(left, right)
            cuts.clear()
            part, _ = read_frames(path, lambda count: index, region=lambda h, w: (slice(top, bottom), columns))
            assert np.array_equal(part, every[index][:, top:bottom, columns]), (top, bottom, left, right, mirror)
            assert cuts and all(window[0] % 2 == window[2] % 2 == 0 for window in cuts)


def test_a_frame_with_an_odd_side_is_converted_whole():
    # FFmpeg converts a 4:2:0 frame of an odd side otherwise than block by block: converted whole, RGB even mirrored
    rgb = np.random.default_rng(4).integers(0, 256, (55, 76, 3), np.uint8)
    for height, width in [(55, 76), (54, 75)]:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:height, :width]), format="rgb24").reformat(
            format="yuv420p"
        )
        whole = frame.to_ndarray(format="rgb24")
        for columns in (slice(3, 41), slice(40, 2, -1)):
            clip = pyav_decoder._Clip([0], lambda h, w: (slice(1, 50), columns))
            clip(0, frame)
            assert clip.window is None and not clip.bgr and np.array_equal(clip.frames()[0], whole[1:50, columns])
    empty = pyav_decoder._Clip([0], lambda h, w: (slice(0, 0), slice(9, 4, -1)))  # nothing to mirror
    empty(0, frame)
    assert empty.frames().shape == (1, 0, 5, 3)


def _write_b_frame_video(path: Path, codec: str, count: int = 64, gop: int = 32) -> np.ndarray:
    """A lossy video with B-frames (x264's defaults; mpeg4 with 2 B-frames), frames of moving noise; returns
    every frame as PyAV decodes them, one by one."""
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 256, (HEIGHT, WIDTH + count, 3), np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.gop_size = gop
        if codec == "mpeg4":
            stream.codec_context.max_b_frames = 2
        for t in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, t : t + WIDTH]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_frames_no_clip_takes_are_skipped_and_the_rest_are_exact(tmp_path, monkeypatch, codec):
    path = tmp_path / "b.mp4"
    every = _write_b_frame_video(path, codec)
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.skip_frame = "NONREF"
        kinds = [str(frame.pict_type) for frame in container.decode(video=0)]
    assert len(kinds) < len(every) - 10  # the file has frames that no frame refers to
    decoded = []
    original = pyav_decoder._decode_skipping

    def counting(*args):
        for frame in original(*args):
            decoded.append(frame.pts)
            yield frame

    sought = []
    seek = pyav_decoder._decode_after_seek
    monkeypatch.setattr(pyav_decoder, "_decode_skipping", counting)
    monkeypatch.setattr(pyav_decoder, "_decode_after_seek", lambda *args: sought.append(seek(*args)) or sought[-1])
    for index in (torch.arange(33, 64, 4), torch.arange(40, 56, 2), torch.tensor([50, 35, 35, 63])):
        decoded.clear()
        sought.clear()
        frames, _ = read_frames(path, lambda count: index)
        if codec == "libx264":  # the seek path gave the frames: no fallback to decoding from the start
            assert sought == [True]
        assert np.array_equal(frames, every[index.numpy()])  # the frames of decoding every one, one by one
        span = int(index.max()) - 32 + 1  # from the key frame at 32 through the last needed frame
        if codec == "libx264":  # H.264: a non-reference frame the clip does not take is not decoded
            assert len(set(index.tolist())) <= len(decoded) < span - 4, (len(decoded), span)
        # other codecs decode every frame (their skip_frame is not trusted here): the same frames


def test_a_clip_given_a_frame_twice_is_not_complete():
    clip = pyav_decoder._Clip([5, 6, 6], None)  # two frames at one position are time stamps that disagree: decode again
    clip._note(5)
    assert not clip.complete
    clip._note(6)
    assert clip.complete
    clip._note(5)
    assert not clip.complete


def test_decoding_runs_on_one_thread_and_frame_positions_round_as_fractions(videos):
    with pyav_decoder._open_video(videos / "k" / "a.mp4") as container:
        context = container.streams.video[0].codec_context
        assert context.thread_count == 1
    rng = np.random.default_rng(0)
    for start, rate in [
        (0, Fraction(1, 512) * 25),
        (-1024, Fraction(1001, 30000) * Fraction(30000, 1001)),
        (7, Fraction(1, 90000) * Fraction(30000, 1001)),
        (3, Fraction(1, 2)),
    ]:
        position = pyav_decoder._frame_position(start, rate)
        for pts in [*rng.integers(-5000, 100000, 500).tolist(), start, start + 1, start - 1, start + 3]:
            assert position(pts) == round((pts - start) * rate), (pts, start, rate)


def test_an_unknown_or_unavailable_decoder_is_one_line_naming_it(tmp_path, videos, monkeypatch):
    with pytest.raises(ValueError, match="decoder must be one of .'pyav', 'torchcodec'.; got 'ffmpeg'"):
        _dataset(tmp_path, videos, ["k/a.mp4 0"], decoder="ffmpeg")
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if it were not installed
    with pytest.raises(decode_errors.DecoderUnavailable) as info:
        _dataset(tmp_path, videos, ["k/a.mp4 0"], decoder="torchcodec")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert str(info.value).startswith("decoder 'torchcodec' needs torchcodec (the release built for torch ")
    assert "apt install ffmpeg" in str(info.value) and "torchcodec.decoders" in str(info.value)


@needs_torchcodec
@pytest.mark.parametrize(
    "name, index",
    [("noise.mp4", [0, 4, 4, 11, 23]), ("a.mp4", list(range(20, 40, 3))), ("short.mp4", [0, 1, 2, 3, 4, 4, 4])],
)
def test_torchcodec_decodes_the_frames_pyav_decodes(videos, name, index):
    path = videos / "k" / name
    for region in (None, lambda h, w: (slice(2, 30), slice(40, 9, -1))):
        frames = {
            d: read_frames(path, lambda count: torch.tensor(index), region=region, decoder=d) for d in decoders.DECODERS
        }
        assert np.array_equal(frames["pyav"][0], frames["torchcodec"][0])  # pixel for pixel
        assert frames["torchcodec"][1].tolist() == index


@needs_torchcodec
@pytest.mark.parametrize("split", ["train", "test"])
def test_dataset_items_are_the_same_with_either_decoder(tmp_path, videos, split):
    lines = ["k/noise.mp4 0", "k/corrupt.mp4 1", "k/a.mp4 2", "k/short.mp4 3"]
    options = dict(seed=2) if split == "train" else dict(split="test", test_clips=2, test_crops=3, test_scale=40)
    data = {d: _dataset(tmp_path, videos, lines, decoder=d, **options) for d in decoders.DECODERS}
    for epoch in (0, 1):
        for d in data.values():
            d.set_epoch(epoch)
        for i in range(len(data["pyav"])):
            a, b = data["pyav"][i], data["torchcodec"][i]
            assert all(torch.equal(a[key], b[key]) for key in a), (epoch, i)
    assert data["torchcodec"]._corrupt.keys() == {1}  # the corrupt file is one for torchcodec too


@pytest.mark.parametrize("split", ["train", "test"])
def test_uint8_items_normalise_to_the_float_items_and_stack_as_they_lie(tmp_path, videos, split):
    """normalize=False (what the trainer builds): the uint8 clip, frames-last in memory; normalising it (on the
    device) gives the float item exactly, and a batch stacks without a per-pixel transpose."""
    lines = ["k/noise.mp4 0", "k/a.mp4 1", "k/portrait.mp4 2"]
    options = dict(seed=4) if split == "train" else dict(split="test", test_clips=2, test_crops=3, test_scale=40)
    floats, uint8 = (_dataset(tmp_path, videos, lines, normalize=n, **options) for n in (True, False))
    items = [uint8[i] for i in range(len(uint8))]
    for i, item in enumerate(items):
        assert item["clip"].dtype == torch.uint8 and item["clip"].permute(1, 2, 3, 0).is_contiguous()
        assert torch.equal(transforms.normalize(item["clip"]), floats[i]["clip"]), i
    batch = collate(items[:3])
    assert list(batch) == list(items[0]) and batch["clip"].shape == (3, 3, 4, 32, 32)
    assert batch["clip"].permute(0, 2, 3, 4, 1).is_contiguous()  # stacked as the items lie
    assert torch.equal(transforms.normalize(batch["clip"]), torch.stack([floats[i]["clip"] for i in range(3)]))
    assert torch.equal(batch["label"], torch.stack([item["label"] for item in items[:3]]))
    in_workers = next(iter(DataLoader(uint8, batch_size=3, num_workers=2, collate_fn=collate)))
    assert all(torch.equal(in_workers[key], batch[key]) for key in batch)  # through shared memory as well
    assert collate([{"a": 1}, {"a": 2}])["a"].tolist() == [1, 2]  # items without clips as well
    assert [t.tolist() for t in collate([(1, 2), (3, 4)])] == [t.tolist() for t in default_collate([(1, 2), (3, 4)])]
    float_batch = collate([floats[i] for i in range(3)])  # anything else: default_collate's batch
    assert float_batch["clip"].is_contiguous() and torch.equal(transforms.normalize(batch["clip"]), float_batch["clip"])
