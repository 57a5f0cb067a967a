"""Re-encode the videos of a list for fast training: a small short side, a key frame every few frames.

One file because it is one command's pipeline: reading the list, planning, encoding and the parallel runner of
``prepare-videos``, each step feeding the next.

Training reads a clip of 64 consecutive frames at a random position. Decoding starts at the key frame before it,
so a source with a key frame every 250 frames costs up to 250 decoded frames per clip, and a 720p frame costs
several times a 256p one. :func:`prepare_videos` re-encodes every video of a list (libx264, yuv420p, no audio)
so that

* the short side is ``short_side`` (aspect ratio kept, both sides even; a source at or below it keeps its size,
  odd sides rounded down to even): scaled in uint8 by FFmpeg's scaler (bicubic, FFmpeg's own default);
* a key frame comes every ``gop`` frames, exactly (no scene-cut key frames, the source's frame types ignored);
* every decoded frame is kept, with the source's frame rate and time stamps (shifted to start at 0): the dataset
  samples by frame index, so frame ``i`` of the output is frame ``i`` of the source;
* one slice a frame (x264's frame threads), as downloaded videos have: the dataset decodes on one thread, for
  which slices would only cost compression;
* five B-frames between reference frames, none of them a reference (libx264 with ``bframes=5``, ``b-adapt=0``,
  ``b-pyramid=none``): a clip does not decode the B-frames it does not take (see
  :func:`~nonlocalnet.data.decoders.read_frames`), so a training item decodes fewer frames; five is where more
  B-frames stopped saving decode time while the quality at the same ``crf`` kept falling slightly (the data
  benchmark, ``python -m benchmarks.data``, measures the items);
* with ``fast_decode``, libx264's ``tune=fastdecode`` (no CABAC, no deblocking filter, no weighted prediction):
  faster to decode, for somewhat larger files at the same ``crf`` and without the deblocking filter's smoothing
  of block edges, so it is a choice, not the default.

The outputs keep the list's relative paths under the output root, with the extension ``.mp4``, and the new list
(the same lines with the new paths, the labels as they were) is written there under the list's file name.

A run is resumable: each output is written under a temporary name beside it and renamed when complete, so an
output that exists is complete and is skipped by the next run. A video that cannot be read is not fatal: it is
left out of the new list and named, with the reason, in the report ``<list stem>_prepare_report.json``. The
report records the settings, and a later run into the same output root with other settings is refused (its
outputs would mix two sizes).

List lines follow :func:`~nonlocalnet.data.video_list.read_video_list`: ``path label`` (the label is the last field,
so the path may contain spaces; the label may be comma-separated, ``path 3,17,42``), or with ``multi_label``
``path 3 17 42`` (the path is the first field). Labels are kept as written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path, PurePosixPath

import av

from ..io import atomic_path, write_text_atomic
from .decode_errors import VideoDecodeError
from .video_list import parse_list_line, read_list_text

DEFAULT_SHORT_SIDE = 256
DEFAULT_GOP = 16
DEFAULT_CRF = 23
B_FRAMES = 5  # non-reference B-frames between references (see the module docstring)
REPORT_SUFFIX = "_prepare_report.json"
SETTINGS = ("short_side", "gop", "crf", "fast_decode")


class EncodeError(RuntimeError):
    """The encoder wrote a file that is not what was asked (another frame count)."""


# ----------------------------------------------------------------------------------------------------------------
# the list


@dataclasses.dataclass(frozen=True)
class ListLine:
    """One line of a list file.

    Attributes:
        number: the line number (from 1).
        text: the line without its end of line.
        path: the video's path as written, or None for a blank or ``#`` comment line.
        rest: what follows the path on the line, verbatim (the labels, with the white space before them).
    """

    number: int
    text: str
    path: str | None = None
    rest: str = ""


def read_list_lines(list_file: str | os.PathLike, *, multi_label: bool = False) -> list[ListLine]:
    """The lines of a video list, each video's path split from its labels.

    Args:
        list_file: the list file.
        multi_label: the path is the first field and every other field is labels (Charades with space-separated
            labels); otherwise the last field is the label (the path may contain spaces).

    Raises:
        FileNotFoundError: no such list file.
        ValueError: a line without labels, a label that is not a non-negative integer, or an absolute path or one
            that leaves its root (``..``), naming the file and the line number.
    """
    list_file = Path(list_file)
    lines: list[ListLine] = []
    for number, text in enumerate(read_list_text(list_file), start=1):
        parsed = parse_list_line(text, f"{list_file}, line {number}", multi_label)
        if parsed is None:
            lines.append(ListLine(number, text))
            continue
        line = text.strip()
        path = parsed[0]
        lines.append(ListLine(number, text, path, line[len(path) :]))
    if not any(line.path is not None for line in lines):
        raise ValueError(f"{list_file} lists no video")
    return lines


def output_path(path: str) -> str:
    """The relative path of a listed video's output: the same path with the extension ``.mp4``."""
    return PurePosixPath(path).with_suffix(".mp4").as_posix()


