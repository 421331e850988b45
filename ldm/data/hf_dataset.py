"""Image/caption pairs from a Hugging Face `datasets` dataset (hub name or local folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.bad_samples import BadSampleTracker, decode_image, upright, upright_size
from ldm.formats.safe_paths import is_inside
from ldm.data.bucketed import assign_source_buckets, buckets_enabled, cache_records, cut_sample
from ldm.data.captions import CaptionProcessor, SharedEpoch, caption_cache_fields
from ldm.data.transforms import ImageTransform

SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json")
SAVED_DATASET_DICT_MARKER = "dataset_dict.json"


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return False
    if (folder / SAVED_DATASET_DICT_MARKER).is_file():
        return True
    return all((folder / marker).is_file() for marker in SAVED_DATASET_MARKERS)


class HFDataset(Dataset):
    """Map-style wrapper yielding `{"image", "caption", "index"}` from a `datasets` table.

    Args:
        path: hub dataset name (e.g. "user/pokemon-captions") or a local folder.
        split: split to use (for `load_dataset` and for saved `DatasetDict`s).
        image_column, caption_column: column names; caption_column=None gives "".
        resolution, center_crop, random_flip, seed: passed to `ImageTransform`.
        load_from_disk: "auto" (detect a `save_to_disk` folder), True or False.
        name, data_dir, revision, cache_dir: passed to `datasets.load_dataset`.
        max_samples: keep only the first `max_samples` rows.
        load_kwargs: any other `datasets.load_dataset` keyword arguments.
        captions: caption options (`ldm.data.captions.CaptionProcessor` fields, config `data.train.captions`),
            applied per (seed, epoch, index); None: captions as read. (`extension` is for image folders.)
        buckets: aspect-ratio buckets, as for `ImageFolderDataset` (each row's image header is read once).

    ``companion``: as for `ImageFolderDataset` (row i's companion image, cut like its image: a ControlNet pair).
    """

    companion = None

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        caption_column: str | None = "text",
        resolution: int = 256,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int | None = None,
        load_from_disk: bool | str = "auto",
        name: str | None = None,
        data_dir: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        max_samples: int | None = None,
        load_kwargs: dict[str, Any] | None = None,
        captions: CaptionProcessor | dict | None = None,
        buckets: dict | None = None,
    ):
        if load_from_disk not in ("auto", True, False):
            raise ValueError(f"HFDataset: load_from_disk must be 'auto', True or False, got {load_from_disk!r}")
        self.path = str(path)
        self.split = split
        self.image_column = image_column
        self.caption_column = caption_column
        self.caption_options = CaptionProcessor.of(captions)
        if self.caption_options.extension != ".txt":
            raise ValueError("HFDataset: data.train.captions.extension is for image folders; a table's captions come "
                             f"from data.train.caption_column (now {caption_column!r})")
        self._epoch = SharedEpoch()
        from_disk = is_saved_dataset(path) if load_from_disk == "auto" else bool(load_from_disk)
        if from_disk:
            table = self._load_from_disk(split)
        else:
            table = self._load_dataset(split, name, data_dir, revision, cache_dir, load_kwargs or {})
        self._check_columns(table)
        if max_samples is not None:
            table = table.select(range(min(int(max_samples), len(table))))
        self.table = _without_image_decoding(table, image_column)
        if len(self.table) == 0:
            raise ValueError(f"HFDataset: {self.path} split {split!r} is empty")
        self.transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)
        self._bad = BadSampleTracker(f"HFDataset({self.path}, split={split})")
        self.image_roots = image_roots(path, cache_dir)
        sizes = [_image_size(value, self.image_roots) for start in range(0, len(self.table), 1024)
                 for value in self.table[start:start + 1024][image_column]] if buckets_enabled(buckets) else []
        self.bucket_assignment = assign_source_buckets(buckets, sizes, self.transform.resolution,
                                                       f"HFDataset({self.path}, split={split})")

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(width, height) of row i's image from its encoded header (nothing decoded); None when it cannot be read."""
        try:
            return _image_size(self.table[int(i)][self.image_column], self.image_roots)
        except (OSError, ValueError):
            return None

    @property
    def bad_files(self) -> set[str]:
        """Rows (as "split[index]" or their file path) that failed to decode in this process."""
        return set(self._bad.bad)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def captions(self) -> list[str]:
        """Every row's caption as read (the caption column alone: no image is decoded), e.g. for a vocabulary."""
        if self.caption_column is None:
            return [""] * len(self.table)
        return [self._caption({self.caption_column: value}) for value in self.table[self.caption_column]]

    def __getitem__(self, index: int) -> dict:
        """Row `index`, or the next decodable row if that image is bad."""
        return self._bad.first_readable(index, len(self.table), lambda i: f"{self.split}[{i}]",
                                        lambda i: self._load(i, slot=index % len(self.table)))

    def _load(self, i: int, slot: int | None = None) -> dict:
        """Row i, at the size of row ``slot``'s bucket with buckets (i replaces an unreadable ``slot``)."""
        row = self.table[i]
        image = _to_pil(row[self.image_column], self.image_roots)
        companion = None if self.companion is None else self.companion(i)
        sample = cut_sample(self.transform, self.bucket_assignment, image, i if slot is None else slot, i, companion)
        caption = self._caption(row)
        if not self.caption_options.is_identity:
            caption = self.caption_options(caption, i, self._epoch.get())
        return {**sample, "caption": caption, "index": i}

    def set_epoch(self, epoch: int) -> None:
        """Caption shuffle / dropout / wildcards draw anew each epoch."""
        self._epoch.set(epoch)

    @property
    def resolution(self) -> int:
        return self.transform.resolution

    def cache_spec(self):
        """What the automatic latent cache depends on: the table's fingerprint (`datasets` changes it whenever the
        data or its processing does), the columns and the transform; each row is one item."""
        import copy

        from ldm.data.auto_cache import CacheSpec

        version = getattr(self.table, "_fingerprint", None) or f"rows={len(self.table)}"
        t = self.transform
        settings = {"kind": "HFDataset", "path": self.path, "split": self.split, "image_column": self.image_column,
                    "caption_column": self.caption_column, "resolution": t.resolution, "center_crop": t.center_crop}
        plain = copy.copy(self)
        plain.transform = ImageTransform(t.resolution, center_crop=True, random_flip=False)
        items = [f"{version}:{i}" for i in range(len(self.table))]
        buckets = self.bucket_assignment
        if buckets is not None:  # another bucket table crops differently: another cache folder and other rows
            settings["buckets"] = {"table": [list(b) for b in buckets.table], "no_upscale": not buckets.table}
            items = [f"{item}:{buckets.target(i)}:{buckets.resized[i]}" for i, item in enumerate(items)]
        return CacheSpec(settings, items, plain, flip=t.random_flip, random_crop=not t.center_crop,
                         resolution=t.resolution, buckets=buckets,
                         records=None if buckets is None else cache_records(buckets, t.random_flip),
                         **caption_cache_fields(plain, settings))

    def _caption(self, row: dict) -> str:
        if self.caption_column is None:
            return ""
        value = row[self.caption_column]
        if isinstance(value, (list, tuple)):  # several captions per image: take the first
            value = value[0] if value else ""
        return "" if value is None else str(value)

    def _load_from_disk(self, split: str):
        import datasets

        loaded = datasets.load_from_disk(str(Path(self.path).expanduser()))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"HFDataset: split {split!r} not in {self.path}; available splits: {list(loaded)}")
            return loaded[split]
        return loaded

    def _load_dataset(self, split, name, data_dir, revision, cache_dir, load_kwargs):
        import datasets

        return datasets.load_dataset(
            self.path, name, split=split, data_dir=data_dir, revision=revision, cache_dir=cache_dir, **load_kwargs
        )

    def _check_columns(self, table) -> None:
        wanted = [c for c in (self.image_column, self.caption_column) if c is not None]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise ValueError(
                f"HFDataset: column(s) {missing} not in {self.path} (split {self.split!r}); "
                f"available columns: {table.column_names}. Set image_column / caption_column."
            )


def _without_image_decoding(table, image_column: str):
    """Keep image bytes undecoded so a corrupt image fails in our try/except, not in `datasets`."""
    import datasets

    if isinstance(table.features.get(image_column), datasets.Image):
        return table.cast_column(image_column, datasets.Image(decode=False))
    return table


def image_roots(path: str, cache_dir: str | None) -> tuple[Path, ...]:
    """Where an image cell that names a file may point: the dataset's own folder (a local or saved dataset) and
    `datasets`' caches (a hub dataset's downloaded files). A table from elsewhere may name any path; a file outside
    these is never read (issue 25: a dataset reaches nothing outside its own folder)."""
    import datasets

    roots = [Path(datasets.config.HF_DATASETS_CACHE), Path(datasets.config.DOWNLOADED_DATASETS_PATH)]
    roots += [Path(p).expanduser() for p in (path, cache_dir) if p and Path(p).expanduser().is_dir()]
    return tuple(roots)


def _image_file(name: str, roots: tuple[Path, ...]) -> str:
    if not any(is_inside(name, root) for root in roots):
        raise ValueError(f"image cell names {name!r}, outside the dataset's folder and the datasets cache; not read")
    return name


def _image_size(value, roots: tuple[Path, ...]) -> tuple[int, int] | None:
    """The upright (width, height) of an image cell, from its header where it is bytes or a file."""
    if isinstance(value, Image.Image):
        return upright(value).size
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return upright_size(bytes(value))
    if isinstance(value, str):  # a file outside the roots is not read: its row is skipped when loaded
        return upright_size(value) if any(is_inside(value, root) for root in roots) else None
    try:
        return _to_pil(value, roots).size
    except ValueError:
        return None


def _to_pil(value, roots: tuple[Path, ...]) -> Image.Image:
    """An image cell (PIL image, {"bytes", "path"} dict, path string or array) -> decoded PIL image; a path only
    inside ``roots``."""
    if isinstance(value, Image.Image):
        return upright(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"])
        if value.get("path"):
            return decode_image(_image_file(value["path"], roots))
        raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value))
    if isinstance(value, str):
        return decode_image(_image_file(value, roots))
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(f"array image must be a non-empty uint8 (H, W[, C]) array, got {array.dtype} {array.shape}")
    return Image.fromarray(array)
