"""Streaming image/caption pairs from WebDataset tar shards, resumable mid-epoch.

Shards are split by DDP rank and then by DataLoader worker (`urls[rank::world][worker::workers]`, the same split
as `wds.split_by_node` / `wds.split_by_worker`), so every sample is read once per epoch as long as there are at
least `world_size * num_workers` shards. With `resampled=True` each worker instead draws shards at random forever
(use `epoch_size` or the trainer's max_steps).

Each worker's stream is a pure function of (seed, epoch, rank, worker role): shard order, shuffle buffer and crop /
flip randomness do not depend on how often this process has iterated, so a resumed run reads exactly what the
uninterrupted run would have read.

The stream position (the cursor that makes mid-epoch resume exact)
----------------------------------------------------------------------
A rank's epoch is `workers` independent streams, one per *role* (role r reads shards `[r::workers]` of the rank's
share). Inside a role's stream, raw tar samples go through the shuffle buffer and are then decoded; undecodable
ones are dropped there. A role's place in its stream is therefore

* `raw`: raw samples taken out of the shuffle buffer so far (decoded or dropped as bad). Skipping that many buffer
  outputs *without decoding them* reproduces the buffer and the decode stage exactly, bad samples included, which
  a count of good samples could not;
* `yielded`: good samples produced (what `epoch_size` limits);
* `shard`, `offset`: where the next raw sample comes from (the `shard`-th shard of the role's shard sequence,
  after `offset` samples of it). Without a shuffle buffer this is used to skip whole shards without opening them.

The DataLoader takes its batches round-robin from its workers (skipping the ones that ran dry), so which role is
`next_role` matters too: a resumed loader's worker i plays role `(next_role + i) % workers`, and its batches come
out in the order the uninterrupted run would have produced them even when the roles' streams have different
lengths.

The position is measured where batches are consumed, not where they are produced (workers run ahead): the
training DataLoader's collate function (`tracking_collate`) stamps each batch with the position of its last sample,
and the datamodule hands every batch the trainer takes to `consume`, which removes the stamp and keeps the
latest position per role. `position()` is saved in the checkpoint and `resume_from()` gives it back to a new
process. Checkpoints without a saved position can use `position_after_batches`, which assumes no bad sample
was skipped and every worker still had data.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from ldm.data.bad_samples import BadSampleTracker, decode_image
from ldm.data.captions import CaptionProcessor, caption_cache_fields
from ldm.data.transforms import ImageTransform
from ldm.formats.safe_load import json_value

logger = logging.getLogger("ldm.data")

POSITION_KEY = "__stream_position__"
"""Key under which samples and batches of a tracked stream carry their position (see the module docstring)."""

_POSITION_VERSION = 1


class WebDatasetSource(IterableDataset):
    """IterableDataset over tar shards yielding `{"image", "caption", "key"}`.

    Args:
        urls: shard path(s) or URL(s); a string may use brace patterns
            ("shards-{000..009}.tar") and "::" to join lists; a list is used as is.
        resolution, center_crop, random_flip: passed to `ImageTransform`.
        shuffle_buffer: size of the sample shuffle buffer (0 or 1 disables it).
        shuffle_shards: shuffle shard order each epoch (non-resampled mode).
        resampled: draw shards with replacement, endlessly.
        seed: base seed. Shard order depends on (seed, epoch) only, so all ranks and
            workers agree on it; the shuffle buffer, resampling and crop/flip randomness
            depend on (seed, epoch, rank, worker role) only, so they change every epoch and
            are the same in a resumed run.
        image_keys, caption_keys: file extensions to look for, in order of preference.
        json_caption_field: field holding the caption inside a `.json` member.
        epoch_size: samples per epoch on each rank (split across workers); the
            stream repeats (or resamples) until it is reached. None: one pass.
        captions: caption options (`ldm.data.captions.CaptionProcessor` fields, config `data.train.captions`),
            applied per (seed, epoch, sample key); None: captions as read. (Caption members: caption_keys.)
        split_by_rank: each DDP rank reads its share of the shards (`urls[rank::world_size]`); False: every
            process reads all of them (the latent cache's sources: which process encodes what is its own plan).

    Mid-epoch resume: `position()`, `resume_from()`, `tracking_collate()` and `consume()`
    (see the module docstring); `ImageCaptionDataModule` uses them.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        resolution: int = 256,
        center_crop: bool = True,
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resampled: bool = False,
        seed: int = 0,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("txt", "json"),
        json_caption_field: str = "caption",
        epoch_size: int | None = None,
        captions: CaptionProcessor | dict | None = None,
        buckets: dict | None = None,
        split_by_rank: bool = True,
    ):
        super().__init__()
        from ldm.data.buckets import BucketSettings

        if BucketSettings.of(buckets).enabled:
            raise ValueError("data.train.buckets: aspect-ratio buckets are not supported for webdataset shards (a "
                             "stream cannot be grouped by bucket without reading it ahead); webdataset stays square: "
                             "set data.train.buckets.enabled=false, or use data=folder / data=hf")
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError(f"WebDatasetSource: no shards in urls={urls!r}")
        if epoch_size is not None and int(epoch_size) <= 0:
            raise ValueError(f"WebDatasetSource: epoch_size must be positive or None, got {epoch_size!r}")
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_shards = bool(shuffle_shards)
        self.resampled = bool(resampled)
        self.seed = int(seed)
        self.image_keys = tuple(k.lower().lstrip(".") for k in image_keys)
        self.caption_keys = tuple(k.lower().lstrip(".") for k in caption_keys)
        self.json_caption_field = json_caption_field
        self.caption_options = CaptionProcessor.of(captions)
        if self.caption_options.extension != ".txt":
            raise ValueError("WebDatasetSource: data.train.captions.extension is for image folders; a shard's caption "
                             f"members are chosen by data.train.caption_keys (now {list(self.caption_keys)})")
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        self.split_by_rank = bool(split_by_rank)
        self.transform = _PerSampleRandomTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        # shared memory: persistent DataLoader workers keep their copy of the dataset, yet must see set_epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.missing_captions = 0
        self._bad = BadSampleTracker(f"WebDatasetSource({self.urls[0]}{', ...' if len(self.urls) > 1 else ''})")
        self._resume: dict[str, Any] | None = None  # where the next pass of its epoch starts
        self._consumed: dict[str, Any] | None = None  # position after the last consumed batch (main process)
        self._stamp = False  # samples carry POSITION_KEY (turned on by tracking_collate)

    @property
    def bad_samples(self) -> set[str]:
        """Samples ("url:key") or shards that failed in this process."""
        return set(self._bad.bad)

    @property
    def errors(self) -> int:
        """How many errors were skipped in this process (workers count separately)."""
        return self._bad.errors

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the next pass (shard order, shuffle); call it on every rank before iterating. Also
        reaches persistent DataLoader workers. A resume position for another epoch is dropped."""
        self._epoch.fill_(int(epoch))
        if self._resume is not None and self._resume["epoch"] != int(epoch):
            self._resume = None

    # ------------------------------------------------------------------------------------------- stream position
    def tracking_collate(self, collate_fn: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
        """Wrap `collate_fn` for the training DataLoader: from now on samples carry their stream position and each
        batch (a dict) gets the position of its last sample under `POSITION_KEY`; pass the batches the trainer
        takes to `consume`, which removes it again."""
        self._stamp = True
        return _PositionCollate(collate_fn)

    def consume(self, batch: Any) -> None:
        """Record that `batch` (from a `tracking_collate` loader) was trained on, and remove its position stamp;
        anything else is left alone. Call it in the main process, in the order the batches are used."""
        if not isinstance(batch, dict) or POSITION_KEY not in batch:
            return
        epoch, workers, role, raw, yielded, shard, offset = batch.pop(POSITION_KEY)
        position = self._consumed
        world_size = wds.utils.pytorch_worker_info()[1]
        same_stream = position is not None and (position["epoch"], position["workers"], position["world_size"]) == (
            epoch, workers, world_size)
        if not same_stream:  # the first batch of an epoch
            position = self._consumed = _start_position(epoch, workers, world_size)
        position["roles"][role] = {"raw": raw, "yielded": yielded, "shard": shard, "offset": offset}
        position["next_role"] = (role + 1) % workers
        position["batches"] += 1

    def position(self) -> dict[str, Any] | None:
        """This rank's stream position after the last consumed batch (or the one given to `resume_from`), as plain
        ints and lists for a checkpoint; None before the first batch."""
        return copy.deepcopy(self._consumed)

    def resume_from(self, position: dict[str, Any] | None) -> None:
        """Make the next pass of epoch `position["epoch"]` continue right after `position` (from `position()` of
        an earlier process on the same rank, or `position_after_batches`); None: start passes at the beginning.
        Call it before the DataLoader is iterated, with the same number of workers and ranks as when the
        position was taken (checked when iterating). Passes of other epochs are not affected."""
        if position is not None:
            _check_position(position)
            position = copy.deepcopy(position)
            if position["epoch"] != self.epoch:
                raise ValueError(f"WebDatasetSource.resume_from: the position is in epoch {position['epoch']} but the "
                                 f"dataset is at epoch {self.epoch}; call set_epoch({position['epoch']}) first")
        self._resume = position
        self._consumed = copy.deepcopy(position)

    def position_after_batches(self, epoch: int, batches_done: int, batch_size: int, num_workers: int,
                               world_size: int = 1) -> dict[str, Any]:
        """The position after `batches_done` batches of `batch_size` in `epoch`, for checkpoints that saved none.
        The DataLoader takes batch k from worker k % workers, so worker w produced ceil((batches_done - w) /
        workers) batches. Exact only if no bad sample was dropped in those batches and no worker had run dry."""
        if batches_done < 0 or batch_size <= 0:
            raise ValueError(f"position_after_batches: need batches_done >= 0 and batch_size > 0, got "
                             f"{batches_done}, {batch_size}")
        workers = max(1, int(num_workers))
        position = _start_position(int(epoch), workers, int(world_size))
        for role, state in enumerate(position["roles"]):
            samples = max(0, math.ceil((batches_done - role) / workers)) * batch_size
            state.update(raw=samples, yielded=samples, shard=None, offset=None)
        position["next_role"] = batches_done % workers
        position["batches"] = int(batches_done)
        return position

    # ------------------------------------------------------------------------------------------------- iteration
    @property
    def resolution(self) -> int:
        return self.transform.resolution

    def cache_spec(self):
        """What the automatic latent cache depends on: every shard (with its size and mtime when it is a local
        file), the keys read and the transform. The stream is read once in shard order and cached one part per
        shard (`CacheSpec.shards`), so the ranks of a DDP run each encode a share of the shards."""
        import os

        from ldm.data.auto_cache import CacheSpec, place_digest

        shards = []
        for url in self.urls:
            path = url[len("file:"):] if url.startswith("file:") else url
            try:
                stat = os.stat(path)
                shards.append([place_digest(path), stat.st_size, stat.st_mtime_ns])  # a local file: no path kept
            except OSError:  # a URL: its name is all we know
                shards.append([url])
        t = self.transform
        settings = {"kind": "WebDatasetSource", "shards": shards, "image_keys": list(self.image_keys),
                    "caption_keys": list(self.caption_keys), "json_caption_field": self.json_caption_field,
                    "resolution": t.resolution, "center_crop": t.center_crop,
                    "parts": "one per shard"}  # before: one part of the whole stream, under another key

        def plain(urls: list[str], captions) -> WebDatasetSource:  # in shard order, unaugmented, in every rank
            return WebDatasetSource(urls, resolution=t.resolution, center_crop=True, random_flip=False,
                                    shuffle_buffer=0, shuffle_shards=False, resampled=False, seed=self.seed,
                                    image_keys=self.image_keys, caption_keys=self.caption_keys,
                                    json_caption_field=self.json_caption_field, captions=captions,
                                    split_by_rank=False)

        whole = plain(self.urls, self.caption_options)
        fields = caption_cache_fields(whole, settings)  # random caption options: the cache holds captions as read
        return CacheSpec(settings, None, whole, flip=t.random_flip, random_crop=not t.center_crop,
                         resolution=t.resolution, shards=[plain([url], whole.caption_options) for url in self.urls],
                         **fields)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, workers = wds.utils.pytorch_worker_info()
        if not self.split_by_rank:
            rank, world_size = 0, 1
        epoch = self.epoch
        if not self.resampled and len(self.urls) < world_size * workers and rank == worker == 0:
            logger.warning(
                "WebDatasetSource: %d shards for %d ranks x %d workers; some will get no data. "
                "Write more shards or use resampled=True.", len(self.urls), world_size, workers,
            )
        start = self._resume if self._resume is not None and self._resume["epoch"] == epoch else None
        if start is not None and (start["workers"], start["world_size"]) != (workers, world_size):
            raise ValueError(
                f"WebDatasetSource: the resume position was taken with {start['workers']} DataLoader worker(s) x "
                f"{start['world_size']} rank(s), but this pass runs {workers} x {world_size}; resume with the same "
                "num_workers (0 counts as 1) and number of ranks, or call resume_from(None) to restart the epoch")
        role = worker if start is None else (start["next_role"] + worker) % workers
        begin = start["roles"][role] if start is not None else _start_role()
        stream = f"{self.seed}-{epoch}-{rank}-{role}"

        read = [0]  # raw samples read so far, so endless shard loops can tell when nothing is readable
        shards = self._shards(epoch, rank, world_size, role, workers, stream, read)
        buffered = self.shuffle_buffer > 1
        if not buffered and begin["shard"] is not None:
            raw = self._read(shards, read, begin["shard"], begin["offset"])  # whole shards skipped unopened
        else:
            raw = self._read(shards, read, 0, 0)
            if buffered:
                rng = random.Random(f"buffer-{stream}")
                raw = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
            raw = itertools.islice(raw, begin["raw"], None)  # replayed through the buffer, not decoded
        share = None if self.epoch_size is None else _share(self.epoch_size, role, workers)
        stamp = (epoch, workers, role) if self._stamp else None
        yield from self._decode_stream(raw, begin["raw"], begin["yielded"], share, stream, stamp)

    def _shards(self, epoch: int, rank: int, world_size: int, role: int, workers: int, stream: str,
                read: list[int]) -> Iterator[str]:
        """This role's shard URLs: its split of the (seeded) shard order, or resampled; repeated if epoch_size."""
        if self.resampled:
            rng = random.Random(f"resample-{stream}")
            while True:
                before = read[0]
                for _ in range(2 * len(self.urls)):
                    yield rng.choice(self.urls)
                if read[0] == before:
                    raise RuntimeError(f"WebDatasetSource: no readable samples in any of {self.urls}")
        for repeat in itertools.count():
            before = read[0]
            urls = list(self.urls)
            if self.shuffle_shards:
                random.Random(f"shards-{self.seed}-{epoch}-{repeat}").shuffle(urls)
            yield from urls[rank::world_size][role::workers]
            if self.epoch_size is None or read[0] == before:
                return  # one pass, or this worker's shards hold nothing readable

    def _read(self, shards: Iterator[str], read: list[int], first_shard: int,
              first_offset: int) -> Iterator[tuple[int, int, dict]]:
        """Raw samples as (shard number, index in the shard, sample), starting at sample `first_offset` of shard
        number `first_shard`: earlier shards are not opened, earlier samples of that shard are read, not kept."""
        for number, url in enumerate(shards):
            if number < first_shard:
                # not opened. The uninterrupted run read samples past it, so for the "nothing readable"
                # checks of _shards it counts as read
                read[0] += 1
                continue
            for index, sample in enumerate(wds.tariterators.tarfile_samples([{"url": url}], handler=self._handle)):
                read[0] += 1
                if number > first_shard or index >= first_offset:
                    yield number, index, sample

    def _decode_stream(self, raw: Iterator[tuple[int, int, dict]], pulled: int, yielded: int, share: int | None,
                       stream: str, stamp: tuple[int, int, int] | None) -> Iterator[dict[str, Any]]:
        """Decode the buffer's output, dropping bad samples, until `share` samples were yielded; `pulled` and
        `yielded` count on from the start position. With `stamp` each sample carries its position."""
        if share is not None and yielded >= share:
            return
        for shard, index, sample in raw:
            pulled += 1
            # crop/flip randomness seeded by the sample's place in the stream, not by how much this process decoded
            self.transform.rng = random.Random(f"augment-{stream}-{pulled}") if self.transform.is_random else None
            try:
                decoded = self._decode(sample)
            except Exception as error:
                self._bad.report(_sample_name(sample), error)
                continue
            yielded += 1
            if stamp is not None:
                decoded[POSITION_KEY] = (*stamp, pulled, yielded, shard, index + 1)
            yield decoded
            if share is not None and yielded >= share:
                return

    def _decode(self, sample: dict) -> dict[str, Any]:
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        image_key = next((k for k in self.image_keys if k in members), None)
        if image_key is None:
            raise ValueError(f"no image member among {list(self.image_keys)}; sample has {sorted(members)}")
        image = self.transform(decode_image(members[image_key]))
        key = sample.get("__key__", "")
        caption = self._caption(members)
        if not self.caption_options.is_identity:
            caption = self.caption_options(caption, key, self.epoch)
        return {"image": image, "caption": caption, "key": key}

    def _caption(self, members: dict[str, bytes]) -> str:
        for key in self.caption_keys:
            if key not in members:
                continue
            text = members[key].decode("utf-8")
            if key == "json":
                row = json_value(text, source="the sample's .json", key=self.json_caption_field)
                value = row.get(self.json_caption_field) if isinstance(row, dict) else None
                text = "" if value is None else str(value)
            if text.strip():
                return text.strip()
        self.missing_captions += 1
        return ""

    def _handle(self, error: Exception) -> bool:
        """Like `wds.warn_and_continue`, but logged once per shard, counted, and without its sleep."""
        self._bad.report(_shard_name(error), error)
        return True


