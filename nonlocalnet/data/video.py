"""Real videos from a list file (Kinetics / Charades style), decoded with PyAV (or torchcodec) into the paper's
clips.

List files (one video a line, blank lines and lines starting with ``#`` ignored):

* single label (Kinetics, the mmaction2 / PySlowFast format): ``relative/path.mp4 label`` where ``label`` is an
  integer in ``[0, num_classes)``; the path may contain spaces (the label is the last field);
* multi-label (Charades, ``multi_label=True``): ``relative/path.mp4 3,17,42`` (comma-separated labels) or
  ``relative/path.mp4 3 17 42`` (mmaction2's space-separated variant); the path is the first field.

Paths are relative to ``root`` (an absolute path is kept as it is). A malformed line or a label out of range is
an error naming the list file and the line number. Missing video files are all reported in one error at
construction (the first 20 and the count), or dropped with a warning when ``skip_missing=True``.

Items are dicts that ``default_collate`` stacks:

* ``clip``: (3, T, H, W) float32, RGB 0-255 normalised with ``(x - 114.75) / 57.375``; with
  ``normalize=False`` the uint8 RGB clip itself, laid out (T, H, W, 3) in memory (:func:`transforms.frames_last
  <nonlocalnet.data.transforms.frames_last>`), for normalising on the device after a 4x smaller copy (the
  trainer does; :func:`transforms.normalize <nonlocalnet.data.transforms.normalize>` gives the same values, on
  CUDA within one unit in the last place);
* ``label``: int64 scalar (single label) or float32 multi-hot (num_classes,);
* ``video``: int64, the index in the list of the video the clip was actually taken from;
* ``skipped``: int64, how many corrupt videos were skipped while producing this item.
* ``skipped_ids``: int64 ``(max_retries + 1,)``, their indices (padded with -1).

Train split: one item per video; a clip at a random temporal position (see
:func:`~nonlocalnet.data.transforms.train_clip_indices`), short side scaled to a random value in ``train_scale``,
a random ``crop_size``² crop and a random horizontal flip, taken as the matching square of the decoded frame so
that only it is converted, copied and scaled (:func:`~nonlocalnet.data.transforms.random_scaled_crop`; the same
distribution of crops up to whole source pixels). The random choices of item ``index`` come from
generators seeded with ``(seed, epoch, index, attempt)`` (call :meth:`VideoListDataset.set_epoch` each epoch), so
an item is the same in every run, in every DataLoader worker and after a resume.

Test split: ``len = videos × test_clips × test_crops``; item ``i`` is view ``(video, clip k, crop j)`` with
``video, rest = divmod(i, test_clips * test_crops)`` and ``k, j = divmod(rest, test_crops)``: clip ``k`` of
``test_clips`` evenly spaced in time, short side ``test_scale``, crop ``j`` of ``test_crops`` along the long side
(left / centre / right, or top / centre / bottom for portrait frames; one crop is the centre crop), or the full
frame when ``crop_size=None`` (fully-convolutional testing; frames of different sizes then need batch size 1).

Short videos: frame indices past the end repeat the last frame (PySlowFast's clamping). A video that cannot be
opened or has no decodable frame is *corrupt*: it is logged (a warning with its path, once per process),
counted in the item's ``skipped`` and replaced:

* in training by another video drawn from the item's generator (so the replacement is reproducible too);
* at test time by the next video in the list (``(video + 1) % len(videos)``) with the same clip and crop index.
  The item's ``video`` then names the replacement, so scores aggregated by ``video`` stay honest: the corrupt
  video gets no view at all (the evaluator sees fewer videos than the list has), and the replacement gets
  some views twice, which the per-video averaging of scores absorbs.

Each item says which corrupt videos it passed over (``skipped_ids``), so a run counts distinct corrupt videos,
not attempts. An error is raised only when every video of the list is corrupt, or in training when
``max_retries + 1`` draws in a row fail (the item's own and ``max_retries`` replacements), naming the last ones.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import av
except ImportError:  # a declared dependency; without it (a machine's own torch, used as it is) only videos fail
    av = None
from torch.utils.data import Dataset

from nonlocalnet.data import transforms

from .video_list import parse_list_line, read_list_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
MISSING_SHOWN = 20


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or yields no decodable frame."""


class DecoderUnavailable(ImportError, ValueError):
    """The decoder a dataset or config asks for cannot run here (a user's choice, hence also a ValueError)."""


class CorruptData(ValueError):
    """So many corrupt videos that an item cannot be made: every video of the list, or ``max_retries + 1``
    training draws in a row."""


# ----------------------------------------------------------------------------------------------------------------
# list files


