"""A sampler that can restart in the middle of an epoch and splits each epoch across DDP ranks."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """The epoch's order is a permutation seeded by (seed, epoch) (or 0..n-1 without shuffling); rank r of W takes
    positions r, r + W, r + 2W, ... so each sample of an epoch goes to exactly one rank. ``skip(n)`` makes the
    next iteration start n samples (summed over ranks) into the epoch: how a run resumes mid-epoch without
    repeating or dropping data. ``len`` stays the full epoch's share, so the training loop's batch counter,
    restored from the checkpoint, ends the epoch at the right place."""

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0):
        if length <= 0:
            raise ValueError(f"ResumableSampler: the dataset is empty (length {length})")
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, num_samples: int) -> None:
        self._skip = int(num_samples)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.length, generator=g)

    def __len__(self) -> int:
        _, world = _rank_world()
        return self.length // world  # every rank the same count (the remainder is dropped)

    def __iter__(self) -> Iterator[int]:
        rank, world = _rank_world()
        order = self.order()[: (self.length // world) * world]
        start, self._skip = self._skip, 0
        yield from order[start + rank:: world].tolist()