# ----------------------------------------------------------------------------------------------------------------
# one video


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
    """What :func:`encode_video` wrote: frames, width, height."""

    frames: int
    width: int
    height: int


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the output of a ``width`` x ``height`` source.

    The short side becomes ``short_side`` and the long side keeps the aspect ratio (rounded to the nearest even
    number); a source whose short side is at most ``short_side`` keeps its size (never upscaled), an odd side
    rounded down to even (yuv420p needs even sides).
    """
    short = min(width, height)
    if short <= short_side:
        return max(2, width // 2 * 2), max(2, height // 2 * 2)

    def scaled(side: int) -> int:
        return short_side if side == short else max(2, 2 * math.floor(side * short_side / short / 2 + 0.5))

    return scaled(width), scaled(height)


def check_settings(short_side: int, gop: int, crf: int) -> None:
    """Raises ValueError for a setting the encoder cannot take."""
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side must be an even number >= 2 (yuv420p needs even sides); got {short_side}")
    if gop < 1:
        raise ValueError(f"gop must be >= 1; got {gop}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51] (libx264: 0 lossless, 23 its default, 51 worst); got {crf}")


def probe_size(src: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a video's first video stream, read from the container (nothing decoded).

    Raises:
        VideoDecodeError: the file cannot be opened or has no video stream.
    """
    with _open_source(Path(src)) as container:
        context = container.streams.video[0].codec_context
        return context.width, context.height


def encode_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    short_side: int = DEFAULT_SHORT_SIDE,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
    fast_decode: bool = False,
    threads: int = 0,
) -> EncodedVideo:
    """Re-encode one video (see the module docstring): H.264 yuv420p in an .mp4, no audio.

    ``dst`` is written under a temporary name beside it and renamed when complete; on any error ``dst`` keeps
    what it had (or stays absent). Temporary files an interrupted earlier run left for ``dst`` are removed.

    Args:
        src: the source video (anything FFmpeg reads).
        dst: the output .mp4 (its folder is created).
        short_side: the output's short side (see :func:`target_size`); even.
        gop: frames from one key frame to the next.
        crf: libx264's constant rate factor (quality: 0 lossless, 23 its default, higher is smaller and worse).
        fast_decode: libx264's ``tune=fastdecode`` (see the module docstring).
        threads: threads for decoding, scaling and encoding; 0 lets FFmpeg choose.

    Raises:
        VideoDecodeError: the source cannot be opened or decoded, or it has no video frame.
        EncodeError: the output does not have the source's frame count.
    """
    check_settings(short_side, gop, crf)
    src, dst = Path(src), Path(dst)
    with _open_source(src) as container:
        source = container.streams.video[0]
        # slice threads only: FFmpeg 8 (PyAV 18) can hang freeing a frame-threaded decoder stopped mid-stream (an
        # interrupted run, seen in this project's tests), and x264's encoding, not the decode, is the cost here
        source.thread_type = "SLICE"
        source.codec_context.thread_count = threads
        rate = source.average_rate or source.guessed_rate or Fraction(25)
        time_base = source.time_base or Fraction(1, 1) / rate
        step = max(1, round(1 / (rate * time_base)))  # one frame's duration in time_base units
        for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # left by an interrupted run (see io.atomic_path)
            stale.unlink(missing_ok=True)
        with atomic_path(dst) as tmp:
            with av.open(str(tmp), "w", format="mp4") as output:
                stream, count, first, last = None, 0, None, None
                for frame in _decode(src, container, source):
                    if stream is None:  # sized by the first decoded frame (a container may not know the size)
                        width, height = target_size(frame.width, frame.height, short_side)
                        stream = _add_stream(
                            output, source, width, height, rate, time_base, gop, crf, fast_decode, threads
                        )
                    scaled = frame.reformat(
                        width=width, height=height, format="yuv420p", interpolation="BICUBIC", threads=threads
                    )
                    scaled.pict_type = av.video.frame.PictureType.NONE  # else the encoder copies the source's
                    if frame.pts is not None and first is None:
                        first = frame.pts
                    pts = None if frame.pts is None else frame.pts - first
                    if pts is None or (last is not None and pts <= last):
                        pts = 0 if last is None else last + step  # missing or repeated time stamps: one frame on
                    scaled.pts, scaled.time_base, last = pts, time_base, pts
                    for packet in stream.encode(scaled):
                        output.mux(packet)
                    count += 1
                if stream is None:
                    raise VideoDecodeError(f"{src}: no decodable video frame")
                for packet in stream.encode():
                    output.mux(packet)
            with av.open(str(tmp)) as check:
                written = check.streams.video[0].frames
            if written != count:
                raise EncodeError(f"{src}: decoded {count} frames but the output holds {written}")
    return EncodedVideo(count, width, height)