def read_video_list(
    list_file: str | Path, *, num_classes: int, multi_label: bool = False
) -> list[tuple[str, int | tuple[int, ...]]]:
    """Parse a Kinetics-style (``path label``) or Charades-style (``path 3,17,42``) list file (the one format
    of :mod:`nonlocalnet.data.video_list`, which ``prepare-videos`` reads too).

    Args:
        list_file: the text file.
        num_classes: labels must lie in ``[0, num_classes)``.
        multi_label: Charades style, several labels per video (comma- or space-separated, at least one).

    Returns:
        ``(relative path, label)`` per video, in file order; the label is an int, or a sorted tuple of distinct
        ints when ``multi_label``.

    Raises:
        FileNotFoundError: no such list file.
        ValueError: a malformed line, a label out of range, a path outside the root, or bytes that are not UTF-8,
            naming the file and the line number.
    """
    list_file = Path(list_file)
    entries: list[tuple[str, int | tuple[int, ...]]] = []
    for number, line in enumerate(read_list_text(list_file), start=1):
        where = f"{list_file}, line {number}"
        parsed = parse_list_line(line, where, multi_label)
        if parsed is None:
            continue
        path, labels = parsed
        for label in labels:
            if label >= num_classes:
                raise ValueError(f"{where}: label {label} out of range [0, {num_classes})")
        entries.append((path, tuple(sorted(set(labels))) if multi_label else labels[0]))
    if not entries:
        raise ValueError(f"{list_file} lists no video")
    return entries


# ----------------------------------------------------------------------------------------------------------------
# decoding


def read_frames(
    path: str | Path,
    sample: Callable[[int], Tensor],
    *,
    seek: bool = True,
    region: Region | None = None,
    decoder: str = "pyav",
) -> tuple[np.ndarray, Tensor]:
    """Decode only the frames of a video that a clip needs, as RGB (of only the region a clip keeps).

    The number of frames comes from the container (``stream.frames``, else duration × frame rate); ``sample`` maps
    it to frame indices, and frames are decoded in order up to the last index needed, on one thread. When the first
    index is far enough from the start (``seek``), the decoder first jumps to the key frame before it, and frame
    indices are read from time stamps (exact for constant frame rate; any inconsistency -- no time stamps, a jump
    past the first needed frame, a gap -- falls back to decoding from the start); there, an H.264 frame that no
    other frame refers to is not decoded at all unless the clip takes it (the others are the same either way: no
    frame depends on it). When the container's count is wrong (the video ends before a needed frame) or missing, the
    decodable frames are counted (a video that is cut short, as a partly downloaded one, thus gives the frames it
    has), ``sample`` is called again with the true count and the needed frames are decoded again from the start.

    Args:
        path: the video file.
        sample: frame count -> (T,) int64 indices in ``[0, count - 1]``; called once or twice, it must give the
            same indices for the same count. What it raises (a bug or a bad option, not a bad video) comes
            through as it is.
        seek: allow seeking.
        region: (frame height, frame width) -> (rows, columns), the slices of every frame to keep; a step of -1
            mirrors. Only the region is copied out of each converted frame. Called once per pass with the same
            size, it must give the same slices. None keeps whole frames.
        decoder: ``"pyav"`` (the default) or ``"torchcodec"`` (the same frames, pixel for pixel, where the
            container's frame count is right; torchcodec always counts the decodable frames, and may rescale frames
            that change size where PyAV raises; it needs torchcodec and FFmpeg's shared libraries, see
            :func:`check_decoder`).

    Returns:
        (frames (T, H, W, 3) uint8 RGB, contiguous, the indices used).

    Raises:
        VideoDecodeError: the file cannot be opened or decoded, it has no video frame, or its frames change size.
    """
    if decoder == "torchcodec":
        return _read_frames_torchcodec(path, sample, region)
    if decoder != "pyav":
        raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
    with _open_video(path) as container:
        stream = container.streams.video[0]
        count = _frame_count(container, stream)
        if count:
            index = sample(count)
            frames = _decode_clip(path, container, stream, index, seek=seek, region=region)
            if frames is not None:
                return frames, index
    # no frame count, or a wrong one (the video ended before a needed frame): count the decodable frames
    # (without keeping them, long videos stay cheap in memory), then decode the needed ones
    count = _count_decodable_frames(path)
    if count == 0:
        raise VideoDecodeError(f"{path}: no decodable video frame")
    index = sample(count)
    with _open_video(path) as container:
        frames = _decode_clip(path, container, container.streams.video[0], index, seek=False, region=region)
    if frames is None:
        raise VideoDecodeError(f"{path}: decoded {count} frames, then fewer on a second pass")
    return frames, index


# what PyAV, torchcodec (RuntimeError, IndexError) or a frame of another size raise while reading a bad video
_DECODE_ERRORS = (OSError, ValueError, RuntimeError, IndexError, KeyError) + ((av.error.FFmpegError,) if av else ())


