"""The peers our block is measured against, and how each one's weights map onto our block.

A builder makes the peer module for one of its configurations and says how our block must be configured to
compute the same function; a loader copies the peer's weights into that block. :func:`check_equivalence` runs
both on one input: equivalence before speed.

Not measured: AlexHex7/Non-local_pytorch (the PyTorch port most copied) is not on the package index; mmcv's
NonLocal2d/3d is written after it (same subsample-after-projection layout, same modes).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nonlocalnet import NonLocalBlock
from nonlocalnet.layers.pairwise import resolve_impl

from .._common import synchronize

# the peers, the modules they need and the configurations (their own names) they offer
PEERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mmcv": (("mmcv.cnn", "mmengine"), ("embedded_gaussian", "gaussian", "dot_product", "concatenation")),
    "timm": (("timm.layers",), ("NonLocalAttn",)),
    "pytorchvideo": (("pytorchvideo.layers.nonlocal_net",), ("softmax", "dot_product")),
}
AGREE_RTOL = 1e-3  # outputs agree when max|z_peer - z_ours| <= 1e-5 + AGREE_RTOL * max|z_peer - x|


class NotApplicable(Exception):
    """The peer has no configuration for this input (wrong dimensionality or subsampling)."""


@dataclass
class Pair:
    """A peer module and our block configured to compute the same function, with the peer's weights.

    Attributes:
        peer: the peer's module.
        ours: our NonLocalBlock.
        input_shape: the input both take (the benchmark shape, or adapted to what the peer accepts).
        options: the keyword arguments our block was built with.
        note: how the peer is configured / adapted, for the table.
    """

    peer: nn.Module
    ours: NonLocalBlock
    input_shape: tuple[int, ...]
    options: dict[str, Any]
    note: str


def peer_unavailable(peer: str) -> str | None:
    """None if the peer imports, else why not (for the table's status column)."""
    for module in PEERS[peer][0]:
        try:
            importlib.import_module(module)
        except Exception as error:  # an installed but broken package fails with anything, not only ImportError
            return f"unavailable: import {module} failed ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    return None


Built = tuple[nn.Module, tuple[int, ...], dict[str, Any], str]  # peer module, its input shape, our options, note


def _build_mmcv(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from mmcv.cnn import NonLocal2d, NonLocal3d

    dim = len(shape) - 2
    pools = {2: (2, 2), 3: (1, 2, 2)}  # mmcv's only subsampling: a max-pool after the φ and g convs
    if dim not in pools:
        raise NotApplicable("mmcv exports NonLocal2d / NonLocal3d only")
    if subsample not in (None, pools[dim]):
        raise NotApplicable(f"mmcv subsamples by {pools[dim]} only")
    peer = (NonLocal2d if dim == 2 else NonLocal3d)(shape[1], sub_sample=subsample is not None, mode=variant)
    options = dict(
        dim=dim,
        mode=variant,
        subsample=subsample,
        subsample_position="projection",
        scale="auto" if variant == "embedded_gaussian" else None,
        norm=None,
    )
    where = "after the projections" if subsample else "none"
    return peer, shape, options, f"NonLocal{dim}d; subsample {where}; no norm"


def _load_mmcv(peer: nn.Module, ours: NonLocalBlock) -> None:
    def conv(m: nn.Module) -> nn.Module:  # a ConvModule, or Sequential(ConvModule, MaxPool) when subsampling
        return (m[0] if isinstance(m, nn.Sequential) else m).conv

    _copy_conv(conv(peer.g), ours.g)
    _copy_conv(peer.conv_out.conv, ours.out)
    if peer.mode != "gaussian":  # gaussian compares raw features: no θ, φ
        _copy_conv(conv(peer.theta), ours.theta)
        _copy_conv(conv(peer.phi), ours.phi)
    if peer.mode == "concatenation":
        _copy_conv(peer.concat_project.conv, ours.concat_project[0])


def _build_timm(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from timm.layers import NonLocalAttn

    if len(shape) != 4 or subsample is not None:
        raise NotApplicable("NonLocalAttn is 2D without subsampling")
    peer = NonLocalAttn(shape[1])  # its defaults: C' = C/8, scale C^-1/2 (not C'^-1/2), BatchNorm
    options = dict(dim=2, mode="embedded_gaussian", inter_channels=peer.t.out_channels, scale=peer.scale, norm="batch")
    return peer, shape, options, f"embedded gaussian; C'=C/8={peer.t.out_channels}; scale C^-1/2"


def _load_timm(peer: nn.Module, ours: NonLocalBlock) -> None:
    for src, dst in ((peer.t, ours.theta), (peer.p, ours.phi), (peer.g, ours.g), (peer.z, ours.out)):
        _copy_conv(src, dst)
    ours.norm.load_state_dict(peer.norm.state_dict())


def _build_pytorchvideo(variant: str, shape: tuple[int, ...], subsample: tuple[int, ...] | None) -> Built:
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    note = "subsample before the projections" if subsample else "no subsampling"
    if len(shape) == 4:  # PyTorchVideo's block is 3D only: an image is a one-frame video
        shape = (shape[0], shape[1], 1, *shape[2:])
        subsample = None if subsample is None else (1, *subsample)
        note += "; image as a 1-frame video"
    elif len(shape) != 5:
        raise NotApplicable("PyTorchVideo's NonLocal is 3D only")
    inter = shape[1] // 2
    peer = create_nonlocal(dim_in=shape[1], dim_inner=inter, pool_size=subsample or (1, 1, 1), instantiation=variant)
    mode = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}[variant]
    options = dict(
        dim=3,
        mode=mode,
        inter_channels=inter,
        subsample=subsample,
        subsample_position="input",
        scale="auto" if variant == "softmax" else None,
        norm="batch",
    )
    return peer, shape, options, note


def _load_pytorchvideo(peer: nn.Module, ours: NonLocalBlock) -> None:
    for src, dst in (
        (peer.conv_theta, ours.theta),
        (peer.conv_phi, ours.phi),
        (peer.conv_g, ours.g),
        (peer.conv_out, ours.out),
    ):
        _copy_conv(src, dst)
    ours.norm.load_state_dict(peer.norm.state_dict())


BUILD = {"mmcv": _build_mmcv, "timm": _build_timm, "pytorchvideo": _build_pytorchvideo}
LOAD = {"mmcv": _load_mmcv, "timm": _load_timm, "pytorchvideo": _load_pytorchvideo}


def _copy_conv(src: nn.Module, dst: nn.Module) -> None:
    """Copies a 1x1 conv's weight (and bias; zero where the source has none) into ours."""
    dst.weight.copy_(src.weight.reshape(dst.weight.shape))
    if dst.bias is not None:
        if src.bias is None:
            dst.bias.zero_()
        else:
            dst.bias.copy_(src.bias)


def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Gives every parameter a random value (convs ~ N(0, 1/fan_in), vectors ~ U(-1, 1)), so that the
    non-local term is not zero as at init and a wrong weight mapping shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=generator) * 2 - 1)


