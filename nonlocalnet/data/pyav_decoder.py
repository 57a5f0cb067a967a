"""The PyAV decoder: only the frames a clip needs, and of a 4:2:0 frame only the region it keeps, converted to RGB.

The number of frames comes from the container (``stream.frames``, else duration × frame rate); ``sample`` maps
it to frame indices, and frames are decoded in order up to the last index needed, on one thread. When the first
index is far enough from the start (``seek``), the decoder first jumps to the key frame before it, and frame
indices are read from time stamps (exact for constant frame rate; any inconsistency -- no time stamps, a jump
past the first needed frame, a gap -- falls back to decoding from the start); there, an H.264 frame that no
other frame refers to is not decoded at all unless the clip takes it (the others are the same either way: no
frame depends on it). When the container's count is wrong (the video ends before a needed frame) or missing, the
decodable frames are counted (a video that is cut short, as a partly downloaded one, thus gives the frames it
has), ``sample`` is called again with the true count and the needed frames are decoded again from the start.

Of a 4:2:0 frame (H.264's) with even sides, only the part that holds the region is converted (crop before
conversion, :func:`_crop_window`); a mirrored region is converted to BGR and flipped once at the end (:class:`_Clip`).
"""

from __future__ import annotations

import contextlib
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

from .decode_errors import CallerError, VideoDecodeError, decode_errors
from .regions import Region, forwards, mirrored, region_slices


def read_frames_pyav(
    path: str | Path, sample: Callable[[int], Tensor], *, seek: bool = True, region: Region | None = None
) -> tuple[np.ndarray, Tensor]:
    """:func:`~nonlocalnet.data.decoders.read_frames` through PyAV (see the module docstring for how)."""
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


@contextlib.contextmanager
def _open_video(path: str | Path) -> Iterator[av.container.InputContainer]:
    """The open container of a video with a video stream; what the caller's block raises is left as it is."""
    if av is None:
        raise ImportError("reading videos needs PyAV: pip install av")
    with decode_errors(path):
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
    with _open_video(path) as container, decode_errors(path):
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
    with decode_errors(path):
        clip = new_clip()
        if seek and clip.wanted[0] >= _SEEK_MIN_FRAMES:
            if _decode_after_seek(container, stream, clip):
                return clip
            clip = new_clip()  # time stamps disagree: decode from the start of a fresh container
            with _open_video(path) as fresh:
                return clip if _decode_from_start(fresh, fresh.streams.video[0], clip) else None
        return clip if _decode_from_start(container, stream, clip) else None


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
            return mirrored(self.array)
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
                self.rows, self.columns = region_slices(self.region, height, width)
            except Exception as err:
                raise CallerError() from err
            self.columns, self.mirror = forwards(self.columns, width)  # a mirror: flipped at the end
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