@contextlib.contextmanager
def _decode_errors(path: str | Path) -> Iterator[None]:
    """Turns what decoding ``path`` raises into a VideoDecodeError."""
    try:
        yield
    except VideoDecodeError:
        raise
    except _CallerError as err:  # the caller's region function failed: a bug or a bad option, not a bad video
        raise err.__cause__ from None
    except _DECODE_ERRORS as err:
        raise VideoDecodeError(f"{path}: {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def _open_video(path: str | Path) -> Iterator[av.container.InputContainer]:
    """The open container of a video with a video stream; what the caller's block raises is left as it is."""
    if av is None:
        raise ImportError("reading videos needs PyAV: pip install av")
    with _decode_errors(path):
        container = av.open(str(path))
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        _one_thread(container.streams.video[0])
        yield container


def _one_thread(stream: av.video.stream.VideoStream) -> None:
    """Decode ``stream`` on one thread: DataLoader workers are the parallelism (N workers on N cores run N
    threads), where FFmpeg's default (slice threads, as many as cores + 1, busy on files whose frames are cut
    into slices) would start that many in every worker."""
    stream.codec_context.thread_count = 1


def _count_decodable_frames(path: str | Path) -> int:
    with _open_video(path) as container, _decode_errors(path):
        return sum(1 for _ in container.decode(container.streams.video[0]))


def _decode_clip(
    path: str | Path, container, stream, index: Tensor, *, seek: bool, region: Region | None
) -> np.ndarray | None:
    """Frames ``index`` of a video, (T, H, W, 3); None if the video ends before the last of them."""
    clip = _fill_clip(path, container, stream, lambda: _Clip(index.tolist(), region), seek=seek)
    return None if clip is None else clip.frames()


def _fill_clip(path: str | Path, container, stream, new_clip: Callable[[], _Clip], *, seek: bool) -> _Clip | None:
    """A clip (``new_clip()``) given its frames: after a seek where it starts far enough from the start, else (or
    when the time stamps disagree, in a fresh container) from the first frame; None if the video ends before the
    last of them."""
    with _decode_errors(path):
        clip = new_clip()
        if seek and clip.wanted[0] >= _SEEK_MIN_FRAMES:
            if _decode_after_seek(container, stream, clip):
                return clip
            clip = new_clip()  # time stamps disagree: decode from the start of a fresh container
            with _open_video(path) as fresh:
                return clip if _decode_from_start(fresh, fresh.streams.video[0], clip) else None
        return clip if _decode_from_start(container, stream, clip) else None


Region = Callable[[int, int], "tuple[slice, slice]"]


class _CallerError(Exception):
    """Carries (as its cause) what a caller's function raised inside :func:`_decode_errors`, past it."""


class _Clip:
    """The frames ``index`` of a video, filled in as they are decoded: the region of each frame the clip takes is
    converted to RGB and copied into one (T, h, w, 3) uint8 array, at every place of ``index`` that holds it.

    One swscale context converts every frame of the clip, on one thread: recent PyAV converts on as many threads
    as the machine has cores unless told otherwise, and N DataLoader workers on N cores would each start that
    many (and frames this small convert faster on one thread than split across many). A mirrored region (of a
    4:2:0 frame with even sides, see :func:`_converted_by_blocks`; others are flipped as RGB pixels) is converted
    to BGR, copied forwards, and the clip's rows reversed byte by byte once at the end, which mirrors the pixels
    and turns BGR into RGB (a flip along the last, contiguous axis runs at memory speed, where flipping RGB pixel
    triples or copying through a negative stride does not). Of a 4:2:0 frame (H.264's), only the region is
    converted (see :func:`_crop_window`). A frame of another size than the first is an error (the clip's frames
    must stack, and its region was taken for the first size).
    """

    threads: dict[str, int] = {"threads": 1}  # {} once PyAV turns out to be older (no threads argument)

    def __init__(self, index: Sequence[int], region: Region | None) -> None:
        self.places: dict[int, list[int]] = {}
        for place, position in enumerate(index):
            self.places.setdefault(position, []).append(place)
        self.wanted = sorted(self.places)  # the frame positions to decode, in order
        self.length, self.region, self.filled = len(index), region, set()
        self.array = self.size = self.rows = self.columns = self.window = self.inner = None
        self.mirror = self.bgr = self.repeated = False
        self.reformatter = av.video.reformatter.VideoReformatter()

    def __call__(self, position: int, frame: av.VideoFrame) -> None:
        """Takes the decoded frame at ``position`` if the clip holds it."""
        places = self.places.get(position)
        if places is None:
            return
        self._note(position)
        if self.array is None:
            self._start(frame)
        elif (frame.height, frame.width) != self.size:
            raise ValueError(f"a frame of {frame.width}x{frame.height} after frames of {self.size[1]}x{self.size[0]}")
        part = None
        if self.window is not None:
            try:
                part = self._convert(_cut(frame, self.window))[self.inner]
            except _CUT_ERRORS:  # this PyAV or this frame's planes cannot be cut: whole frames from here on
                self.window = None
        if part is None:
            part = self._convert(frame)[self.rows, self.columns]
        for place in places:
            self.array[place] = part

    def _note(self, position: int) -> None:
        self.repeated |= position in self.filled
        self.filled.add(position)

    @property
    def complete(self) -> bool:
        """Every frame given, none twice (two frames at one position: time stamps that disagree)."""
        return len(self.filled) == len(self.places) and not self.repeated

    def frames(self) -> np.ndarray:
        """The clip, (T, h, w, 3) RGB, contiguous (once :attr:`complete`)."""
        if not self.mirror or self.array.size == 0:
            return self.array
        if not self.bgr:
            return _mirrored(self.array)
        rows = torch.from_numpy(self.array.reshape(*self.array.shape[:2], -1))  # (T, h, w * 3) bytes of BGR
        return rows.flip(-1).numpy().reshape(self.array.shape)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        """The frame as packed pixels: RGB, BGR for a mirrored clip (see :meth:`frames`)."""
        pixels = "bgr24" if self.bgr else "rgb24"
        try:
            return self.reformatter.reformat(frame, format=pixels, **_Clip.threads).to_ndarray()
        except TypeError as err:  # an older PyAV: no threads argument (nor threaded conversion)
            if "threads" not in str(err):
                raise
            _Clip.threads = {}
            return self.reformatter.reformat(frame, format=pixels).to_ndarray()

    def _start(self, frame: av.VideoFrame) -> None:
        height, width = frame.height, frame.width
        self.size, self.rows, self.columns = (height, width), slice(None), slice(None)
        if self.region is not None:
            try:
                self.rows, self.columns = _region_slices(self.region, height, width)
            except Exception as err:
                raise _CallerError() from err
            self.columns, self.mirror = _forwards(self.columns, width)  # a mirror: flipped at the end
            self.bgr = self.mirror and _converted_by_blocks(frame)
            self.window = _crop_window(frame, self.rows, self.columns)
            if self.window is not None:
                top, _, left, _ = self.window
                self.inner = (_shifted(self.rows, top, height), _shifted(self.columns, left, width))
        shape = np.empty((height, width), np.bool_)[self.rows, self.columns].shape
        self.array = np.empty((self.length, *shape, 3), np.uint8)


# 8-bit planar 4:2:0, one chroma sample per 2 x 2 pixels (H.264's usual format); full-range JPEG variant included
_CROPPABLE_FORMATS = ("yuv420p", "yuvj420p")
# what cutting a frame's planes raises where PyAV or NumPy cannot (PyAV before 17 has no planar from_dlpack)
_CUT_ERRORS = (AttributeError, TypeError, ValueError, NotImplementedError, BufferError, IndexError)


def _crop_window(frame: av.VideoFrame, rows: slice, columns: slice) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right): the part of a 4:2:0 frame to convert for the region (forward slices), its
    bounds made even so that it holds whole chroma samples (within the frame: its sides are even); None where the
    whole frame is converted (a frame not :func:`_converted_by_blocks`, a region with steps or empty).

    As FFmpeg converts such a frame block by block, a part cut at even bounds converts to exactly the pixels it
    has in the whole frame (tested), at a fraction of the cost: only the crop's pixels are converted
    (``python -m benchmarks.data`` measures the dataset).
    """
    if not _converted_by_blocks(frame):
        return None
    top, bottom, row_step = rows.indices(frame.height)
    left, right, column_step = columns.indices(frame.width)
    if row_step != 1 or column_step != 1 or bottom <= top or right <= left:
        return None
    return top - top % 2, bottom + bottom % 2, left - left % 2, right + right % 2


def _converted_by_blocks(frame: av.VideoFrame) -> bool:
    """Whether FFmpeg converts ``frame`` to RGB (or BGR: the same values) one 2 x 2 block at a time from its own
    chroma sample: 4:2:0 with even sides. A frame of an odd side is converted otherwise (chroma rows blended), and
    there BGR is not RGB reversed (most values differ)."""
    return frame.format.name in _CROPPABLE_FORMATS and frame.height % 2 == 0 and frame.width % 2 == 0


def _shifted(part: slice, offset: int, size: int) -> slice:
    """A forward slice of a frame's ``size`` rows (or columns) as a slice of them from ``offset`` on."""
    start, stop, _ = part.indices(size)
    return slice(start - offset, stop - offset)


