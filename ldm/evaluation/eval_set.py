"""The evaluation set: the first ``n`` validation items (their images are the real set, their captions the prompts
to generate for), split into contiguous shares per process, and generation of a share in seeded batches."""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset


class EvalItems(Dataset):
    """The first ``n`` items of a validation dataset: their captions (kept), their images and other fields
    (read again from the dataset when asked for, so a large evaluation set is not held in memory; the items of an
    iterable dataset are kept, since they cannot be read again). Items without an ``image`` (cached latents) have
    ``has_images=False``: FID / KID are then not possible, CLIP score and prompt accuracy still are."""

    def __init__(self, captions: list[str], get_item: Callable[[int], dict], has_images: bool,
                 resolution: tuple[int, int] | None):
        self.captions, self._get_item = list(captions), get_item
        self.has_images, self.resolution = has_images, resolution

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"evaluation item {index} out of range [0, {len(self)})")
        return self._get_item(index)

    def truncated(self, n: int) -> "EvalItems":
        """The first ``n`` of these items."""
        return EvalItems(self.captions[:n], self._get_item, self.has_images, self.resolution)

    def images(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` as (B, 3, H, W) float in [-1, 1]."""
        if not self.has_images:
            raise ValueError("the validation items have no 'image'")
        images = [self[i]["image"] for i in range(start, stop)]
        if len({tuple(im.shape) for im in images}) > 1:
            raise ValueError(f"the validation images have several sizes {sorted({tuple(im.shape[-2:]) for im in images})} "
                             "(aspect-ratio buckets): FID / KID / CLIP score compare images of one size; evaluate "
                             "with data.train.buckets.enabled=false (square crops)")
        return torch.stack(images).float()


def base_dataset(dataset):
    """The dataset under a ``Subset`` (a val split of the training data)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def prompt_checker(dataset):
    """The prompt checker (the protocol of ``metrics.PromptAccuracy``) that the validation dataset offers as its
    ``checker()`` method, else None. The data brings it (the shapes task's ShapesDataset, built from
    configs/data/shapes.yaml, has one), so evaluation needs no import of any task."""
    make = getattr(base_dataset(dataset), "checker", None)
    return make() if callable(make) else None


def first_items(dataset, n: int) -> EvalItems:
    """The first ``n`` items of ``dataset`` (fewer if it is smaller)."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        kept = list(itertools.islice(iter(dataset), n))
        get_item, count = kept.__getitem__, len(kept)
    else:
        get_item, count = dataset.__getitem__, min(n, len(dataset))
    captions, has_images, resolution = [], count > 0, None
    for i in range(count):
        item = get_item(i)
        captions.append(str(item["caption"]))
        image = item.get("image")
        has_images = has_images and isinstance(image, Tensor)
        if resolution is None and isinstance(image, Tensor):
            resolution = (int(image.shape[-2]), int(image.shape[-1]))
    return EvalItems(captions, get_item, has_images, resolution if has_images else None)


def sample_items(dataset, n: int, seed: int) -> list[dict]:
    """``n`` items: seeded random ones of a map-style dataset, the first ``n`` of a stream."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return list(itertools.islice(iter(dataset), n))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [dataset[i] for i in order]


def share(n: int, rank: int, world_size: int) -> range:
    """Process ``rank``'s contiguous part of ``range(n)``; the parts cover it exactly once."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def generate_share(generate: Callable[[list[str], int], Tensor], prompts: Sequence[str], indices: range,
                   batch_size: int, seed: int) -> Iterator[tuple[list[str], Tensor]]:
    """(prompts, images) for ``prompts[i] for i in indices``, in batches of ``batch_size``; the batch starting at
    global index ``i`` is seeded with ``seed + i``. ``generate(prompts, seed)`` returns (B, 3, H, W) in [-1, 1]."""
    for start in range(indices.start, indices.stop, batch_size):
        batch = list(prompts[start:min(start + batch_size, indices.stop)])
        yield batch, generate(batch, seed + start).float()
