"""A distributed, resumable sampler: the order of an epoch depends only on (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Indices of one process's share of an epoch, optionally starting part-way through it.

    Every process draws the same permutation from ``(seed, epoch)`` and takes every ``world_size``-th index from
    ``rank`` on (the permutation is padded by wrapping around so all processes get the same number). ``start``
    skips the first indices of this process's share, which is how a resumed run picks up in the middle of an
    epoch without decoding the skipped samples.

    Args:
        size: dataset length.
        rank, world_size: this process and the number of processes.
        shuffle: permute (training) or keep the order (testing; then nothing is padded twice in the output
            of a single process, and the padding repeats the first indices).
        seed: the permutation's seed.
    """

    def __init__(
        self, size: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, pad: bool = True
    ) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's permutation and skips the first ``start`` indices of this process's share."""
        self.epoch = epoch
        self.start = start

    @property
    def per_process(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return max(self.per_process - self.start, 0)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = self.per_process * self.world_size
            order += order[: total - len(order)]
        share = order[self.rank :: self.world_size]
        return iter(share[self.start :])