def _cut(frame: av.VideoFrame, window: tuple[int, int, int, int]) -> av.VideoFrame:
    """The part ``window`` of a 4:2:0 frame (see :func:`_crop_window`) as a frame of its own: views of the
    frame's planes, nothing copied."""
    top, bottom, left, right = window
    planes = [np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size) for plane in frame.planes]
    cut = av.VideoFrame.from_dlpack(
        [
            planes[0][top:bottom, left:right],
            planes[1][top // 2 : bottom // 2, left // 2 : right // 2],
            planes[2][top // 2 : bottom // 2, left // 2 : right // 2],
        ],
        format=frame.format.name,
    )
    cut.colorspace, cut.color_range = frame.colorspace, frame.color_range
    return cut


def _region_slices(region: Region, height: int, width: int) -> tuple[slice, slice]:
    """What ``region`` gives for frames of ``height`` x ``width``, checked: columns step 1 or -1."""
    rows, columns = region(height, width)
    if columns.step not in (None, 1, -1):
        raise ValueError(f"a region's columns must have step 1 or -1; got {columns}")
    return rows, columns


def _forwards(columns: slice, width: int) -> tuple[slice, bool]:
    """``columns`` (as :func:`_region_slices` checked it) as a forward slice, and whether it mirrors (step -1)."""
    if columns.step != -1:
        return columns, False
    start, stop, _ = columns.indices(width)
    return slice(stop + 1, start + 1), True


def _mirrored(frames: np.ndarray) -> np.ndarray:
    """(..., h, w, 3) frames mirrored left to right, a contiguous copy, by torch: NumPy's copy of packed RGB
    pixels through a negative stride takes ten times as long."""
    return torch.from_numpy(frames).flip(-2).numpy()


def _take(frames: np.ndarray, rows: slice, columns: slice) -> np.ndarray:
    """``frames[..., rows, columns, :]`` of (..., H, W, 3) frames as a contiguous copy (``columns`` as
    :func:`_region_slices` checked it)."""
    columns, mirror = _forwards(columns, frames.shape[-2])
    part = np.ascontiguousarray(frames[..., rows, columns, :])
    return _mirrored(part) if mirror else part


# Seek only when the clip starts at least this many frames into the video: below, decoding from the start is
# about as cheap and is exact whatever the time stamps say.
_SEEK_MIN_FRAMES = 16


def _frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int | None:
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return int(round(stream.duration * stream.time_base * rate)) or None
    if rate and container.duration:
        return int(round(container.duration / av.time_base * rate)) or None
    return None


def _decode_from_start(container, stream, clip: _Clip) -> bool:
    """Gives ``clip`` its frames, counted from the first decoded frame; False if the video ends before the last."""
    last = clip.wanted[-1]
    for position, frame in enumerate(container.decode(stream)):
        clip(position, frame)
        if position >= last:
            return True
    return False


def _decode_after_seek(container, stream, clip: _Clip) -> bool:
    """Gives ``clip`` its frames after seeking to the key frame before the first; False when the time stamps
    disagree (the clip is then incomplete)."""
    rate, time_base = stream.average_rate, stream.time_base
    if not rate or not time_base:
        return False
    start, first_wanted, last = stream.start_time or 0, clip.wanted[0], clip.wanted[-1]
    try:
        container.seek(start + int(first_wanted / rate / time_base), stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        return False
    position = _frame_position(start, time_base * rate)
    first = None
    for frame in _decode_skipping(container, stream, lambda pts: position(pts) in clip.places):
        if frame.pts is None:
            return False
        at = position(frame.pts)
        if first is None:
            first = at
            if at > first_wanted:
                return False  # the seek went past the first needed frame
        clip(at, frame)
        if at >= last:
            break
    return clip.complete  # else a gap, a duplicate time stamp, or the video ended early


def _frame_position(start: int, frames_per_tick: Fraction) -> Callable[[int], int]:
    """Time stamp -> frame index, ``round((pts - start) * frames_per_tick)`` (halves to even), in integers (a
    Fraction for every frame costs a millisecond a clip)."""
    num, den = frames_per_tick.numerator, frames_per_tick.denominator

    def position(pts: int) -> int:
        quotient, remainder = divmod((pts - start) * num, den)
        return quotient + (2 * remainder > den or (2 * remainder == den and quotient % 2 == 1))

    return position


# decoders whose skip_frame=NONREF drops exactly the frames no other frame refers to (H.264's nal_ref_idc 0)
_SKIPPING_CODECS = ("h264",)


def _decode_skipping(container, stream, needed: Callable[[int], bool]) -> Iterator[av.VideoFrame]:
    """The frames of ``stream`` from where ``container`` stands, except H.264 frames that are not ``needed``
    (by their packet's time stamp) and that no other frame refers to: those are not decoded at all (FFmpeg's
    ``skip_frame=NONREF`` for their packet alone). The frames that are decoded are exactly those of decoding
    every frame. With x264's default B-frames about a third of the frames are such, and a clip takes only some
    frames of the span it decodes (one in ``sampling_rate``, none of those before its first frame)."""
    context = stream.codec_context
    if context.name not in _SKIPPING_CODECS:
        yield from container.decode(stream)
        return
    for packet in container.demux(stream):
        skip = packet.pts is not None and not needed(packet.pts)
        context.skip_frame = "NONREF" if skip else "DEFAULT"
        yield from packet.decode()


# ----------------------------------------------------------------------------------------------------------------
# torchcodec

DECODERS = ("pyav", "torchcodec")


def check_decoder(decoder: str) -> None:
    """Raise a one-line error if ``decoder`` is not one of :data:`DECODERS` (ValueError) or cannot run here
    (:class:`DecoderUnavailable`).

    torchcodec is an optional extra: a wheel matching the installed torch release (0.N for torch 2.N from 0.9 on)
    that loads FFmpeg's shared libraries (major versions 4 to 8) from the system, e.g. Debian's ``apt install
    ffmpeg``. PyAV, the default, brings its own FFmpeg.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
    if decoder == "torchcodec":
        try:
            importlib.import_module("torchcodec.decoders")
        except Exception as err:  # ImportError, or the RuntimeError it raises when no FFmpeg library loads
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DecoderUnavailable(
                "decoder 'torchcodec' needs torchcodec (the release built for torch "
                f"{torch.__version__.split('+')[0]}) and FFmpeg's shared libraries 4 to 8 on the system "
                f"(apt install ffmpeg): {reason}"
            ) from None


def decoder_available(decoder: str) -> bool:
    """Whether ``decoder`` can run here (:func:`check_decoder` without the error)."""
    try:
        check_decoder(decoder)
    except DecoderUnavailable:
        return False
    return True


def _read_frames_torchcodec(
    path: str | Path, sample: Callable[[int], Tensor], region: Region | None
) -> tuple[np.ndarray, Tensor]:
    """:func:`read_frames` through torchcodec: its exact mode scans the file once, so the frame count is the
    decodable frames' and the seeks land on the key frame before the first needed frame."""
    from torchcodec.decoders import VideoDecoder

    with _decode_errors(path):
        decoder = VideoDecoder(str(path), seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
        count = decoder.metadata.num_frames or 0
    if count == 0:
        raise VideoDecodeError(f"{path}: no decodable video frame")
    index = sample(count)
    wanted = sorted(set(index.tolist()))
    with _decode_errors(path):
        frames = decoder.get_frames_at(wanted).data.numpy()  # (N, H, W, 3) uint8
    if region is not None:
        frames = _take(frames, *_region_slices(region, *frames.shape[1:3]))
    position = {frame: k for k, frame in enumerate(wanted)}
    return np.ascontiguousarray(frames[[position[i] for i in index.tolist()]]), index


# ----------------------------------------------------------------------------------------------------------------
# dataset


class VideoListDataset(Dataset):
    """Clips of the videos of a list file, with the paper's sampling and transforms (see the module docstring).

    Args:
        list_file: ``path label`` lines (or ``path 3,17,42`` with ``multi_label``); or the list's entries
            themselves, ``(path, label)`` pairs as :func:`read_video_list` gives them (``nonlocalnet predict`` passes
            the videos it is given so).
        root: folder the paths are relative to.
        split: ``"train"`` (one random clip per video) or ``"test"`` (``test_clips × test_crops`` views per video).
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        multi_label: Charades-style lists; labels become multi-hot float vectors.
        frames: frames per clip (T).
        sampling_rate: keep one frame every this many (32×2: frames=32, sampling_rate=2).
        train_scale: (low, high) range of the random short side in training.
        crop_size: side of the square crop; None (test only) keeps full frames.
        test_scale: short side at test time.
        test_clips: K clips evenly spaced in time per test video.
        test_crops: crops per test clip: 1 (centre) or 3 (left / centre / right along the long side).
        max_retries: replacements tried for a corrupt video before giving up.
        seed: base seed of the random choices of training items.
        skip_missing: drop missing files with a warning instead of failing.
        seek: allow seeking in the videos (False always decodes from the first frame; PyAV only).
        decoder: ``"pyav"`` or ``"torchcodec"`` (the same frames and pixels where the container's frame count is
            right; see :func:`read_frames` and :func:`check_decoder`).
        normalize: items hold normalised float32 clips; False: the uint8 clips (see the module docstring).
    """

    def __init__(
        self,
        list_file: str | Path | Sequence[tuple[str, int | tuple[int, ...]]],
        root: str | Path,
        *,
        split: str = "train",
        num_classes: int,
        multi_label: bool = False,
        frames: int = 8,
        sampling_rate: int = 8,
        train_scale: tuple[int, int] = (256, 320),
        crop_size: int | None = 224,
        test_scale: int = 256,
        test_clips: int = 10,
        test_crops: int = 3,
        max_retries: int = 10,
        seed: int = 0,
        skip_missing: bool = False,
        seek: bool = True,
        decoder: str = "pyav",
        normalize: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive; got {num_classes}")
        for name, value in (
            ("frames", frames),
            ("sampling_rate", sampling_rate),
            ("test_scale", test_scale),
            ("test_clips", test_clips),
            ("test_crops", test_crops),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value}")
        check_decoder(decoder)
        if max_retries < 0 or seed < 0:
            raise ValueError(f"max_retries and seed must be >= 0; got {max_retries}, {seed}")
        low, high = train_scale
        if not 1 <= low <= high:
            raise ValueError(f"train_scale must be (low, high) with 1 <= low <= high; got {train_scale}")
        if crop_size is None:
            if split == "train":
                raise ValueError(
                    "crop_size=None (data.crop_size=null: full frames) is for testing only; training "
                    "needs a crop size (data.crop_size=224), and `nonlocalnet test` takes the null"
                )
            if test_crops != 1:
                raise ValueError(f"crop_size=None (full frames) takes test_crops=1; got {test_crops}")
        elif crop_size < 1:
            raise ValueError(f"crop_size must be positive or None; got {crop_size}")
        elif split == "train" and crop_size > low:
            raise ValueError(f"crop_size {crop_size} is larger than the smallest train scale {low}")
        elif split == "test" and crop_size > test_scale:
            raise ValueError(f"crop_size {crop_size} is larger than test_scale {test_scale}")

        given = not isinstance(list_file, (str, Path))
        # where the videos come from, in messages: the list file, or the given entries
        self.list_file, self.root = "the given videos" if given else Path(list_file), Path(root)
        self.split, self.num_classes, self.multi_label = split, num_classes, multi_label
        self.frames, self.sampling_rate = frames, sampling_rate
        self.train_scale, self.crop_size, self.test_scale = (low, high), crop_size, test_scale
        self.test_clips, self.test_crops = test_clips, test_crops
        self.max_retries, self.seed, self.seek, self.decoder = max_retries, seed, seek, decoder
        self.normalize = normalize
        self.epoch = 0

        entries = (
            [(str(path), label) for path, label in list_file]
            if given
            else read_video_list(self.list_file, num_classes=num_classes, multi_label=multi_label)
        )
        if not entries:
            raise ValueError("no video given")
        paths = [self.root / rel for rel, _ in entries]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            shown = "\n  ".join(str(paths[i]) for i in missing[:MISSING_SHOWN])
            more = f"\n  ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            message = (
                f"{len(missing)} of {len(paths)} videos listed in {self.list_file} are missing "
                f"(root {self.root}):\n  {shown}{more}"
            )
            if not skip_missing:
                raise FileNotFoundError(
                    message + "\n(to drop them: data.skip_missing=true in a config or on the "
                    "command line, skip_missing=True in Python)"
                )
            logger.warning("%s\ndropping them (skip_missing=True)", message)
            gone = set(missing)
            entries = [e for i, e in enumerate(entries) if i not in gone]
            paths = [p for i, p in enumerate(paths) if i not in gone]
            if not entries:
                raise FileNotFoundError(f"every video listed in {self.list_file} is missing (root {self.root})")
        self.paths: list[Path] = paths
        self.labels: list[int | tuple[int, ...]] = [label for _, label in entries]

        # per process: videos known to be corrupt, and the last decoded and scaled test clip (3 crops share it)
        self._corrupt: dict[int, str] = {}
        self._test_cache: tuple[int, int, Tensor] | None = None

    # -- sizes and bookkeeping ------------------------------------------------------------------------------------

    @property
    def num_videos(self) -> int:
        return len(self.paths)

    @property
    def views_per_video(self) -> int:
        """Items per video: 1 in training, ``test_clips * test_crops`` at test time."""
        return 1 if self.split == "train" else self.test_clips * self.test_crops

    def __len__(self) -> int:
        return self.num_videos * self.views_per_video

    def set_epoch(self, epoch: int) -> None:
        """Make the random choices of training items those of ``epoch`` (call it before every epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        self.epoch = int(epoch)

    def view(self, index: int) -> tuple[int, int, int]:
        """(video, clip, crop) of item ``index`` (clip and crop are 0 in training)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.split == "train":
            return index, 0, 0
        video, rest = divmod(index, self.views_per_video)
        clip, crop = divmod(rest, self.test_crops)
        return video, clip, crop

    @property
    def targets(self) -> Tensor:
        """Labels of every video: (N,) int64, or (N, num_classes) float32 multi-hot."""
        return torch.stack([self._label(v) for v in range(self.num_videos)])

    def _label(self, video: int) -> Tensor:
        label = self.labels[video]
        if self.multi_label:
            hot = torch.zeros(self.num_classes, dtype=torch.float32)
            hot[list(label)] = 1.0
            return hot
        return torch.tensor(label, dtype=torch.int64)

    # -- items ------------------------------------------------------------------------------------------------------

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        video, clip_index, crop_index = self.view(index)
        skipped: list[int] = []
        attempts = self.max_retries + 1 if self.split == "train" else self.num_videos
        for attempt in range(attempts):
            time_seed, space_seed, choice_seed = self._seeds(index, attempt)
            try:
                if self.split == "train":
                    clip = self._train_clip(video, time_seed, space_seed)
                else:
                    clip = self._test_clip(video, clip_index, crop_index)
                ids = (skipped + [-1] * self.skip_width)[: self.skip_width]
                return {
                    "clip": clip,
                    "label": self._label(video),
                    "video": torch.tensor(video, dtype=torch.int64),
                    "skipped": torch.tensor(len(set(skipped)), dtype=torch.int64),
                    "skipped_ids": torch.tensor(ids, dtype=torch.int64),
                }
            except VideoDecodeError as err:
                skipped.append(video)
                if video not in self._corrupt:
                    self._corrupt[video] = str(err)
                    logger.warning("skipping corrupt video %s (%s)", self.paths[video], err)
                if self.split == "train":
                    video = int(
                        torch.randint(self.num_videos, (1,), generator=torch.Generator().manual_seed(choice_seed))
                    )
                else:
                    # at test time the next video in the list, as far as it takes: a run of corrupt files
                    # costs their views, not the test
                    video = (video + 1) % self.num_videos
        last = [self._corrupt[v] for v in skipped[-3:]]
        if self.split != "train" or len(self._corrupt) == self.num_videos:
            raise CorruptData(
                f"every video listed in {self.list_file} failed to decode ({self.num_videos} "
                f"videos); the last ones: " + "; ".join(last)
            )
        raise CorruptData(
            f"item {index} of {self.list_file}: {self.max_retries + 1} videos in a row failed to "
            f"decode (max_retries={self.max_retries}); the last ones: " + "; ".join(last)
        )

    def _seeds(self, index: int, attempt: int) -> tuple[int, int, int]:
        """The (time, space, replacement) seeds of a training item's ``attempt``-th draw in this epoch."""
        return tuple(
            int(s)
            for s in np.random.SeedSequence([self.seed, self.epoch, index, attempt]).generate_state(3, dtype=np.uint64)
        )

    def clip_indices(self, index: int, num_frames: int) -> Tensor:
        """The frame indices item ``index`` takes from its video if that video has ``num_frames`` frames (in this
        epoch; a training item's first draw), e.g. to decode the same frames with another reader."""
        _, clip_index, _ = self.view(index)
        if self.split == "train":
            return self._train_indices(num_frames, self._seeds(index, 0)[0])
        return self._test_indices(num_frames, clip_index)

    def _train_indices(self, count: int, time_seed: int) -> Tensor:
        generator = torch.Generator().manual_seed(time_seed)  # the same indices whenever asked again
        return transforms.train_clip_indices(count, self.frames, self.sampling_rate, generator)

    def _test_indices(self, count: int, clip_index: int) -> Tensor:
        return transforms.uniform_clip_indices(count, self.frames, self.sampling_rate, clip_index, self.test_clips)

    @property
    def skip_width(self) -> int:
        """The length of an item's ``skipped_ids`` (the ids of the corrupt videos it passed over, -1 padded).

        A test item lists its own video first, so every corrupt video is named by its own views, however long a
        run of corrupt files the replacement walked past.
        """
        return self.max_retries + 1

    def _decode(self, video: int, sample: Callable[[int], Tensor], region: Region | None = None) -> Tensor:
        """(3, T, H, W) uint8 clip of ``video`` (of the region); known corrupt videos fail at once."""
        if video in self._corrupt:
            raise VideoDecodeError(self._corrupt[video])
        frames, _ = read_frames(self.paths[video], sample, seek=self.seek, region=region, decoder=self.decoder)
        return transforms.to_channels_first(torch.from_numpy(frames))  # (T, H, W, 3) -> (3, T, H, W)

    def _train_clip(self, video: int, time_seed: int, space_seed: int) -> Tensor:
        def region(height: int, width: int) -> tuple[slice, slice]:
            generator = torch.Generator().manual_seed(space_seed)  # same region if called again
            return transforms.random_scaled_crop(height, width, self.train_scale, self.crop_size, generator)

        # only the square that becomes the crop is converted, copied (mirrored) and scaled, in uint8
        clip = self._decode(video, lambda count: self._train_indices(count, time_seed), region)
        return self._finish(transforms.resize(clip, self.crop_size, self.crop_size))

    def _finish(self, clip: Tensor) -> Tensor:
        """A uint8 clip as an item holds it: normalised float32, contiguous, or uint8 laid out frames-last."""
        return transforms.normalize(clip) if self.normalize else transforms.frames_last(clip)

    def _test_clip(self, video: int, clip_index: int, crop_index: int) -> Tensor:
        cache = self._test_cache
        if cache is not None and cache[:2] == (video, clip_index):
            scaled = cache[2]
        else:
            clip = self._decode(video, lambda count: self._test_indices(count, clip_index))
            scaled = transforms.short_side_resize(clip, self.test_scale)
            self._test_cache = (video, clip_index, scaled)
        if self.crop_size is not None:
            scaled = transforms.spatial_crop(scaled, self.crop_size, crop_index, self.test_crops)
        return self._finish(scaled)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.list_file}, split={self.split!r}, videos={self.num_videos}, "
            f"items={len(self)}, clip={self.frames}x{self.sampling_rate})"
        )
