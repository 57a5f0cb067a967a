"""The feature bank operator (Wu et al., "Long-Term Feature Banks", CVPR 2019): non-local attention from the
current clip to features of the whole video.

The non-local operation with x̂ taken from a memory: queries come from the short-term feature S of the current
clip, keys and values from a bank L of features computed earlier over the whole video. One layer is

    y = softmax(s * θ(S)ᵀ φ(L)) g(L)                   θ, φ, g: 1x1 convs to C' = 512, s = C'^-0.5
    S' = S + Dropout(W_out(ReLU(LayerNorm(y))))        W_out: 1x1 conv C' -> C, zero at init

LayerNorm takes the place of the block's BatchNorm, and W_out starts at zero so that every layer, and the
operator, starts as the identity on the clip path. Two layers are stacked, each attending over the same bank.
:class:`FeatureBankClassifier` concatenates the operator's output with the clip feature before the classifier.
The attention itself is the embedded-gaussian maths of :mod:`nonlocalnet.layers.pairwise`, the same as a
:class:`~nonlocalnet.layers.NonLocalBlock` given the bank as ``memory=`` (tested equal); the layer is its own
module because the follow-up orders the output differently (LayerNorm and ReLU *before* W_out, dropout after)
from the block's Norm(W_z y).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .nonlocal_block import INIT_STD, ChannelLayerNorm, _parse_scale
from .pairwise import pairwise_step

__all__ = ["FeatureBankLayer", "FeatureBankOperator", "FeatureBankClassifier"]

_SOFTMAX_IMPLS = ("auto", "dense", "sdpa", "chunked")


class FeatureBankLayer(nn.Module):
    """One feature-bank non-local layer: S' = S + Dropout(W_out(ReLU(LN(softmax(s θ(S)ᵀ φ(L)) g(L))))).

    Args:
        channels: C, channels of the clip feature S (and of the output).
        bank_channels: channels of the bank features L.
        inter_channels: C', channels of θ, φ, g (512 in the paper).
        scale: s multiplying θᵀφ before the softmax: "auto" (C'^-0.5, the paper), None (1) or a number.
        dropout: dropout rate on the layer's output before the residual sum (0.2 in the paper).
        impl: the softmax-attention path: "auto", "dense", "sdpa" or "chunked" (all exact).
    """

    def __init__(
        self,
        channels: int,
        bank_channels: int,
        *,
        inter_channels: int = 512,
        scale: float | str | None = "auto",
        dropout: float = 0.2,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("channels", channels),
            ("bank_channels", bank_channels),
            ("inter_channels", inter_channels),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if impl not in _SOFTMAX_IMPLS:
            raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(_SOFTMAX_IMPLS)}")
        self.channels = channels
        self.bank_channels = bank_channels
        self.inter_channels = inter_channels
        self.scale = _parse_scale(scale, inter_channels)
        self.impl = impl
        self.theta = nn.Conv1d(channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv1d(bank_channels, inter_channels, kernel_size=1)
        self.g = nn.Conv1d(bank_channels, inter_channels, kernel_size=1)
        self.norm = ChannelLayerNorm(inter_channels)
        self.out = nn.Conv1d(inter_channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """θ, φ, g ~ N(0, 0.01²); LayerNorm γ = 1, β = 0; W_out = 0 (the layer starts as the identity)."""
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=INIT_STD)
            nn.init.zeros_(conv.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, bank: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attends from the clip features to the bank.

        Args:
            x: clip features S (B, C, N): N query positions per clip (1 for a pooled clip feature, or RoIs).
            bank: bank features L (B, bank_channels, L): L entries of the same video.
            return_attention: also return the softmax weights (B, N, L).

        Returns:
            S' (B, C, N), or (S', weights).
        """
        q = self.theta(x).transpose(1, 2)  # (B, C, N) -> (B, C', N) -> (B, N, C')
        k = self.phi(bank).transpose(1, 2)  # (B, Cb, L) -> (B, C', L) -> (B, L, C')
        v = self.g(bank).transpose(1, 2)  # (B, Cb, L) -> (B, C', L) -> (B, L, C')
        # (B, N, C') and, if asked, (B, N, L): the block's path choice and precision policy (layers/pairwise.py)
        y, weights = pairwise_step(
            q, k, v, "embedded_gaussian", self.scale, self.impl, return_attention=return_attention
        )
        y = y.transpose(1, 2)  # (B, N, C') -> (B, C', N)
        z = x + self.dropout(self.out(torch.relu(self.norm(y))))  # (B, C, N)
        return (z, weights) if return_attention else z

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, bank_channels={self.bank_channels}, inter_channels={self.inter_channels}, "
            f"scale={self.scale:.4g}, impl={self.impl!r}"
        )


