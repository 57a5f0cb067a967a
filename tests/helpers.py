"""Helpers the test modules share: writing small videos, a non-local block with active weights, the overrides of a
tiny training run on written videos."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from torch import nn

from nonlocalnet import NonLocalBlock


def write_video(path: Path, frames: np.ndarray, *, codec: str = "libx264", rate: int = 25, gop: int | None = None,
                lossless: bool = False, audio: bool = False) -> None:
    """Writes (F, H, W, 3) uint8 ``frames`` as a video at ``rate`` fps (folders created).

    Args:
        path: the file; its suffix picks the container.
        frames: the RGB frames.
        codec: the video codec (libx264, mpeg4).
        rate: frames per second.
        gop: a key frame every ``gop`` frames; None leaves the encoder's default.
        lossless: H.264 at crf 0, so that pixel codes survive up to RGB <-> YUV rounding (libx264 only).
        audio: adds a short silent AAC track (8 frames of 1024 samples at 8 kHz).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if gop is not None:
            stream.gop_size = gop
        if lossless:
            stream.options = {"crf": "0"}
        sound = container.add_stream("aac", rate=8000) if audio else None
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        if sound is not None:
            for k in range(8):
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                samples.sample_rate, samples.pts = 8000, 1024 * k
                for packet in sound.encode(samples):
                    container.mux(packet)
        for s in (stream, sound) if sound is not None else (stream,):
            for packet in s.encode():
                container.mux(packet)


def make_active(block: NonLocalBlock, std: float = 0.5) -> NonLocalBlock:
    """Random weights large enough that attention is peaky and the output depends on every parameter."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, std)
        if isinstance(block.norm, nn.modules.batchnorm._BatchNorm):
            block.norm.running_var.uniform_(0.5, 2.0)
            block.norm.running_mean.normal_()
    return block.eval()


def video_overrides(root: Path, out: Path, kind: str = "kinetics") -> list[str]:
    """Config overrides of a tiny run (nl_c2d_tiny, 4 iterations) on the videos and lists under ``root``."""
    suffix = "_ml" if kind == "charades" else ""
    return ["progress=false", "model.name=nl_c2d_tiny", f"data.type={kind}", "data.num_classes=3",
            f"data.root={root}", f"data.train_list={root / f'train{suffix}.txt'}",
            f"data.test_list={root / f'val{suffix}.txt'}", "data.frames=8", "data.sampling_rate=2",
            "data.train_scale=[36, 44]", "data.crop_size=32", "data.test_scale=36", "data.test_clips=2",
            "data.test_crops=3", "train.batch_size=2", "train.iterations=4", "train.precise_bn_batches=1",
            "test.batch_size=4", f"output_dir={out}"]
