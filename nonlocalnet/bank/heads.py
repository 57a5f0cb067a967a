"""The baselines a feature-bank head is compared with: the clip alone, and the bank pooled without attention.

All heads take the same arguments as :class:`~nonlocalnet.layers.feature_bank.FeatureBankClassifier`:
``head(clip, bank)`` with clip features (B, C) and banks (B, bank_channels, L), and return scores
(B, num_classes). The long-term feature bank paper compares its operator with average and max pooling of the
bank in the same way (a linear classifier over the concatenation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.nonlocal_block import INIT_STD

__all__ = ["ClipOnlyHead", "PooledBankHead", "POOLINGS"]

POOLINGS = ("avg", "max")


class ClipOnlyHead(nn.Module):
    """The short-term baseline: dropout and a linear classifier on the clip feature; the bank is ignored.

    Args:
        clip_channels: channels of the clip feature.
        num_classes: number of classes.
        dropout: dropout before the classifier.
    """

    def __init__(self, clip_channels: int, num_classes: int, *, dropout: float = 0.5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(clip_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Classifier weights ~ N(0, 0.01²), bias 0."""
        nn.init.normal_(self.fc.weight, std=INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, clip: Tensor, bank: Tensor | None = None) -> Tensor:
        """Scores (B, num_classes) from clip features (B, C); ``bank`` is accepted and not used."""
        return self.fc(self.dropout(clip))


class PooledBankHead(nn.Module):
    """A linear classifier over [clip feature, the bank pooled over its entries] (no attention).

    Args:
        clip_channels: channels of the clip feature.
        bank_channels: channels of each bank entry.
        num_classes: number of classes.
        pooling: "avg" or "max" over the bank's L entries.
        dropout: dropout before the classifier.
    """

    def __init__(
        self, clip_channels: int, bank_channels: int, num_classes: int, *, pooling: str = "avg", dropout: float = 0.5
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(clip_channels + bank_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Classifier weights ~ N(0, 0.01²), bias 0."""
        nn.init.normal_(self.fc.weight, std=INIT_STD)
        nn.init.zeros_(self.fc.bias)

    def forward(self, clip: Tensor, bank: Tensor) -> Tensor:
        """Scores (B, num_classes) from clip features (B, C) and banks (B, bank_channels, L)."""
        pooled = bank.mean(dim=2) if self.pooling == "avg" else bank.amax(dim=2)  # (B, Cb, L) -> (B, Cb)
        return self.fc(self.dropout(torch.cat([clip, pooled], dim=1)))  # (B, C + Cb) -> (B, classes)
