"""Streaming image/caption pairs from WebDataset tar shards.

Shards are split by DDP rank (`wds.split_by_node`) and then by DataLoader worker
(`wds.split_by_worker`), so every sample is read once per epoch as long as there are at
least `world_size * num_workers` shards. With `resampled=True` each worker instead
draws shards at random forever (use `epoch_size` or the trainer's max_steps).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from typing import Any, Iterator, Sequence

import torch.utils.data
import webdataset as wds
from torch.utils.data import IterableDataset

from ldm.data.bad_samples import BadSampleTracker, decode_image
from ldm.data.transforms import ImageTransform

logger = logging.getLogger("ldm.data")


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
            workers agree on it; the sample buffer also mixes in rank, worker and the
            DataLoader's per-epoch worker seed, so it changes every epoch.
        image_keys, caption_keys: file extensions to look for, in order of preference.
        json_caption_field: field holding the caption inside a `.json` member.
        epoch_size: samples per epoch on each rank (split across workers); the
            stream repeats (or resamples) until it is reached. None: one pass.
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
    ):
        super().__init__()
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
        self.epoch_size = None if epoch_size is None else int(epoch_size)
        self.transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)
        self.epoch = 0
        self.missing_captions = 0
        self._bad = BadSampleTracker(f"WebDatasetSource({self.urls[0]}{', ...' if len(self.urls) > 1 else ''})")

    @property
    def bad_samples(self) -> set[str]:
        """Samples ("url:key") or shards that failed in this process."""
        return set(self._bad.bad)

    @property
    def errors(self) -> int:
        """How many errors were skipped in this process (workers count separately)."""
        return self._bad.errors

    def set_epoch(self, epoch: int) -> None:
        """Change the shard order for the next pass; call it on every rank before iterating."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        if not self.resampled and len(self.urls) < world_size * num_workers and rank == worker == 0:
            logger.warning(
                "WebDatasetSource: %d shards for %d ranks x %d workers; some will get no data. "
                "Write more shards or use resampled=True.", len(self.urls), world_size, num_workers,
            )
        seed = (self.seed, self.epoch, rank, worker, _loader_epoch_seed())
        read = [0]  # raw samples read so far, so endless shard loops can tell when nothing is readable
        raw = _counted(wds.tariterators.tarfile_samples(self._shards(seed, read), handler=self._handle), read)
        if self.shuffle_buffer > 1:
            rng = random.Random(str(seed))
            raw = wds.shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
        samples = self._decode_all(raw)
        if self.epoch_size is None:
            yield from samples
        else:
            yield from itertools.islice(samples, _share(self.epoch_size, worker, num_workers))

    def _shards(self, seed, read: list[int]) -> Iterator[dict[str, str]]:
        """Shard URLs for this rank and worker: split, or resampled, repeated if epoch_size is set."""
        if self.resampled:
            rng = random.Random(f"resample-{seed}")
            while True:
                before = read[0]
                for _ in range(2 * len(self.urls)):
                    yield {"url": rng.choice(self.urls)}
                if read[0] == before:
                    raise RuntimeError(f"WebDatasetSource: no readable samples in any of {self.urls}")
        for repeat in itertools.count():
            before = read[0]
            urls = list(self.urls)
            if self.shuffle_shards:
                random.Random(f"shards-{self.seed}-{self.epoch}-{repeat}").shuffle(urls)
            stream = ({"url": url} for url in urls)
            yield from wds.split_by_worker(wds.split_by_node(stream))
            if self.epoch_size is None or read[0] == before:
                return  # one pass, or this worker's shards hold nothing readable

    def _decode_all(self, raw: Iterator[dict]) -> Iterator[dict[str, Any]]:
        for sample in raw:
            try:
                yield self._decode(sample)
            except Exception as error:
                self._bad.report(_sample_name(sample), error)

    def _decode(self, sample: dict) -> dict[str, Any]:
        members = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        image_key = next((k for k in self.image_keys if k in members), None)
        if image_key is None:
            raise ValueError(f"no image member among {list(self.image_keys)}; sample has {sorted(members)}")
        image = self.transform(decode_image(members[image_key]))
        return {"image": image, "caption": self._caption(members), "key": sample.get("__key__", "")}

    def _caption(self, members: dict[str, bytes]) -> str:
        for key in self.caption_keys:
            if key not in members:
                continue
            text = members[key].decode("utf-8")
            if key == "json":
                value = json.loads(text).get(self.json_caption_field)
                text = "" if value is None else str(value)
            if text.strip():
                return text.strip()
        self.missing_captions += 1
        return ""

    def _handle(self, error: Exception) -> bool:
        """Like `wds.warn_and_continue`, but logged once per shard, counted, and without its sleep."""
        self._bad.report(_shard_name(error), error)
        return True


def _counted(samples: Iterator[dict], read: list[int]) -> Iterator[dict]:
    for sample in samples:
        read[0] += 1
        yield sample


def _loader_epoch_seed() -> int:
    """The DataLoader's per-iteration base seed inside a worker (new each epoch), else 0."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.seed - info.id


def _share(total: int, worker: int, num_workers: int) -> int:
    """Samples worker `worker` of `num_workers` produces so that all workers sum to `total`."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _sample_name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _shard_name(error: Exception) -> str:
    """Webdataset appends (stream, url) to the args of shard-level errors."""
    url = next((a for a in reversed(error.args) if isinstance(a, str) and a), None)
    return url or repr(error)