def build_pair(
    peer: str,
    variant: str,
    shape: tuple[int, ...],
    subsample: tuple[int, ...] | None,
    seed: int = 0,
    impl: str = "auto",
) -> Pair:
    """The peer with random weights, and our block configured as the peer and holding the same weights.

    Args:
        peer: a key of :data:`PEERS`.
        variant: one of the peer's configurations, in its own words (``PEERS[peer][1]``).
        shape: the benchmark input (B, C, *spatial); the pair's ``input_shape`` may adapt it to the peer.
        subsample: the benchmark's key/value subsampling, or None.
        seed: for the random weights.
        impl: our block's path ("auto" = what a user gets).

    Raises:
        NotApplicable: the peer has no configuration for this shape / subsampling.
    """
    module, input_shape, options, note = BUILD[peer](variant, shape, subsample)
    randomize_(module, seed)
    ours = NonLocalBlock(input_shape[1], impl=impl, **options)
    with torch.no_grad():
        LOAD[peer](module, ours)
    return Pair(module, ours, input_shape, options, note)


def our_path(pair: Pair) -> str:
    """The path our block's impl="auto" takes for this input."""
    block, shape = pair.ours, pair.input_shape
    n = math.prod(shape[2:])
    m = math.prod(s // k for s, k in zip(shape[2:], block.subsample)) if block.subsample else n
    cq = block.in_channels if block.mode == "gaussian" else block.inter_channels
    device = next(block.parameters()).device
    return resolve_impl(
        block.mode,
        block.impl,
        n,
        m,
        cq,
        block.inter_channels,
        batch=shape[0],
        device_type=device.type,
        budget=block.planning_budget(device),
    )


def step(module: nn.Module, x: Tensor) -> None:
    """One forward+backward, gradients dropped afterwards."""
    module(x).sum().backward()
    x.grad = None
    module.zero_grad(set_to_none=True)


def check_equivalence(pair: Pair, x: Tensor) -> dict[str, Any]:
    """Runs peer and ours forward+backward on ``x``; the max abs differences of outputs and input gradients.

    Returns:
        dict with ``z_diff``, ``grad_diff`` (None if a backward failed), ``term`` (max |z_peer - x|, the size
        of the non-local term the difference is judged against), ``agree``, the wall time of each step
        (``peer_s``, ``ours_s``) and ``error`` (the peer's exception as text, or None).
    """
    out: dict[str, Any] = dict(z_diff=None, grad_diff=None, term=None, agree=False, error=None)
    grads = {}
    zs = {}
    for name, module in (("ours", pair.ours), ("peer", pair.peer)):
        xi = x.detach().clone().requires_grad_(True)
        synchronize(x.device.type)
        start = time.perf_counter()
        try:
            z = module(xi)
            zs[name] = z.detach()
            z.sum().backward()
            grads[name] = xi.grad
        except Exception as error:
            if name == "ours":
                raise
            stage = "backward" if name in zs else "forward"
            out["error"] = f"{stage} raises {short_error(error)}"
        synchronize(x.device.type)
        out[f"{name}_s"] = time.perf_counter() - start
        module.zero_grad(set_to_none=True)
    if "peer" in zs:
        out["z_diff"] = (zs["peer"] - zs["ours"]).abs().max().item()
        out["term"] = (zs["peer"] - x).abs().max().item()
        out["agree"] = out["z_diff"] <= 1e-5 + AGREE_RTOL * out["term"]
    if "peer" in grads:
        out["grad_diff"] = (grads["peer"] - grads["ours"]).abs().max().item()
    return out


def short_error(error: BaseException) -> str:
    """An exception in one table cell: its type and the first clause of its message."""
    text = (str(error).strip().splitlines() or [""])[0].split(": [")[0]
    return f"{type(error).__name__}: {text[:100]}"
