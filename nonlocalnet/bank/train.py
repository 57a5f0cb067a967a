"""Training and evaluating a head on top of a feature bank.

A sample is one clip of one video: the query is that clip's feature, the bank is the features of all clips
of the same video (the clip itself included, as in the long-term feature bank paper), the target is the
video's label. Accuracy is reported per clip and per video (softmax scores averaged over the video's clips,
the paper's multi-clip testing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .store import FeatureBank

__all__ = ["BankSamples", "train_head", "evaluate_head"]


@dataclass
class BankSamples:
    """Every (video, clip) sample of a set of videos whose banks have the same length.

    Attributes:
        features: (V, L, C) the L clip features of each of V videos.
        labels: (V,) video labels.
        videos: the V video ids, in order.
    """

    features: Tensor
    labels: Tensor
    videos: list[str]

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(f"features must be (V, L, C); got {tuple(self.features.shape)}")
        if self.labels.shape != (self.features.shape[0],):
            raise ValueError(f"labels must be ({self.features.shape[0]},); got {tuple(self.labels.shape)}")
        if len(self.videos) != self.features.shape[0]:
            raise ValueError(f"{len(self.videos)} video ids for {self.features.shape[0]} videos")

    @classmethod
    def from_bank(cls, bank: FeatureBank, labels: Mapping[str, int]) -> BankSamples:
        """Samples of every video of ``bank``, labelled by ``labels`` (video id -> label).

        Raises:
            ValueError: if a video has no label or the videos' banks differ in length.
        """
        videos = list(bank.features)
        missing = [v for v in videos if v not in labels]
        if missing:
            raise ValueError(f"no label for {len(missing)} videos of the bank, e.g. {missing[:3]}")
        lengths = {bank.features[v].shape[0] for v in videos}
        if len(lengths) != 1:
            raise ValueError(f"BankSamples needs banks of one length; found lengths {sorted(lengths)}")
        features = torch.stack([bank.features[v] for v in videos])  # V x (L, C) -> (V, L, C)
        return cls(features, torch.tensor([int(labels[v]) for v in videos]), videos)

    @property
    def num_clips(self) -> int:
        """L, clips per video."""
        return self.features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0] * self.features.shape[1]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples ``index`` (flat indices video * L + clip): clip (n, C), bank (n, C, L), label (n,)."""
        video, clip = index // self.num_clips, index % self.num_clips
        return (
            self.features[video, clip],  # (n, C)
            self.features[video].transpose(1, 2),  # (n, L, C) -> (n, C, L)
            self.labels[video],
        )


def train_head(
    head: nn.Module,
    samples: BankSamples,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "train head",
) -> list[float]:
    """Trains ``head(clip, bank) -> scores`` with cross-entropy (AdamW, cosine learning rate).

    Args:
        head: the head to train (in place).
        samples: training samples.
        epochs: passes over all (video, clip) samples.
        batch_size: samples per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        seed: seed of the sample order.
        device: where to train.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.

    Returns:
        The mean training loss of every epoch.
    """
    head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(samples) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(samples), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(samples), batch_size):
            clip, bank, label = (t.to(device) for t in samples.batch(order[start : start + batch_size]))
            loss = F.cross_entropy(head(clip, bank), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * label.shape[0]
            count += label.shape[0]
            bar.update(1)
        losses.append(total / count)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    head.eval()
    return losses


@torch.no_grad()
def evaluate_head(
    head: nn.Module, samples: BankSamples, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Clip accuracy and video accuracy (softmax averaged over each video's clips) of ``head``, in eval mode."""
    head.to(device).eval()
    probs = []
    for start in range(0, len(samples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(samples)))
        clip, bank, _ = (t.to(device) for t in samples.batch(index))
        probs.append(head(clip, bank).softmax(dim=1).cpu())
    probs = torch.cat(probs).view(samples.features.shape[0], samples.num_clips, -1)  # (V*L, K) -> (V, L, K)
    labels = samples.labels
    clip_acc = (probs.argmax(dim=2) == labels[:, None]).float().mean().item()
    video_acc = (probs.mean(dim=1).argmax(dim=1) == labels).float().mean().item()
    return {"clip_accuracy": clip_acc, "video_accuracy": video_acc}
