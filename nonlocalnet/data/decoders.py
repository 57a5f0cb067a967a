"""The video decoders behind one interface: :class:`Decoder` (a clip's frames of a video, of the region it keeps),
the :data:`DECODERS` registry of those that ship (PyAV, the default, and torchcodec), :func:`read_frames` which reads
through one by name, and :func:`check_decoder` / :func:`decoder_available` which say whether one can run here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .decode_errors import DecoderUnavailable
from .pyav_decoder import read_frames_pyav
from .regions import Region
from .torchcodec_decoder import read_frames_torchcodec


class Decoder(Protocol):
    """What a decoder is: the call of :func:`read_frames` without ``decoder`` (the same contract)."""

    def __call__(
        self, path: str | Path, sample: Callable[[int], Tensor], *, seek: bool = True, region: Region | None = None
    ) -> tuple[np.ndarray, Tensor]: ...


# name -> decoder: the values of ``data.decoder`` and of the datasets' ``decoder``
DECODERS: dict[str, Decoder] = {"pyav": read_frames_pyav, "torchcodec": read_frames_torchcodec}


def read_frames(
    path: str | Path,
    sample: Callable[[int], Tensor],
    *,
    seek: bool = True,
    region: Region | None = None,
    decoder: str = "pyav",
) -> tuple[np.ndarray, Tensor]:
    """Decode only the frames of a video that a clip needs, as RGB (of only the region a clip keeps).

    How the default (PyAV) decoder decodes only what it needs: :mod:`nonlocalnet.data.pyav_decoder`.

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
    read = DECODERS.get(decoder)
    if read is None:
        raise ValueError(f"decoder must be one of {tuple(DECODERS)}; got {decoder!r}")
    return read(path, sample, seek=seek, region=region)


def check_decoder(decoder: str) -> None:
    """Raise a one-line error if ``decoder`` is not one of :data:`DECODERS` (ValueError) or cannot run here
    (:class:`DecoderUnavailable`).

    torchcodec is an optional extra: a wheel matching the installed torch release (0.N for torch 2.N from 0.9 on)
    that loads FFmpeg's shared libraries (major versions 4 to 8) from the system, e.g. Debian's ``apt install
    ffmpeg``. PyAV, the default, brings its own FFmpeg.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {tuple(DECODERS)}; got {decoder!r}")
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
