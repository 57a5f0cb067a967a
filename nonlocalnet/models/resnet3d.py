"""The paper's video networks: C2D and I3D bottleneck ResNets, with non-local blocks where you ask for them.

One file because it is one network and its parts: the bottleneck, the stage and the head exist only to be assembled by
:class:`ResNet3d`, and reading Table 1 against the code needs them side by side.

Table 1 of the paper (C2D ResNet-50, a 32x224x224 clip sampled "32x2"):

| layer | spec                                           | output T x H x W |
|-------|------------------------------------------------|------------------|
| conv1 | 1x7x7, 64, stride (2, 2, 2)                    | 16 x 112 x 112   |
| pool1 | max, temporal kernel 2 (code) / 3 (paper), stride 2 | 8 x 56 x 56 |
| res2  | [1x1, 64; 1x3x3, 64; 1x1, 256] x 3             | 8 x 56 x 56      |
| pool2 | max, temporal kernel 2 (code) / 3 (paper), stride (2, 1, 1) | 4 x 56 x 56 |
| res3  | [., 128; ., 128; ., 512] x 4                   | 4 x 28 x 28      |
| res4  | [., 256; ., 256; ., 1024] x 6                  | 4 x 14 x 14      |
| res5  | [., 512; ., 512; ., 2048] x 3                  | 4 x 7 x 7        |
| head  | global average pool, dropout 0.5, fc 2048 -> classes |            |

Choices where the paper and the official code differ (none changes a parameter count):
- Temporal pool kernels follow the official code (pool1 2x3x3, pool2 2x1x1, both temporal stride 2); Table 1
  writes 3x3x3 and 3x1x1. Pass ``clip=PAPER_32X2`` for the paper's kernels. Both give Table 1's sizes.
- Spatial padding of pool1 is 1, as in Table 1 (56x56 after pool1) and torchvision, so ImageNet ResNets inflate
  exactly; the official code pads 0 and gets 55x55 (res3..res5 sizes are the same either way). The layouts
  "32x2_official", "8x8_official" and "128x1_official" (``clip=``) are the official networks; ``convert-caffe2``
  builds them.
- "i3d_3x3x3" (Table 2e) inflates branch2b to 3x3x3 on the same blocks that "i3d" inflates branch2a to 3x1x1,
  with the same 5x7x7 conv1.

Module names follow the official blobs: ``res4.2.conv_a`` is ``res4_2_branch2a``, ``res4.0.shortcut`` is
``res4_0_branch1``, ``res4.nl3`` is the non-local block after block 3 of res4 (``nonlocal_conv4_3``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import PAPER_VIDEO_OPTIONS, NonLocalBlock
from ..layers.conv import Conv3d
from ..layers.nonlocal_block import SCALED_MODES
from ..layers.pooling import MaxPool3d
from .batchnorm import FrozenBatchNorm3d
from .placements import STAGES, check_locations

ARCHS = ("c2d", "i3d", "i3d_3x3x3", "slow")
BACKBONE_NORMS = ("batch", "frozen")  # the backbone's norm (the blocks' own norms are layers.nonlocal_block.NORMS)
SCORE_ACTIVATIONS = ("softmax", "sigmoid", None)

# what the networks of the paper use unless told otherwise: the block's defaults (embedded gaussian, init "auto")
# with the official code's video options (keys/values max-pooled 1x2x2, θᵀφ scaled by C'^-0.5)
NONLOCAL_DEFAULTS: Mapping[str, Any] = PAPER_VIDEO_OPTIONS
_NONLOCAL_OPTIONS = tuple(
    name
    for name, p in inspect.signature(NonLocalBlock.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "dim"
)


@dataclass(frozen=True)
class ClipLayout:
    """How the stem and the pools treat time, for one kind of input clip.

    Attributes:
        frames: T, the number of frames of the clip the layout is meant for.
        sampling_rate: one frame kept every this many frames of the video (informational: the data pipeline's).
        conv1_stride: temporal stride of conv1.
        pool1_kernel: temporal kernel of pool1 (spatially 3x3, stride 2).
        pool1_stride: temporal stride of pool1.
        pool2_kernel: temporal kernel of pool2 (after res2; spatially 1x1).
        pool2_stride: temporal stride of pool2.
        pool1_padding: spatial padding of pool1: 1 as Table 1, torchvision, PySlowFast and PyTorchVideo (56x56
            after pool1 at 224²; the default), 0 as the official Caffe2 builders (55x55; the "*_official"
            layouts, which converted official checkpoints use).

    A temporal kernel k is padded by (k - 1) // 2 frames on each side.
    """

    frames: int
    sampling_rate: int
    conv1_stride: int
    pool1_kernel: int
    pool1_stride: int
    pool2_kernel: int
    pool2_stride: int
    pool1_padding: int = 1


# 32 frames with every other one dropped; conv1, pool1 and pool2 each halve time: 32 -> 16 -> 8 -> (res2) -> 4
CLIP_32X2 = ClipLayout(
    frames=32, sampling_rate=2, conv1_stride=2, pool1_kernel=2, pool1_stride=2, pool2_kernel=2, pool2_stride=2
)
# the 128-frame models of Table 2(g) share the 32-frame stem: 128 -> 64 -> 32 -> 16
CLIP_128X1 = ClipLayout(
    frames=128, sampling_rate=1, conv1_stride=2, pool1_kernel=2, pool1_stride=2, pool2_kernel=2, pool2_stride=2
)
# 8 frames 8 apart: only pool2 halves time, 8 -> 4, so res3..res5 have the 32x2 model's temporal size
CLIP_8X8 = ClipLayout(
    frames=8, sampling_rate=8, conv1_stride=1, pool1_kernel=1, pool1_stride=1, pool2_kernel=2, pool2_stride=2
)
# Table 1 as printed: 3x3x3 pool1 and 3x1x1 pool2 (same sizes as CLIP_32X2)
PAPER_32X2 = ClipLayout(
    frames=32, sampling_rate=2, conv1_stride=2, pool1_kernel=3, pool1_stride=2, pool2_kernel=3, pool2_stride=2
)

CLIP_LAYOUTS: dict[str, ClipLayout] = {"32x2": CLIP_32X2, "8x8": CLIP_8X8, "128x1": CLIP_128X1}
# the official Caffe2 networks: the same, with pool1 unpadded (what a converted official checkpoint was trained in)
CLIP_LAYOUTS.update(
    {f"{name}_official": dataclasses.replace(layout, pool1_padding=0) for name, layout in list(CLIP_LAYOUTS.items())}
)
# mmaction2's I3D R50 32x2 (configs/_base_/models/i3d_r50.py): pool1 is 1x3x3 with temporal stride 2 (kernel 1,
# where the official code has 2); the same sizes as 32x2
CLIP_LAYOUTS["32x2_mmaction2"] = dataclasses.replace(CLIP_32X2, pool1_kernel=1)
# PyTorchVideo's Slow R50 8x8 (SlowFast's slow pathway): no temporal pooling anywhere, 8 frames down to res5
CLIP_LAYOUTS["8x8_slow"] = dataclasses.replace(CLIP_8X8, pool2_kernel=1, pool2_stride=1)


def i3d_inflated_blocks(layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The paper's I3D pattern: which residual blocks get a 3-frame temporal kernel.

    Every block of res2, the even-indexed blocks of res3 and res4 and the odd-indexed blocks of res5; for R50
    that is res2 [1,1,1], res3 [1,0,1,0], res4 [1,0,1,0,1,0], res5 [0,1,0], and for R101 every even block of res4.

    Args:
        layers: residual blocks in res2..res5.

    Returns:
        stage -> indices of the inflated blocks.
    """
    n2, n3, n4, n5 = layers
    return {
        "res2": tuple(range(n2)),
        "res3": tuple(range(0, n3, 2)),
        "res4": tuple(range(0, n4, 2)),
        "res5": tuple(range(1, n5, 2)),
    }


def slow_inflated_blocks(layers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The Slow pathway's pattern (SlowFast; PyTorchVideo's slow_r50): every block of res4 and res5 gets a 3x1x1
    branch2a, res2 and res3 none."""
    return {"res2": (), "res3": (), "res4": tuple(range(layers[2])), "res5": tuple(range(layers[3]))}


def _norm3d(norm: str, channels: int) -> nn.Module:
    return nn.BatchNorm3d(channels) if norm == "batch" else FrozenBatchNorm3d(channels)


def _init_conv(conv: nn.Conv3d) -> None:
    # MSRAFill of the official code: He-normal with fan_out
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class Bottleneck3d(nn.Module):
    """A residual bottleneck block for video: 1x1x1 (branch2a), 1x3x3 (branch2b), 1x1x1 (branch2c).

    Args:
        in_channels: channels of the block's input.
        inner_channels: channels of branch2a and branch2b.
        out_channels: channels of the output (4 x inner_channels in a ResNet).
        spatial_stride: stride of branch2b and of the projection shortcut (2 in block 0 of res3..res5).
        temporal_kernel_a: temporal kernel of branch2a (3 in the blocks I3D inflates, else 1).
        temporal_kernel_b: temporal kernel of branch2b (3 in the blocks "I3D 3x3x3" inflates, else 1).
        norm: "batch" (BatchNorm3d) or "frozen" (FrozenBatchNorm3d).

    A projection shortcut (1x1x1 conv + norm, the official "branch1") is used when the channels or the
    resolution change; ReLU follows the sum.
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int,
        out_channels: int,
        *,
        spatial_stride: int = 1,
        temporal_kernel_a: int = 1,
        temporal_kernel_b: int = 1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        for name, k in (("temporal_kernel_a", temporal_kernel_a), ("temporal_kernel_b", temporal_kernel_b)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd int; got {k}")
        self.conv_a = Conv3d(
            in_channels, inner_channels, (temporal_kernel_a, 1, 1), padding=(temporal_kernel_a // 2, 0, 0), bias=False
        )
        self.bn_a = _norm3d(norm, inner_channels)
        self.conv_b = Conv3d(
            inner_channels,
            inner_channels,
            (temporal_kernel_b, 3, 3),
            stride=(1, spatial_stride, spatial_stride),
            padding=(temporal_kernel_b // 2, 1, 1),
            bias=False,
        )
        self.bn_b = _norm3d(norm, inner_channels)
        self.conv_c = Conv3d(inner_channels, out_channels, 1, bias=False)
        self.bn_c = _norm3d(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        if in_channels != out_channels or spatial_stride != 1:
            self.shortcut: nn.Module | None = nn.Sequential(
                OrderedDict(
                    conv=Conv3d(in_channels, out_channels, 1, stride=(1, spatial_stride, spatial_stride), bias=False),
                    bn=_norm3d(norm, out_channels),
                )
            )
        else:
            self.shortcut = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convs He-normal (fan_out), norms to the identity (weight 1, bias 0)."""
        for conv in (self.conv_a, self.conv_b, self.conv_c):
            _init_conv(conv)
        for bn in (self.bn_a, self.bn_b, self.bn_c):
            bn.reset_parameters()
        if self.shortcut is not None:
            _init_conv(self.shortcut.conv)
            self.shortcut.bn.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.relu(self.bn_b(self.conv_b(y)))
        y = self.bn_c(self.conv_c(y))
        return self.relu(y + identity)


class ResStage(nn.Module):
    """One stage (res2..res5): residual blocks named "0", "1", ... and a non-local block "nl{i}" after block i.

    ``stage[i]`` is residual block i and ``stage.nl{i}`` (``getattr(stage, f"nl{i}")``) the non-local block after
    it; the forward pass runs the children in that order.

    Args:
        in_channels: channels entering the stage.
        inner_channels: bottleneck width of its blocks.
        out_channels: channels of its blocks' outputs.
        depth: number of residual blocks.
        spatial_stride: stride of block 0.
        inflated: indices of the blocks with a 3-frame temporal kernel.
        inflate_conv: which conv those blocks inflate: "a" (branch2a, 3x1x1) or "b" (branch2b, 3x3x3).
        norm: "batch" or "frozen".
        nonlocal_after: indices of the blocks a non-local block follows.
        nonlocal_options: keyword arguments of :class:`~nonlocalnet.layers.NonLocalBlock` (not ``dim``).
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int,
        out_channels: int,
        depth: int,
        *,
        spatial_stride: int,
        inflated: Sequence[int] = (),
        inflate_conv: str = "a",
        norm: str = "batch",
        nonlocal_after: Sequence[int] = (),
        nonlocal_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for i in range(depth):
            kt = 3 if i in inflated else 1
            self.add_module(
                str(i),
                Bottleneck3d(
                    in_channels if i == 0 else out_channels,
                    inner_channels,
                    out_channels,
                    spatial_stride=spatial_stride if i == 0 else 1,
                    temporal_kernel_a=kt if inflate_conv == "a" else 1,
                    temporal_kernel_b=kt if inflate_conv == "b" else 1,
                    norm=norm,
                ),
            )
            if i in nonlocal_after:
                self.add_module(f"nl{i}", NonLocalBlock(out_channels, dim=3, **(nonlocal_options or {})))
        self.depth = depth
        self.nonlocal_after = tuple(nonlocal_after)

    def __getitem__(self, index: int) -> Bottleneck3d:
        """Residual block ``index`` (0-based; negative counts from the end), whatever non-local blocks follow."""
        if not isinstance(index, int):
            raise TypeError(f"a stage is indexed by residual block number; got {index!r} (use getattr for 'nl{{i}}')")
        if not -self.depth <= index < self.depth:
            raise IndexError(f"this stage has {self.depth} residual blocks; got index {index}")
        return self._modules[str(index % self.depth)]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x

    def reset_parameters(self) -> None:
        """Re-initialises every block of the stage (each block owns its init)."""
        for module in self.children():
            module.reset_parameters()


class VideoClassifierHead(nn.Module):
    """Global average pool, dropout, fc; or the fc at every position (fully-convolutional testing).

    Args:
        in_features: channels of the res5 map.
        num_classes: outputs of the fc; 0 for no classifier (the pooled features are returned).
        dropout: dropout probability before the fc.
        pool_kernel: None (global average pool, the paper), or (t, h, w): average windows of this size (stride
            1) first, then the windows' results, as PyTorchVideo's ResNet head does (``AvgPool3d`` then the
            output pool). At a map of exactly that size both are the global average; on a larger map the border
            positions weigh less. A map smaller than the kernel is averaged whole.
    """

    def __init__(
        self, in_features: int, num_classes: int, dropout: float = 0.5, pool_kernel: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int (0 = no classifier); got {num_classes!r}")
        if pool_kernel is not None and (
            len(pool_kernel) != 3
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pool_kernel)
        ):
            raise ValueError(f"head_pool_kernel must be None or 3 positive ints (t, h, w); got {pool_kernel!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.pool_kernel = None if pool_kernel is None else tuple(pool_kernel)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc: nn.Module = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fc weights ~ N(0, 0.01²), bias 0 (the paper's head init)."""
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class logits (B, num_classes) from a (B, C, T, H, W) map; (B, C) features if ``pre_logits``."""
        if self.pool_kernel is not None:  # windowed average first (PyTorchVideo's head)
            kernel = tuple(min(k, n) for k, n in zip(self.pool_kernel, x.shape[2:]))
            x = nn.functional.avg_pool3d(x, kernel, stride=1)
        x = self.dropout(self.pool(x).flatten(1))  # (B, C, T, H, W) -> (B, C, 1, 1, 1) -> (B, C)
        return x if pre_logits else self.fc(x)

    def score_map(self, x: Tensor) -> Tensor:
        """The fc applied at every position of a (B, C, T, H, W) map: logits (B, num_classes, T, H, W)."""
        if not isinstance(self.fc, nn.Linear):
            raise RuntimeError("this head has no classifier (num_classes=0); call reset_classifier(n) first")
        x = self.dropout(x)
        return torch.einsum("bcthw,kc->bkthw", x, self.fc.weight) + self.fc.bias.view(1, -1, 1, 1, 1)

    def fully_convolutional(self, x: Tensor, activation: str | None = "softmax") -> Tensor:
        """The official test as logits: per-position scores, each through ``activation``, averaged over positions,
        returned as the logits whose ``activation`` gives that average.

        A model's output stays logits in either mode, so whoever scores it applies the same softmax or sigmoid:
        ``softmax(out)`` is the positions' averaged softmax (``out = log mean softmax``), ``sigmoid(out)`` their
        averaged sigmoid (``out = logit(mean sigmoid)``); both computed in log space, so a confident position does
        not round to log 0.

        Args:
            x: the res5 map (B, C, T, H, W), of any T, H, W.
            activation: "softmax" (single-label, the official Kinetics test), "sigmoid" (multi-label) or None
                (the positions' raw logits averaged, which equals the pooled path's logits).

        Returns:
            (B, num_classes) logits.
        """
        scores = self.score_map(x).flatten(2)  # (B, K, T, H, W) -> (B, K, P)
        log_positions = math.log(scores.shape[2])
        if activation == "softmax":  # log(mean_p softmax) = logsumexp_p(log_softmax) - log P
            return scores.log_softmax(dim=1).logsumexp(dim=2) - log_positions
        if activation == "sigmoid":  # logit(q) = log q - log(1 - q), q the mean sigmoid
            log_q = nn.functional.logsigmoid(scores).logsumexp(dim=2) - log_positions
            log_not_q = nn.functional.logsigmoid(-scores).logsumexp(dim=2) - log_positions
            return log_q - log_not_q
        return scores.mean(dim=2)  # (B, K, P) -> (B, K)


class ResNet3d(nn.Module):
    """A C2D or I3D bottleneck ResNet for video classification, with optional non-local blocks.

    Args:
        layers: residual blocks in res2..res5: (3, 4, 6, 3) for R50, (3, 4, 23, 3) for R101; any positive ints.
        arch: "c2d" (no temporal kernels but conv1's 1), "i3d" (conv1 5x7x7 and 3x1x1 branch2a in the blocks of
            :func:`i3d_inflated_blocks`), "i3d_3x3x3" (the same blocks inflate branch2b to 3x3x3; Table 2e) or
            "slow" (SlowFast's slow pathway: conv1 1x7x7, 3x1x1 branch2a in :func:`slow_inflated_blocks`).
        clip: the temporal layout of stem and pools: a name of :data:`CLIP_LAYOUTS` ("32x2", "8x8", "128x1",
            their "_official" variants, "32x2_mmaction2", "8x8_slow") or a :class:`ClipLayout`.
        width: bottleneck width of res2 (64 in the paper); stage i has width * 2**i, its output 4x that, and conv1
            has ``width`` channels.
        in_channels: channels of the input clip (3 for RGB).
        num_classes: classifier outputs; 0 for no classifier.
        dropout: dropout before the classifier.
        norm: "batch" (BatchNorm3d everywhere in the backbone) or "frozen" (FrozenBatchNorm3d, the 128-frame
            models). The non-local blocks' own norm is a non-local option.
        nonlocal_locations: stage -> indices of the residual blocks that a non-local block follows, e.g.
            ``{"res3": (1, 3), "res4": (1, 3, 5)}`` (see :mod:`nonlocalnet.models.placements`).
        nonlocal_options: keyword arguments of every :class:`~nonlocalnet.layers.NonLocalBlock`, on top of
            :data:`NONLOCAL_DEFAULTS` (the block's defaults, embedded gaussian, with the official code's video
            options: subsample (1, 2, 2), scale "auto" for the softmax modes, None for the others); e.g.
            ``dict(mode="dot_product")``. A network with the same placement built by hand or by name has the same
            blocks.
        nonlocal_stage_options: stage -> options overriding ``nonlocal_options`` in that stage, e.g.
            ``{"res3": {"temporal_groups": 4}}``.
        inflated_blocks: stage -> indices of the blocks with a temporal kernel, overriding the I3D pattern
            (only for the i3d archs).
        fully_convolutional: test mode: the fc is applied at every res5 position and the scores (through
            ``score_activation``) are averaged, as in the official test; the model still returns logits, those
            whose ``score_activation`` gives the averaged scores (see
            :meth:`VideoClassifierHead.fully_convolutional`). Also settable later as
            ``model.fully_convolutional = True``.
        score_activation: "softmax", "sigmoid" or None: what each position's logits go through in the
            fully-convolutional mode.
        conv1_temporal_kernel: temporal kernel of conv1; default 1 for c2d and slow, 5 for the i3d archs.
        head_pool_kernel: the head's windowed average before the global one (PyTorchVideo's head layout, see
            :class:`VideoClassifierHead`); None for the global average alone.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        *,
        arch: str = "c2d",
        clip: str | ClipLayout = "32x2",
        width: int = 64,
        in_channels: int = 3,
        num_classes: int = 400,
        dropout: float = 0.5,
        norm: str = "batch",
        nonlocal_locations: Mapping[str, Sequence[int]] | None = None,
        nonlocal_options: Mapping[str, Any] | None = None,
        nonlocal_stage_options: Mapping[str, Mapping[str, Any]] | None = None,
        inflated_blocks: Mapping[str, Sequence[int]] | None = None,
        fully_convolutional: bool = False,
        score_activation: str | None = "softmax",
        conv1_temporal_kernel: int | None = None,
        head_pool_kernel: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected 'batch' or 'frozen'")
        if score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(f"unknown score_activation {score_activation!r}; expected 'softmax', 'sigmoid' or None")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int; got {width!r}")
        if isinstance(clip, str):
            if clip not in CLIP_LAYOUTS:
                raise ValueError(f"unknown clip {clip!r}; expected one of {', '.join(CLIP_LAYOUTS)} or a ClipLayout")
            self.clip_name: str | None = clip
            clip = CLIP_LAYOUTS[clip]
        elif isinstance(clip, ClipLayout):
            self.clip_name = next((name for name, c in CLIP_LAYOUTS.items() if c == clip), None)
        else:
            raise ValueError(f"clip must be one of {', '.join(CLIP_LAYOUTS)} or a ClipLayout; got {clip!r}")
        self.clip = clip
        self.layers = tuple(layers)
        self.nonlocal_locations = check_locations(nonlocal_locations, self.layers)
        if arch == "c2d":
            if inflated_blocks:
                raise ValueError("arch='c2d' has no temporal kernels; inflated_blocks needs arch='i3d' or 'i3d_3x3x3'")
            self.inflated_blocks: dict[str, tuple[int, ...]] = {}
        else:
            default = slow_inflated_blocks if arch == "slow" else i3d_inflated_blocks
            pattern = default(self.layers) if inflated_blocks is None else inflated_blocks
            self.inflated_blocks = check_locations(pattern, self.layers, what="inflated_blocks")
        self.arch = arch
        self.width = width
        self.norm = norm
        stage_options = _nonlocal_stage_options(nonlocal_options, nonlocal_stage_options)

        conv1_kt = (1 if arch in ("c2d", "slow") else 5) if conv1_temporal_kernel is None else conv1_temporal_kernel
        if not isinstance(conv1_kt, int) or conv1_kt < 1 or conv1_kt % 2 == 0:
            raise ValueError(f"conv1_temporal_kernel must be a positive odd int; got {conv1_temporal_kernel!r}")
        self.conv1 = Conv3d(
            in_channels,
            width,
            (conv1_kt, 7, 7),
            stride=(clip.conv1_stride, 2, 2),
            padding=(conv1_kt // 2, 3, 3),
            bias=False,
        )
        self.bn1 = _norm3d(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.pool1 = MaxPool3d(
            (clip.pool1_kernel, 3, 3),
            stride=(clip.pool1_stride, 2, 2),
            padding=((clip.pool1_kernel - 1) // 2, clip.pool1_padding, clip.pool1_padding),
        )
        channels = width
        for i, stage in enumerate(STAGES):
            inner = width * 2**i
            stage_module = ResStage(
                channels,
                inner,
                4 * inner,
                self.layers[i],
                spatial_stride=1 if i == 0 else 2,
                inflated=self.inflated_blocks.get(stage, ()),
                inflate_conv="b" if arch == "i3d_3x3x3" else "a",
                norm=norm,
                nonlocal_after=self.nonlocal_locations.get(stage, ()),
                nonlocal_options=stage_options[stage],
            )
            self.add_module(stage, stage_module)
            channels = 4 * inner
            if stage == "res2":
                self.pool2 = MaxPool3d(
                    (clip.pool2_kernel, 1, 1),
                    stride=(clip.pool2_stride, 1, 1),
                    padding=((clip.pool2_kernel - 1) // 2, 0, 0),
                )
        self.num_features = channels
        self.head = VideoClassifierHead(channels, num_classes, dropout, head_pool_kernel)
        self.fully_convolutional = fully_convolutional
        self.score_activation = score_activation
        _init_conv(self.conv1)

    # --- timm-like interface -------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def get_classifier(self) -> nn.Module:
        """The final fc (an Identity when there is no classifier)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier by a freshly initialised one with ``num_classes`` outputs (0 removes it)."""
        self.head = VideoClassifierHead(self.num_features, num_classes, self.head.dropout.p, self.head.pool_kernel).to(
            self.conv1.weight
        )

    def reset_parameters(self) -> None:
        """Re-initialises the whole network; every module initialises the weights it owns."""
        _init_conv(self.conv1)
        self.bn1.reset_parameters()
        for stage in STAGES:
            getattr(self, stage).reset_parameters()
        self.head.reset_parameters()

    def forward_intermediates(self, x: Tensor) -> dict[str, Tensor]:
        """The output of every row of Table 1: conv1 (after BN and ReLU), pool1, res2, pool2, res3, res4, res5."""
        self._check_input(x)
        out: dict[str, Tensor] = {}
        x = out["conv1"] = self.relu(self.bn1(self.conv1(x)))
        x = out["pool1"] = self.pool1(x)
        x = out["res2"] = self.res2(x)
        x = out["pool2"] = self.pool2(x)
        x = out["res3"] = self.res3(x)
        x = out["res4"] = self.res4(x)
        out["res5"] = self.res5(x)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The res5 map (B, num_features, T', H', W') of a clip (B, in_channels, T, H, W)."""
        self._check_input(x)
        x = self.pool1(self.relu(self.bn1(self.conv1(x))))
        x = self.pool2(self.res2(x))
        return self.res5(self.res4(self.res3(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Logits (B, num_classes) from the res5 map; pooled features (B, num_features) if ``pre_logits``.

        In the fully-convolutional mode the result is the logits whose ``score_activation`` is the average over
        positions of each position's scores.
        """
        if self.fully_convolutional and not pre_logits:
            return self.head.fully_convolutional(x, self.score_activation)
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of a clip (B, in_channels, T, H, W), in either mode."""
        return self.forward_head(self.forward_features(x))

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"ResNet3d expects a clip (B, {self.conv1.in_channels}, T, H, W); got shape {tuple(x.shape)}"
            )
        t = x.shape[2]
        for name, layer in (("conv1", self.conv1), ("pool1", self.pool1), ("pool2", self.pool2)):
            k, s, p = _as3(layer.kernel_size)[0], _as3(layer.stride)[0], _as3(layer.padding)[0]
            t = (t + 2 * p - k) // s + 1
            if t < 1:
                raise ValueError(
                    f"a clip of {x.shape[2]} frames is too short for this network's {name} "
                    f"(clip layout {self.clip_name or self.clip}); give it more frames"
                )

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, arch={self.arch!r}, clip={self.clip_name or self.clip}, width={self.width}, "
            f"norm={self.norm!r}, nonlocal_locations={self.nonlocal_locations}"
        )


def _as3(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def _nonlocal_stage_options(
    options: Mapping[str, Any] | None, stage_options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """NONLOCAL_DEFAULTS <- options <- stage_options[stage], checked against the block's keyword arguments."""
    base = dict(NONLOCAL_DEFAULTS)
    base.update(_check_nonlocal_options(options or {}, "nonlocal_options"))
    stage_options = stage_options or {}
    for stage in stage_options:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} in nonlocal_stage_options; stages are {', '.join(STAGES)}")
    chosen = {
        stage: {**base, **_check_nonlocal_options(stage_options.get(stage, {}), f"nonlocal_stage_options[{stage!r}]")}
        for stage in STAGES
    }
    for stage, stage_chosen in chosen.items():  # the default scale is the softmax modes' (the official code's)
        asked = "scale" in (options or {}) or "scale" in stage_options.get(stage, {})
        if not asked and stage_chosen["mode"] not in SCALED_MODES:
            stage_chosen["scale"] = None
    return chosen


def _check_nonlocal_options(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_NONLOCAL_OPTIONS))
    if unknown:
        raise ValueError(
            f"{what} has unknown option(s) {', '.join(map(repr, unknown))}; NonLocalBlock takes "
            f"{', '.join(_NONLOCAL_OPTIONS)} (dim is always 3 here)"
        )
    return dict(options)