class FeatureBankOperator(nn.Module):
    """Stacked :class:`FeatureBankLayer` s: the clip feature attends over a bank of the whole video's features.

    Args:
        clip_channels: channels of the clip feature (and of the output).
        bank_channels: channels of each bank entry.
        inter_channels: C' of every layer (512 in the paper).
        num_layers: how many layers are stacked (2 in the paper).
        scale: see :class:`FeatureBankLayer` ("auto" = C'^-0.5, the paper).
        dropout: dropout of every layer (0.2 in the paper).
        impl: the softmax-attention path of every layer.
    """

    def __init__(
        self,
        clip_channels: int,
        bank_channels: int,
        *,
        inter_channels: int = 512,
        num_layers: int = 2,
        scale: float | str | None = "auto",
        dropout: float = 0.2,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
        self.clip_channels = clip_channels
        self.bank_channels = bank_channels
        self.layers = nn.ModuleList(
            FeatureBankLayer(
                clip_channels, bank_channels, inter_channels=inter_channels, scale=scale, dropout=dropout, impl=impl
            )
            for _ in range(num_layers)
        )

    def forward(
        self, clip: Tensor, bank: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The clip feature after attending over the bank.

        Args:
            clip: (B, C) pooled clip features, or (B, C, N) for N queries per clip.
            bank: (B, bank_channels, L) the video's bank; every video in a batch has L entries.
            return_attention: also return each layer's softmax weights, a list of (B, N, L).

        Returns:
            A tensor of the clip's shape, or (it, weights per layer).
        """
        pooled = clip.dim() == 2
        x = clip.unsqueeze(-1) if pooled else clip  # (B, C) -> (B, C, 1)
        if x.dim() != 3 or x.shape[1] != self.clip_channels:
            raise ValueError(
                f"clip features must be (B, {self.clip_channels}) or (B, {self.clip_channels}, N); "
                f"got {tuple(clip.shape)}"
            )
        if bank.dim() != 3 or bank.shape[1] != self.bank_channels or bank.shape[0] != x.shape[0]:
            raise ValueError(f"bank must be (B={x.shape[0]}, {self.bank_channels}, L); got {tuple(bank.shape)}")
        if bank.shape[2] == 0:
            raise ValueError("the bank is empty (L = 0): a video needs at least one bank entry")
        weights = []
        for layer in self.layers:
            if return_attention:
                x, w = layer(x, bank, return_attention=True)
                weights.append(w)
            else:
                x = layer(x, bank)
        out = x.squeeze(-1) if pooled else x  # (B, C, 1) -> (B, C)
        return (out, weights) if return_attention else out


class FeatureBankClassifier(nn.Module):
    """The long-term feature bank head: classifier over [clip feature, FBO(clip feature, bank)].

    Args:
        clip_channels: channels of the pooled clip feature.
        bank_channels: channels of each bank entry.
        num_classes: number of output classes.
        inter_channels, num_layers, scale, dropout, impl: of the :class:`FeatureBankOperator`.
        head_dropout: dropout before the final linear layer (0.5, the paper's classifier dropout).
    """

    def __init__(
        self,
        clip_channels: int,
        bank_channels: int,
        num_classes: int,
        *,
        inter_channels: int = 512,
        num_layers: int = 2,
        scale: float | str | None = "auto",
        dropout: float = 0.2,
        head_dropout: float = 0.5,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        self.operator = FeatureBankOperator(
            clip_channels,
            bank_channels,
            inter_channels=inter_channels,
            num_layers=num_layers,
            scale=scale,
            dropout=dropout,
            impl=impl,
        )
        self.dropout = nn.Dropout(head_dropout)
        self.fc = nn.Linear(2 * clip_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The classifier as the paper's: weights ~ N(0, 0.01²), bias 0."""
        nn.init.normal_(self.fc.weight, std=INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, clip: Tensor, bank: Tensor) -> Tensor:
        """Scores (B, num_classes) from clip features (B, C) and banks (B, bank_channels, L)."""
        if clip.dim() != 2:
            raise ValueError(f"FeatureBankClassifier takes pooled clip features (B, C); got {tuple(clip.shape)}")
        context = self.operator(clip, bank)  # (B, C)
        return self.fc(self.dropout(torch.cat([clip, context], dim=1)))  # (B, 2C) -> (B, classes)