def _add_stream(
    output,
    source,
    width: int,
    height: int,
    rate: Fraction,
    time_base: Fraction,
    gop: int,
    crf: int,
    fast_decode: bool,
    threads: int,
) -> av.video.stream.VideoStream:
    """The H.264 stream of ``output``: ``width`` x ``height`` yuv420p, the source's rate and colour tags."""
    stream = output.add_stream("libx264", rate=rate)
    context = stream.codec_context
    context.width, context.height, context.pix_fmt = width, height, "yuv420p"
    context.time_base = time_base
    context.gop_size = gop
    # x264's frame threads: one slice a frame, as downloaded videos have (PyAV's default, slice threads, cuts
    # every frame into one slice per thread, which costs compression and gains nothing for a reader that
    # decodes on one thread, as the dataset's do)
    context.thread_type, context.thread_count = "FRAME", threads
    for tag in ("colorspace", "color_primaries", "color_trc"):  # the same matrix: the same RGB when decoded
        setattr(context, tag, getattr(source.codec_context, tag))
    # a key frame exactly every gop frames: none at scene cuts, none where the source had one (see pict_type);
    # five B-frames between references, none of them a reference (no adaptive B-frames, no B-pyramid), so that
    # a clip skips the B-frames it does not take (see pyav_decoder.read_frames_pyav)
    context.max_b_frames = B_FRAMES
    stream.options = {
        "crf": str(crf),
        "keyint_min": str(gop),
        "sc_threshold": "0",
        "b-pyramid": "none",
        "x264-params": "b-adapt=0",
        **({"tune": "fastdecode"} if fast_decode else {}),
    }
    return stream


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[av.container.InputContainer]:
    """An open container with a video stream; a file that is missing or cannot be opened is a VideoDecodeError."""
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(f"{path}: cannot open ({type(err).__name__}: {err})") from err
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        yield container


def _decode(path: Path, container, stream) -> Iterator[av.VideoFrame]:
    """The frames of ``stream``; what FFmpeg raises while decoding becomes a VideoDecodeError."""
    frames = container.decode(stream)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except (av.error.FFmpegError, ValueError) as err:
            raise VideoDecodeError(f"{path}: cannot decode ({type(err).__name__}: {err})") from err
        yield frame


# ----------------------------------------------------------------------------------------------------------------
# a whole list


@dataclasses.dataclass(frozen=True)
class Job:
    """One output to make: ``src`` -> ``dst``, for the list lines ``lines``."""

    src: Path
    dst: Path
    name: str  # the path as listed
    lines: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PreparePlan:
    """What :func:`prepare_videos` would do: the list's lines, the outputs still to make and those done."""

    list_file: Path
    src_root: Path
    dst_root: Path
    lines: list[ListLine]
    todo: list[Job]
    done: list[Job]

    @property
    def new_list(self) -> Path:
        return self.dst_root / self.list_file.name

    @property
    def report_file(self) -> Path:
        return self.dst_root / f"{self.list_file.stem}{REPORT_SUFFIX}"


