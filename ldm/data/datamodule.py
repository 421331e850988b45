"""LightningDataModule wrapping any image/caption dataset from this package."""

from __future__ import annotations

import logging
from typing import Callable, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, Subset

from ldm.data.collate import collate_image_caption
from ldm.data.resumable_sampler import ResumableSampler

log = logging.getLogger("ldm.data")

DatasetOrFactory = Union[Dataset, IterableDataset, Callable[[], Dataset]]


class ImageCaptionDataModule(L.LightningDataModule):
    """Train/val DataLoaders yielding `{"image": (B,3,H,W), "caption": list[str], ...}`.

    Args:
        train: a Dataset / IterableDataset, or a zero-argument callable building one
            (e.g. a Hydra `_partial_: true` config), built lazily in `setup()`.
        val: optional validation dataset (or callable).
        val_fraction: with no `val`, hold out this fraction of a map-style `train`,
            chosen deterministically from `seed`.
        batch_size: samples per batch (> 0); val_batch_size defaults to it.
        num_workers, pin_memory, persistent_workers: DataLoader options.
        seed: seed for the val split, the shuffling generator and worker seeds.
        shuffle: shuffle map-style training data.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        train: DatasetOrFactory,
        val: DatasetOrFactory | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and int(value) <= 0:
                raise ValueError(f"ImageCaptionDataModule: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"ImageCaptionDataModule: val_fraction must be in [0, 1), got {val_fraction!r}")
        if int(num_workers) < 0:
            raise ValueError(f"ImageCaptionDataModule: num_workers must be >= 0, got {num_workers!r}")
        self._train_source, self._val_source = train, val
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once and make the val split if asked for."""
        if self.train_dataset is not None:
            return
        train = _build(self._train_source, "train")
        val = _build(self._val_source, "val") if self._val_source is not None else None
        if val is None and self.val_fraction > 0:
            train, val = self.split_train_val(train)
        self.train_dataset, self.val_dataset = train, val

    def split_train_val(self, dataset: Dataset) -> tuple[Subset, Subset]:
        """Deterministic (by seed) disjoint split of a map-style dataset."""
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "ImageCaptionDataModule: val_fraction needs a map-style train dataset with a length; "
                f"got {type(dataset).__name__}. Pass an explicit `val` dataset instead."
            )
        n = len(dataset)
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise ValueError(f"ImageCaptionDataModule: val_fraction={self.val_fraction} leaves no training data ({n} samples)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))

    def build_sampler(self, dataset: Dataset, train: bool) -> Sampler | None:
        """Sampler for a map-style dataset (None for iterables). Training uses a ResumableSampler: the epoch's
        order depends only on (seed, epoch), it is split across DDP ranks, and it can start mid-epoch."""
        if isinstance(dataset, IterableDataset):
            return None
        if train:
            return ResumableSampler(len(dataset), shuffle=self.shuffle, seed=self.seed)
        return SequentialSampler(dataset)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        loader = self._loader(self.train_dataset, self.batch_size, train=True)
        if isinstance(loader.sampler, ResumableSampler):
            loader.sampler.skip(self._resumed_samples(len(loader)))
        return loader

    def _resumed_samples(self, batches_per_epoch: int) -> int:
        """Samples of the current epoch already trained on, from the trainer's restored loop state (0 when not
        resuming, or when the checkpoint was taken at the end of an epoch): batches done x batch size x world."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if done >= batches_per_epoch:
            return 0  # the saved epoch was complete: the next one starts from its beginning
        if done:
            log.info("resuming mid-epoch: the first %d batches of epoch %d are skipped (already trained on)",
                     done, trainer.current_epoch)
        return done * self.batch_size * trainer.world_size

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, train=False)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.build_sampler(dataset, train),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and train,
            collate_fn=collate_image_caption,
            generator=torch.Generator().manual_seed(self.seed + (0 if train else 1)),
        )


def _build(source: DatasetOrFactory, name: str) -> Dataset:
    """Return `source` if it is a dataset, else call it (a factory) and check the result."""
    if isinstance(source, Dataset) or hasattr(source, "__getitem__") or hasattr(source, "__iter__"):
        return source
    if callable(source):
        built = source()
        if not (isinstance(built, Dataset) or hasattr(built, "__getitem__") or hasattr(built, "__iter__")):
            raise TypeError(f"ImageCaptionDataModule: the {name} factory returned {type(built).__name__}, not a Dataset")
        return built
    raise TypeError(f"ImageCaptionDataModule: {name} must be a Dataset or a callable returning one, got {type(source).__name__}")