class _PerSampleRandomTransform(ImageTransform):
    """`ImageTransform` whose crop/flip randomness comes from `rng`, which `WebDatasetSource` seeds for every
    sample from its place in the stream (reproducible in a resumed run, whatever was skipped before)."""

    rng: random.Random | None = None

    @property
    def is_random(self) -> bool:
        return self.random_flip or not self.center_crop

    def _random(self):
        if self.rng is None:
            raise RuntimeError("_PerSampleRandomTransform: no per-sample generator set")
        return self.rng


class _PositionCollate:
    """Collate function of a tracked training DataLoader (see `WebDatasetSource.tracking_collate`)."""

    def __init__(self, collate_fn: Callable[[list[dict]], dict]):
        self.collate_fn = collate_fn

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate_fn([{k: v for k, v in s.items() if k != POSITION_KEY} for s in samples])
        if not isinstance(batch, dict):
            raise TypeError(f"WebDatasetSource.tracking_collate: the collate function must return a dict, got "
                            f"{type(batch).__name__}")
        batch[POSITION_KEY] = samples[-1][POSITION_KEY]
        return batch


def _start_role() -> dict[str, Any]:
    return {"raw": 0, "yielded": 0, "shard": 0, "offset": 0}


def _start_position(epoch: int, workers: int, world_size: int) -> dict[str, Any]:
    """The position at the start of `epoch` (nothing consumed)."""
    return {"version": _POSITION_VERSION, "epoch": epoch, "workers": workers, "world_size": world_size,
            "batches": 0, "next_role": 0, "roles": [_start_role() for _ in range(workers)]}


def _check_position(position: Any) -> None:
    keys = {"version", "epoch", "workers", "world_size", "batches", "next_role", "roles"}
    if not isinstance(position, dict) or not keys <= set(position):
        raise ValueError(f"WebDatasetSource: not a stream position (want a dict with {sorted(keys)}): {position!r}")
    if position["version"] != _POSITION_VERSION:
        raise ValueError(f"WebDatasetSource: stream position version {position['version']} is not supported "
                         f"(this code writes version {_POSITION_VERSION})")
    if len(position["roles"]) != position["workers"] or not 0 <= position["next_role"] < position["workers"]:
        raise ValueError(f"WebDatasetSource: inconsistent stream position {position!r}")


def _share(total: int, worker: int, num_workers: int) -> int:
    """Samples worker `worker` of `num_workers` produces so that all workers sum to `total`."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _sample_name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _shard_name(error: Exception) -> str:
    """Webdataset appends (stream, url) to the args of shard-level errors."""
    url = next((a for a in reversed(error.args) if isinstance(a, str) and a), None)
    return url or repr(error)
