"""Helpers the test modules share: writing small videos, a non-local block with active weights, the overrides of a
tiny training run on written videos, and checkpoints in the official Caffe2 code's layout
(facebookresearch/video-nonlocal-net) at a tiny width."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import torch
from torch import nn

from nonlocalnet import NonLocalBlock


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    codec: str = "libx264",
    rate: int = 25,
    gop: int | None = None,
    lossless: bool = False,
    audio: bool = False,
) -> None:
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
    return [
        "progress=false",
        "model.name=nl_c2d_tiny",
        f"data.type={kind}",
        "data.num_classes=3",
        f"data.root={root}",
        f"data.train_list={root / f'train{suffix}.txt'}",
        f"data.test_list={root / f'val{suffix}.txt'}",
        "data.frames=8",
        "data.sampling_rate=2",
        "data.train_scale=[36, 44]",
        "data.crop_size=32",
        "data.test_scale=36",
        "data.test_clips=2",
        "data.test_crops=3",
        "train.batch_size=2",
        "train.iterations=4",
        "train.precise_bn_batches=1",
        "test.batch_size=4",
        f"output_dir={out}",
    ]


# --- official Caffe2 checkpoints -------------------------------------------------------------------------------------

CAFFE2_LAYERS = (2, 4, 6, 2)  # holds the R50 5-block placement; tiny width keeps the files small
CAFFE2_WIDTH = 4
# the official code's temporal-kernel switches ("use_temp_convs") of I3D R50, cut to CAFFE2_LAYERS
I3D_TEMP = {2: [1, 1], 3: [1, 0, 1, 0], 4: [1, 0, 1, 0, 1, 0], 5: [0, 1]}
C2D_TEMP = {s: [0] * n for s, n in zip((2, 3, 4, 5), CAFFE2_LAYERS)}
NL5 = {3: (1, 3), 4: (1, 3, 5)}


def official_blobs(
    temp_convs, nonlocal_after, num_classes=7, affine=False, nonlocal_bn=True, seed=0, training_state=True
):
    """Blobs named and shaped as the official resnet_video_org.py / resnet_helper.py / nonlocal_helper.py make them."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, shape):
        blobs[name + "_w"] = rng.standard_normal(shape).astype(np.float32) * 0.1

    def bn(name, channels):
        blobs[name + "_s"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        blobs[name + "_b"] = rng.standard_normal(channels).astype(np.float32) * 0.1
        if not affine:
            blobs[name + "_rm"] = rng.standard_normal(channels).astype(np.float32) * 0.1
            blobs[name + "_riv"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    kt = 5 if any(any(v) for v in temp_convs.values()) else 1
    conv("conv1", (CAFFE2_WIDTH, 3, kt, 7, 7))
    bn("res_conv1_bn", CAFFE2_WIDTH)
    dim_in = CAFFE2_WIDTH
    for stage in (2, 3, 4, 5):
        inner = CAFFE2_WIDTH * 2 ** (stage - 2)
        dim_out = 4 * inner
        for idx, use_temp in enumerate(temp_convs[stage]):
            prefix = f"res{stage}_{idx}"
            conv(prefix + "_branch2a", (inner, dim_in, 1 + 2 * use_temp, 1, 1))
            bn(prefix + "_branch2a_bn", inner)
            conv(prefix + "_branch2b", (inner, inner, 1, 3, 3))
            bn(prefix + "_branch2b_bn", inner)
            conv(prefix + "_branch2c", (dim_out, inner, 1, 1, 1))
            bn(prefix + "_branch2c_bn", dim_out)
            if idx == 0:  # dim_in != dim_out (res2) or stride 2 (res3..res5)
                conv(prefix + "_branch1", (dim_out, dim_in, 1, 1, 1))
                bn(prefix + "_branch1_bn", dim_out)
            dim_in = dim_out
            if idx in nonlocal_after.get(stage, ()):
                nl = f"nonlocal_conv{stage}_{idx}"
                for part, shape in (
                    ("theta", (dim_out // 2, dim_out)),
                    ("phi", (dim_out // 2, dim_out)),
                    ("g", (dim_out // 2, dim_out)),
                    ("out", (dim_out, dim_out // 2)),
                ):
                    conv(f"{nl}_{part}", shape + (1, 1, 1))
                    blobs[f"{nl}_{part}_b"] = rng.standard_normal(shape[0]).astype(np.float32) * 0.1
                if nonlocal_bn:
                    bn(f"{nl}_bn", dim_out)
    blobs["pred_w"] = rng.standard_normal((num_classes, dim_in)).astype(np.float32) * 0.01
    blobs["pred_b"] = rng.standard_normal(num_classes).astype(np.float32) * 0.01
    if training_state:
        for name in [n for n in blobs if n.endswith(("_w", "_b", "_s"))]:
            blobs[name + "_momentum"] = np.zeros_like(blobs[name])
        blobs["lr"] = np.array(0.01, dtype=np.float32)
        blobs["model_iter"] = np.array(400000)
    return blobs


def fold_bn(blobs):
    """The official modify_caffe2_ftvideo.py: BN -> affine, s' = s / sqrt(riv + 1e-5), b' = b - rm s'."""
    out = {k: v for k, v in blobs.items() if not k.endswith(("_rm", "_riv"))}
    for name in [k[:-3] for k in blobs if k.endswith("_rm")]:
        std = np.sqrt(blobs[name + "_riv"] + 1e-5)
        out[name + "_s"] = blobs[name + "_s"] / std
        out[name + "_b"] = blobs[name + "_b"] - blobs[name + "_rm"] * blobs[name + "_s"] / std
    return out


def write_pickle(path, blobs, wrapped=True):
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs} if wrapped else blobs, f, protocol=2)  # the py2 era protocol
    return path


def check_placed(model, blobs, affine=False):
    """Every model tensor holds its blob, checked through module attributes (not the converter's name table)."""

    def same(tensor, name):
        np.testing.assert_array_equal(tensor.detach().numpy().reshape(blobs[name].shape), blobs[name], err_msg=name)

    def norm(module, name):
        same(module.weight, name + "_s")
        same(module.bias, name + "_b")
        if not affine:
            same(module.running_mean, name + "_rm")
            same(module.running_var, name + "_riv")

    same(model.conv1.weight, "conv1_w")
    norm(model.bn1, "res_conv1_bn")
    for stage in (2, 3, 4, 5):
        res = getattr(model, f"res{stage}")
        for idx in range(res.depth):
            block, prefix = res[idx], f"res{stage}_{idx}"
            for part in "abc":
                same(getattr(block, f"conv_{part}").weight, f"{prefix}_branch2{part}_w")
                norm(getattr(block, f"bn_{part}"), f"{prefix}_branch2{part}_bn")
            if block.shortcut is not None:
                same(block.shortcut.conv.weight, f"{prefix}_branch1_w")
                norm(block.shortcut.bn, f"{prefix}_branch1_bn")
        for idx in res.nonlocal_after:
            nl, prefix = getattr(res, f"nl{idx}"), f"nonlocal_conv{stage}_{idx}"
            for part in ("theta", "phi", "g", "out"):
                same(getattr(nl, part).weight, f"{prefix}_{part}_w")
                same(getattr(nl, part).bias, f"{prefix}_{part}_b")
            if nl.norm_type == "batch":
                norm(nl.norm, f"{prefix}_bn")
    same(model.head.fc.weight, "pred_w")
    same(model.head.fc.bias, "pred_b")
