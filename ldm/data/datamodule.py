"""LightningDataModule wrapping any image/caption dataset from this package."""

from __future__ import annotations

import logging
from typing import Any, Callable, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, Subset

from ldm.data.bad_samples import share_bad_sample_log
from ldm.data.bucket_sampler import BucketBatchSampler, bucket_assignment
from ldm.data.collate import collate_image_caption
from ldm.data.protocols import EpochAware
from ldm.data.resumable_sampler import ResumableSampler

log = logging.getLogger("ldm.data")

DatasetOrFactory = Union[Dataset, IterableDataset, Callable[[], Dataset]]

# batch entries that stay on the host: the rows' layout, read by the loss to split the batch (DreamBooth's class rows)
HOST_KEYS = ("is_prior",)


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
        drop_last: drop the last incomplete training batch (with aspect-ratio buckets every bucket keeps its last,
            smaller batch: see ldm.data.bucket_sampler).
        latent_cache: a folder: train(cfg) encodes the training set once with the frozen VAE (and text encoder)
            into it and trains from the cache, encoding only new or changed images on later runs (datasets with
            ``cache_spec()``; see ldm.training.run.latent_prep and ldm.data.auto_cache). None: on the fly.
        latent_cache_part_size: rows per part of that cache, the unit the ranks (and concurrent runs) share out
            when they build it (ldm.data.auto_cache.PART_SIZE by default).
        latent_cache_dtype: the precision the frozen networks encode that cache in: auto (bfloat16 where the
            device computes it natively, else float32), float32, bfloat16 or float16
            (ldm.training.run.latent_prep.encode_precision).
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
        latent_cache: str | None = None,
        latent_cache_part_size: int | None = None,
        latent_cache_dtype: str = "auto",
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
        self.latent_cache = latent_cache
        if latent_cache_part_size is not None and int(latent_cache_part_size) <= 0:
            raise ValueError(f"ImageCaptionDataModule: latent_cache_part_size must be a positive integer, got "
                             f"{latent_cache_part_size!r}")
        self.latent_cache_part_size = latent_cache_part_size
        if str(latent_cache_dtype).lower() not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"ImageCaptionDataModule: latent_cache_dtype must be auto, float32, bfloat16 or float16, "
                             f"got {latent_cache_dtype!r}")
        self.latent_cache_dtype = str(latent_cache_dtype).lower()
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._stream_positions: list | None = None  # per rank, from a checkpoint (see load_state_dict)
        self._stream_trainer = None  # the trainer whose fit already resumed the stream
        self.bad_samples_dir: str | None = None  # train(cfg) sets <run>/bad_samples: each bad sample named once

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once and make the val split if asked for."""
        if self.train_dataset is not None:
            return
        train = _build(self._train_source, "train")
        val = _build(self._val_source, "val") if self._val_source is not None else None
        if val is None and self.val_fraction > 0:
            train, val = self.split_train_val(train)
        self.train_dataset, self.val_dataset = train, val
        buckets = bucket_assignment(train)
        if buckets is not None:
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank == 0:  # printed, like the latent cache's messages: the run's start says it
                print(f"aspect-ratio buckets of the {len(buckets.bucket_of)} training images (batches of "
                      f"{self.batch_size} from one bucket; a bucket's last batch may be smaller):\n"
                      f"{buckets.describe()}")
        for dataset in (train, val):  # any reader of them (a latent cache build) names bad samples once too
            if self.bad_samples_dir is not None and dataset is not None:
                share_bad_sample_log(dataset, self.bad_samples_dir)

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
        if isinstance(loader.batch_sampler, BucketBatchSampler):  # as below, the skip counted in batches
            epoch, skip = self._resume_point(len(loader), in_batches=True)
            loader.batch_sampler.set_epoch(epoch)
            set_dataset_epoch(self.train_dataset, epoch)
            loader.batch_sampler.skip(skip)
        elif isinstance(loader.sampler, ResumableSampler):
            epoch, skip = self._resume_point(len(loader))
            # Lightning creates this loader's iterator (which starts the workers: they copy the dataset, and
            # take the sampler's first indices) before it sets the sampler's epoch, and after a mid-epoch resume
            # it calls no on_train_epoch_start: the epoch must be in place now (posterior draws of a latent
            # cache, shuffled order), for the workers too
            loader.sampler.set_epoch(epoch)
            set_dataset_epoch(self.train_dataset, epoch)
            loader.sampler.skip(skip)
        elif _has_stream_position(self.train_dataset):
            self._resume_stream(self.train_dataset)
        return loader

    def _resume_stream(self, dataset) -> None:
        """Iterable dataset with a stream position (WebDatasetSource): set the epoch of the first loader of a fit
        and, when the fit resumes mid-epoch, continue right after the checkpoint's batches. Later loaders (a
        reload, or a loader used after training) start their epoch at the beginning."""
        trainer = getattr(self, "trainer", None)
        positions, self._stream_positions = self._stream_positions, None
        if trainer is None or self._stream_trainer is trainer:
            dataset.resume_from(None)
            return
        self._stream_trainer = trainer
        epoch, progress = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch:
            # the checkpoint's epoch was complete: Lightning ends it without fetching and goes on to the next
            # epoch with this same loader (which it iterates before DatasetEpochCallback sets that epoch)
            dataset.set_epoch(epoch + 1)
            dataset.resume_from(None)
            return
        dataset.set_epoch(epoch)  # also iterated before DatasetEpochCallback runs (which it skips mid-epoch)
        rank, world, workers = trainer.global_rank, trainer.world_size, max(1, self.num_workers)
        done = int(progress.current.ready)
        if positions is None:  # a checkpoint from before stream positions were saved
            position = None
            if done:
                log.warning("resuming mid-epoch without a saved stream position: assuming the %d batches done in "
                            "epoch %d came round-robin from %d worker(s), with no unreadable sample dropped",
                            done, epoch, workers)
                position = dataset.position_after_batches(epoch, done, self.batch_size, workers, world)
        else:  # None or another epoch: nothing of this epoch was trained on
            position = positions[rank] if rank < len(positions) else None
            if position is not None and position["epoch"] != epoch:
                position = None
        if position is not None and (position["workers"], position["world_size"]) != (workers, world):
            log.warning("the checkpoint's stream position is for %d DataLoader worker(s) x %d rank(s), this run has "
                        "%d x %d: epoch %d starts again from its beginning (its first %d batches are seen twice)",
                        position["workers"], position["world_size"], workers, world, epoch, position["batches"])
            position = None
        if position is not None:
            log.info("resuming mid-epoch: the stream continues after the %d batches of epoch %d already trained on",
                     position["batches"], epoch)
        dataset.resume_from(position)

    def state_dict(self) -> dict:
        """For an iterable training dataset with a stream position (WebDatasetSource): every rank's position after
        the batches trained on so far, so that a resumed run continues the epoch exactly there."""
        if not _has_stream_position(self.train_dataset):
            return {}
        position = self.train_dataset.position()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            positions: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(positions, position)
        else:
            positions = [position]
        return {"train_stream_positions": positions}

    def load_state_dict(self, state_dict: dict) -> None:
        self._stream_positions = state_dict.get("train_stream_positions")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches of a dataset with a stream position carry it: record them as trained on."""
        if _has_stream_position(self.train_dataset):
            self.train_dataset.consume(batch)
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Every tensor to the device but the rows' layout (``is_prior``: DreamBooth's class rows), which the loss
        reads on the host to split the batch (on the device, that read would stall every training step)."""
        if not (isinstance(batch, dict) and any(k in batch for k in HOST_KEYS)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in HOST_KEYS}, device,
                                                 dataloader_idx)
        return {**moved, **{k: batch[k] for k in HOST_KEYS if k in batch}}

    def _resume_point(self, batches_per_epoch: int, in_batches: bool = False) -> tuple[int, int]:
        """(epoch, samples of it already trained on) where this training loader starts, from the trainer's
        loop state (restored from the checkpoint when resuming): (0, 0) without a trainer; the next epoch from
        its beginning when the checkpoint was taken at the end of an epoch; the samples skipped are batches done
        x batch size x world size (``in_batches``: the batches done by each rank)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        epoch = int(trainer.current_epoch)
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if done >= batches_per_epoch:
            # the saved epoch was complete (or a reload at an epoch start): Lightning ends it without fetching and
            # goes on to the next epoch with this same loader when resuming
            return epoch + (1 if trainer.fit_loop.restarting else 0), 0
        if done:
            log.info("resuming mid-epoch: the first %d batches of epoch %d are skipped (already trained on)",
                     done, epoch)
        return epoch, done if in_batches else done * self.batch_size * trainer.world_size

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, train=False)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        if self.bad_samples_dir is not None:  # before the DataLoader's workers copy the dataset
            share_bad_sample_log(dataset, self.bad_samples_dir)
        collate = _collate_of(dataset)
        if train and _has_stream_position(dataset):
            collate = dataset.tracking_collate(collate)  # batches carry their stream position, see _resume_stream
        buckets = None if isinstance(dataset, IterableDataset) else bucket_assignment(dataset)
        if buckets is not None:  # aspect-ratio buckets: every batch from one bucket (ldm.data.bucket_sampler)
            batches = BucketBatchSampler(buckets.bucket_of, batch_size, shuffle=self.shuffle and train,
                                         seed=self.seed, split_ranks=train)
            return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                              pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                              collate_fn=collate, generator=torch.Generator().manual_seed(self.seed + (0 if train else 1)))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.build_sampler(dataset, train),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and train,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed + (0 if train else 1)),
        )


def set_dataset_epoch(dataset, epoch: int) -> None:
    """Tell a dataset with ``set_epoch`` (a latent cache's posterior draws, webdataset shards), also under a
    ``Subset`` (a val split), which epoch it serves."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, EpochAware):
        dataset.set_epoch(epoch)


def _collate_of(dataset):
    """The dataset's own ``collate_fn`` (DreamBooth: instance rows + class rows), else collate_image_caption."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate_fn", None) or collate_image_caption


def _has_stream_position(dataset) -> bool:
    """An iterable dataset that can report and resume its stream position (`ldm.data.webdataset`)."""
    return isinstance(dataset, IterableDataset) and all(
        callable(getattr(dataset, name, None)) for name in ("tracking_collate", "consume", "position", "resume_from",
                                                            "position_after_batches", "set_epoch"))


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