@dataclasses.dataclass
class PrepareReport:
    """What :func:`prepare_videos` did.

    Attributes:
        converted: videos encoded by this run.
        skipped: videos whose output existed (done by an earlier run).
        failed: ``{"name", "lines", "reason"}`` of each video that could not be read; left out of the new list.
        listed: videos in the new list.
        new_list: the new list file (None when no video could be listed: it is not written).
        report_file: the JSON report.
        settings: ``short_side``, ``gop``, ``crf`` and ``fast_decode`` of the outputs.
    """

    converted: int
    skipped: int
    failed: list[dict]
    listed: int
    new_list: Path | None
    report_file: Path
    settings: dict

    def summary(self) -> str:
        where = f"{self.new_list} ({self.listed} videos)" if self.new_list else "no new list (no video left)"
        return (
            f"{self.converted} converted, {self.skipped} skipped (already done), {len(self.failed)} failed; "
            f"{where}; report {self.report_file}"
        )

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "converted": self.converted,
            "skipped": self.skipped,
            "failed_count": len(self.failed),
            "listed": self.listed,
            "new_list": None if self.new_list is None else str(self.new_list),
            "failed": self.failed,
        }


def plan_preparation(
    list_file: str | os.PathLike,
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    *,
    multi_label: bool = False,
    short_side: int = DEFAULT_SHORT_SIDE,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
    fast_decode: bool = False,
) -> PreparePlan:
    """Read the list and sort its videos into outputs to make and outputs that exist; writes nothing.

    Raises:
        FileNotFoundError: no list file or no source root.
        ValueError: a bad list line (file and line named), a bad setting, two videos with the same output, an
            output root that is the source root, or one prepared earlier with other settings.
    """
    check_settings(short_side, gop, crf)
    list_file, src_root, dst_root = Path(list_file), Path(src_root), Path(dst_root)
    lines = read_list_lines(list_file, multi_label=multi_label)
    if not src_root.is_dir():
        raise FileNotFoundError(2, "no such source folder", str(src_root))
    if dst_root.resolve() == src_root.resolve():
        raise ValueError(
            f"the output root {dst_root} is the source root: give another folder (outputs would replace their sources)"
        )
    if (dst_root / list_file.name).resolve() == list_file.resolve():
        raise ValueError(f"the new list would replace the list {list_file} itself: give another output root")
    _check_earlier_settings(dst_root, {"short_side": short_side, "gop": gop, "crf": crf, "fast_decode": fast_decode})
    jobs: dict[Path, Job] = {}
    for line in lines:
        if line.path is None:
            continue
        job = Job(src_root / line.path, dst_root / output_path(line.path), line.path, (line.number,))
        seen = jobs.get(job.dst)
        if seen is not None and seen.src != job.src:
            raise ValueError(
                f"{list_file}, lines {seen.lines[0]} and {line.number}: {seen.name!r} and {line.path!r} "
                f"would both be written to {job.dst}"
            )
        jobs[job.dst] = job if seen is None else dataclasses.replace(seen, lines=seen.lines + (line.number,))
    done = [job for job in jobs.values() if job.dst.is_file()]
    todo = [job for job in jobs.values() if not job.dst.is_file()]
    return PreparePlan(list_file, src_root, dst_root, lines, todo, done)


def _check_earlier_settings(dst_root: Path, settings: dict) -> None:
    for report in sorted(dst_root.glob(f"*{REPORT_SUFFIX}")) if dst_root.is_dir() else []:
        try:
            earlier = json.loads(report.read_text()).get("settings", {})
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(earlier, dict):
            continue
        # a report records every setting: one it lacks is unknown, so the videos may differ
        differ = [
            f"{k} {earlier[k] if k in earlier else '(not recorded)'} (now {settings[k]})"
            for k in SETTINGS
            if k not in earlier or earlier[k] != settings[k]
        ]
        if differ:
            raise ValueError(
                f"{dst_root} holds videos prepared with other settings ({', '.join(differ)}; see "
                f"{report}): give another output root, or the same settings"
            )


