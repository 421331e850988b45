"""Batches of one aspect-ratio bucket each, resumable mid-epoch and split across DDP ranks.

The epoch's batches, from (seed, epoch) only: every bucket's images in a seeded random order, cut into batches of
``batch_size`` (kohya's BucketManager: the last batch of a bucket is smaller, so a bucket with fewer images than a
batch gives one smaller batch and no image is dropped), then the list of batches in a seeded random order. Rank r
of W takes batches r, r + W, ...; when the count is not a multiple of W, the first batches of the order are
repeated to fill the last round (as torch's DistributedSampler pads), so every image of the epoch is trained on and
the ranks take the same number of steps. ``skip(n)`` starts the next iteration after the first n batches of this
rank: the exact mid-epoch resume of `ResumableSampler`, counted in batches since their sizes differ.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler, Subset

from ldm.data.buckets import BucketAssignment
from ldm.data.resumable_sampler import _rank_world


def bucket_assignment(dataset) -> BucketAssignment | None:
    """The dataset's `BucketAssignment` (through Subsets: of the selected items), None without buckets."""
    if isinstance(dataset, Subset):
        inner = bucket_assignment(dataset.dataset)
        return None if inner is None else inner.subset(dataset.indices)
    return getattr(dataset, "bucket_assignment", None)


class BucketBatchSampler(Sampler[list[int]]):
    """``split_ranks=False``: every rank iterates all batches (a validation loader, like its SequentialSampler)."""

    def __init__(self, bucket_of: list[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 split_ranks: bool = True):
        if not bucket_of:
            raise ValueError("BucketBatchSampler: the dataset is empty")
        if int(batch_size) <= 0:
            raise ValueError(f"BucketBatchSampler: batch_size must be positive, got {batch_size!r}")
        self.bucket_of, self.batch_size = [int(b) for b in bucket_of], int(batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch, self._skip, self.split_ranks = 0, 0, bool(split_ranks)
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            members.setdefault(bucket, []).append(index)
        self.members = [members[b] for b in sorted(members)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> "BucketBatchSampler":
        """Itself: Lightning sets each epoch start on ``loader.sampler`` and ``loader.batch_sampler.sampler``, never
        on a batch sampler (``lightning.fabric.utilities.data._set_sampler_epoch``), so without this every epoch of
        an uninterrupted run would repeat epoch 0's batches while a resumed run takes its epoch's: not the same run."""
        return self

    def skip(self, num_batches: int) -> None:
        """The next iteration starts after this rank's first ``num_batches`` batches of the epoch."""
        self._skip = int(num_batches)

    def batches(self) -> list[list[int]]:
        """Every batch of the epoch, in the epoch's order (the same on every rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for indices in self.members:
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
            batches += [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def _rank_world(self) -> tuple[int, int]:
        return _rank_world() if self.split_ranks else (0, 1)

    def __len__(self) -> int:
        _, world = self._rank_world()
        n = sum(math.ceil(len(m) / self.batch_size) for m in self.members)
        return math.ceil(n / world)

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._rank_world()
        batches = self.batches()
        rounds = math.ceil(len(batches) / world)
        padded = (batches * world)[: rounds * world]  # the first batches again, to fill the last round
        start, self._skip = self._skip, 0
        yield from padded[(start * world) + rank:: world]
