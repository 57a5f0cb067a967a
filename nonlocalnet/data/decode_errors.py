"""The errors of decoding a video, shared by every decoder: a bad video (:class:`VideoDecodeError`), a decoder
that cannot run here (:class:`DecoderUnavailable`), and :func:`decode_errors`, which turns what a decoder raises
while reading a bad video into a VideoDecodeError and lets a caller's own error through as it is."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

try:
    import av
except ImportError:  # a declared dependency; without it (a machine's own torch, used as it is) only videos fail
    av = None


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or yields no decodable frame."""


class DecoderUnavailable(ImportError, ValueError):
    """The decoder a dataset or config asks for cannot run here (a user's choice, hence also a ValueError)."""


class CallerError(Exception):
    """Carries (as its cause) what a caller's function raised inside :func:`decode_errors`, past it."""


# what PyAV, torchcodec (RuntimeError, IndexError) or a frame of another size raise while reading a bad video
DECODE_ERRORS = (OSError, ValueError, RuntimeError, IndexError, KeyError) + ((av.error.FFmpegError,) if av else ())


@contextlib.contextmanager
def decode_errors(path: str | Path) -> Iterator[None]:
    """Turns what decoding ``path`` raises into a VideoDecodeError."""
    try:
        yield
    except VideoDecodeError:
        raise
    except CallerError as err:  # the caller's region function failed: a bug or a bad option, not a bad video
        raise err.__cause__ from None
    except DECODE_ERRORS as err:
        raise VideoDecodeError(f"{path}: {type(err).__name__}: {err}") from err