def prepare_videos(
    list_file: str | os.PathLike,
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    *,
    short_side: int = DEFAULT_SHORT_SIDE,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
    fast_decode: bool = False,
    workers: int | None = None,
    multi_label: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Re-encode every video of a list into ``dst_root`` and write the new list and the report there.

    Args:
        list_file: the video list (``path label`` lines, paths relative to ``src_root``).
        src_root: the folder the list's paths are relative to.
        dst_root: the output root: the same relative paths with ``.mp4``, the new list (the list's file name) and
            the report ``<list stem>_prepare_report.json``.
        short_side: the output's short side (sources at or below it keep their size).
        gop: frames from one key frame to the next.
        crf: libx264's constant rate factor.
        fast_decode: libx264's ``tune=fastdecode``: faster decoding, somewhat larger files (module docstring).
        workers: processes encoding in parallel (default: ``min(4, os.cpu_count())``; 1 encodes in this process).
        multi_label: Charades-style lines with space-separated labels (the path is the first field).
        progress: show a progress bar.

    Returns:
        The report. A video that cannot be read is in ``failed`` and not in the new list; the new list is not
        written when no video is left (``listed == 0``).

    Raises:
        FileNotFoundError, ValueError: as :func:`plan_preparation`.
        ValueError: a worker process died (a crash in FFmpeg); a rerun resumes where it stopped.
    """
    from tqdm.auto import tqdm

    settings = {"short_side": short_side, "gop": gop, "crf": crf, "fast_decode": bool(fast_decode)}
    plan = plan_preparation(list_file, src_root, dst_root, multi_label=multi_label, **settings)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    workers = min(workers, max(1, len(plan.todo)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    failed: dict[Path, str] = {}
    with tqdm(
        total=len(plan.todo), desc="prepare-videos", unit="video", dynamic_ncols=True, disable=not progress
    ) as bar:
        for job, reason in _run_jobs(plan.todo, settings, workers, threads):
            if reason is not None:
                failed[job.dst] = reason
            bar.update(1)

    kept = [line for line in plan.lines if line.path is None or (plan.dst_root / output_path(line.path)) not in failed]
    listed = sum(line.path is not None for line in kept)
    new_list = None
    if listed:
        new_list = plan.new_list
        write_text_atomic(
            new_list,
            "".join((line.text if line.path is None else output_path(line.path) + line.rest) + "\n" for line in kept),
        )
    jobs = {job.dst: job for job in plan.todo}
    report = PrepareReport(
        converted=len(plan.todo) - len(failed),
        skipped=len(plan.done),
        failed=[
            {"name": jobs[dst].name, "lines": list(jobs[dst].lines), "reason": reason}
            for dst, reason in sorted(failed.items(), key=lambda item: jobs[item[0]].lines)
        ],  # list order
        listed=listed,
        new_list=new_list,
        report_file=plan.report_file,
        settings=settings,
    )
    write_text_atomic(plan.report_file, json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _encode_job(job: Job, settings: dict, threads: int) -> tuple[Job, str | None]:
    """(job, None) once its output is written, or (job, why the source could not be used)."""
    try:
        encode_video(job.src, job.dst, threads=threads, **settings)
    except (VideoDecodeError, EncodeError) as err:
        return job, str(err).removeprefix(f"{job.src}: ")
    except av.error.FFmpegError as err:  # the encoder refused what the source gave (a size, a format)
        return job, f"cannot encode ({type(err).__name__}: {err})"
    return job, None


def _run_jobs(jobs: Sequence[Job], settings: dict, workers: int, threads: int) -> Iterator[tuple[Job, str | None]]:
    """(job, failure or None) for every job, in the order they finish."""
    if workers == 1:
        for job in jobs:
            yield _encode_job(job, settings, threads)
        return
    # spawn: the parent may hold threads (tqdm, torch), which a fork would copy in an unknown state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_encode_job, job, settings, threads) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise ValueError(
                "a worker process died (a crash in FFmpeg on one of the videos?); finished outputs "
                "are kept: rerun to resume, with --workers 1 to find the video"
            ) from None
        finally:
            for future in futures:
                future.cancel()
