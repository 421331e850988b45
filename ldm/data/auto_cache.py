"""The automatic latent cache: keep a cache folder in step with a dataset, encoding only what is new.

`sync_cache(folder, spec, encode)` brings ``folder`` up to date with the dataset described by `spec` and returns a
`CachedView`, a map-style dataset of cached latents (+ text contexts) in the dataset's own index order.

Layout of ``folder``: one or more *parts*, each a plain latent cache (`ldm.data.latent_cache`: manifest.json +
safetensors shards) plus ``rows.json``, the identity of each of its rows: ``[item identity, flipped]``. An item's
identity is what its pixels and caption depend on (for an image folder: path, size, mtime and caption), so

- nothing changed: every item is found in the parts, nothing is encoded;
- files were added, or changed (new size / mtime / caption): only those are encoded, into a new part;
- files were removed: their rows are no longer read; a part none of whose rows is used any more is deleted.

Random horizontal flip is cached as both variants (a latent cannot be flipped): every item has two rows, and
the view picks one per (seed, epoch, index), so resumes stay exact. A random crop cannot be cached this way
(`CacheSpec.random_crop`): the caller trains on the fly instead.

This module is data only: the encoding (VAE, text encoder) is the `encode` callable the caller passes in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from ldm.data.cached_latents import CachedLatentsDataset, _mix
from ldm.data.captions import SharedEpoch
from ldm.data.latent_cache import LatentCacheError, build_latent_cache, read_manifest
from ldm.data.protocols import CacheableDataset

logger = logging.getLogger("ldm.data")

ROWS = "rows.json"
Encode = Callable[[torch.Tensor, list, Any], dict]  # (images, captions, generator) -> {"mean", "logvar", ...}


@dataclass
class CacheSpec:
    """What a dataset's cache depends on.

    settings: JSON-able values every sample depends on (dataset kind, root, transform settings).
    items: one identity string per index (map-style datasets), or None: an iterable dataset, cached as a whole
        (then `settings` must also change whenever its content does, e.g. shard sizes and mtimes).
    source: the same samples in the same order without random augmentation (no flip, centre crop).
    flip: the dataset flips at random: cache both variants.
    random_crop: the dataset crops at random: not cacheable (train on the fly).
    captions: random caption options (`ldm.data.captions`) the view applies on read, per (seed, epoch, index):
        the cache then holds the captions as read, and no text contexts (see `contexts_cacheable`).
    buckets: the items' aspect-ratio buckets (`ldm.data.buckets.BucketAssignment`), None: one size. Each new part
        then holds the rows of one bucket (a part's latents have one shape).
    records: with buckets, per item the micro-conditioning record of each cached variant (original_size,
        crop_top_left, target_size), which the view adds to its items.
    """

    settings: dict
    items: list[str] | None
    source: Dataset | IterableDataset
    flip: bool = False
    random_crop: bool = False
    resolution: int | None = None
    extra: dict = field(default_factory=dict)
    captions: Any = None
    buckets: Any = None
    records: list[list[dict]] | None = None


def place_digest(path: str | Path) -> str:
    """Where a dataset's folder or file lies on this machine, as a digest for its cache key: the key still tells two
    folders apart (symlinks resolved, so two spellings of one folder agree), but ``key.json`` and the manifests
    written beside the latents hold no path of the user's (their home, their folder layout)."""
    place = str(Path(path).expanduser().resolve())
    return "sha256:" + hashlib.sha256(place.encode("utf-8")).hexdigest()[:16]


def cache_spec(dataset) -> CacheSpec | None:
    """The dataset's `CacheSpec` (through `Subset`s: the selected items only); None when it has none."""
    if isinstance(dataset, Subset):
        inner = cache_spec(dataset.dataset)
        if inner is None or inner.items is None:
            return None
        if len(inner.items) != len(dataset.dataset):  # cache rows that are not its items (DreamBooth's pairs)
            raise ValueError(f"a split of {type(dataset.dataset).__name__} cannot be cached (its cache rows are not "
                             "its items): set data.val_fraction=0, or data.latent_cache=null")
        indices = list(dataset.indices)
        return CacheSpec(inner.settings, [inner.items[i] for i in indices], Subset(inner.source, indices),
                         inner.flip, inner.random_crop, inner.resolution, inner.extra, captions=inner.captions,
                         buckets=None if inner.buckets is None else inner.buckets.subset(indices),
                         records=None if inner.records is None else [inner.records[i] for i in indices])
    return dataset.cache_spec() if isinstance(dataset, CacheableDataset) else None


class _Planned(Dataset):
    """The images of `rows` ([(source index, flip)]), flipped where asked: the source of one new part."""

    def __init__(self, source: Dataset, rows: list[tuple[int, bool]]):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        index, flip = self.rows[i]
        item = self.source[index]
        image = item["image"].flip(-1) if flip else item["image"]  # crop, then flip, as ImageTransform does
        out = {"image": image, "caption": item.get("caption", "")}
        if "conditioning_image" in item:  # a ControlNet pair's control image, kept beside the latent
            out["conditioning_image"] = item["conditioning_image"].flip(-1) if flip else item["conditioning_image"]
        return out


class _Doubled(IterableDataset):
    """An iterable source with every sample followed by its mirror image (flip=True) or as is."""

    def __init__(self, source: IterableDataset, flip: bool):
        self.source, self.flip = source, flip

    def __iter__(self):
        for item in self.source:
            yield {"image": item["image"], "caption": item.get("caption", "")}
            if self.flip:
                yield {"image": item["image"].flip(-1), "caption": item.get("caption", "")}


def _read_rows(part: Path) -> list[list] | None:
    try:
        rows = json.loads((part / ROWS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(rows, list) and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in rows)
    return rows if ok else None


def _complete(part: Path) -> bool:
    try:
        return bool(read_manifest(part).get("complete"))
    except (FileNotFoundError, LatentCacheError):
        return False


def sync_cache(folder: str | Path, spec: CacheSpec, encode: Encode, *, store: str = "posterior",
               text: str = "caption", scaling_factor: float = 1.0, shift_factor: float = 0.0, seed: int = 0,
               sample: bool = True, batch_size: int = 32, num_workers: int = 0, progress: bool = True,
               description: dict | None = None, read_only: bool = False) -> "CachedView | None":
    """Bring the cache in ``folder`` up to date with `spec` (encoding only missing items) and return its view.

    Args are those of `build_latent_cache` (store: "posterior" or "mode"; text: "context" or "caption"), plus
    `sample`/`seed` for the view (posterior draws and flip choices per (seed, epoch, index)).
    num_workers: DataLoader workers that decode (and resize) the next images while `encode` runs on these ones.
    Returns a `CachedView`; ``view.encoded`` is the number of images encoded by this call (0: all reused).
    read_only: encode and delete nothing (other DDP ranks); None when the cache is not complete yet.
    """
    if spec.random_crop:
        raise ValueError("a random crop cannot be cached (each epoch sees another crop): use center_crop=true, or "
                         "train on the fly (data.latent_cache=null)")
    folder = Path(folder).expanduser()
    if read_only and not folder.is_dir():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if not read_only:
        (folder / "key.json").write_text(json.dumps(spec.settings, indent=1, default=str), encoding="utf-8")
    variants = (False, True) if spec.flip else (False,)
    build = dict(store=store, text=text, batch_size=batch_size, num_workers=num_workers, seed=seed,
                 progress=progress, encode=encode,
                 scaling_factor=scaling_factor, shift_factor=shift_factor, description=description or {})
    if spec.items is None:
        return _sync_stream(folder, spec, variants, build, seed, sample, read_only)

    wanted = {(identity, flip) for identity in spec.items for flip in variants}
    index_of = {identity: i for i, identity in enumerate(spec.items)}
    found: dict[tuple[str, bool], tuple[int, int]] = {}  # (identity, flip) -> (part number, row)
    parts: dict[int, Path] = {}
    encoded = 0
    for part in sorted(folder.glob("part-*")):
        rows = _read_rows(part)
        number = int(part.name.split("-")[1]) if part.name.split("-")[1].isdigit() else -1
        if read_only and (rows is None or number < 0 or not _complete(part)):
            continue
        if rows is None or number < 0:
            logger.warning("latent cache %s: %s has no readable %s; deleting it", folder, part.name, ROWS)
            shutil.rmtree(part)
            continue
        if not _complete(part):  # a build that was killed: finish it if all its items still exist, as they were
            if all(r[0] in index_of for r in rows):
                plan = [(index_of[r[0]], bool(r[1])) for r in rows]
                print(f"finishing the interrupted latent cache part {part}")
                build_latent_cache(_Planned(spec.source, plan), part, None, None, **build)
                encoded += len(plan)
            else:
                shutil.rmtree(part)
                continue
        parts[number] = part
        for row, (identity, flip) in enumerate(rows):
            found.setdefault((identity, bool(flip)), (number, row))
    missing = [(index_of[identity], flip) for identity, flip in
               sorted(wanted - found.keys(), key=lambda key: (index_of[key[0]], key[1]))]
    if missing and read_only:
        return None
    if missing:
        print(f"latent cache {folder}: encoding {len(missing)} image(s) once with the frozen VAE"
              + (f" ({len(wanted) - len(missing)} cached row(s) reused)" if len(wanted) > len(missing) else "")
              + (f" in {len(_by_bucket(missing, spec))} bucket(s)" if spec.buckets is not None else ""))
    for group in _by_bucket(missing, spec):  # one part per latent shape
        number = max(parts, default=-1) + 1
        part = folder / f"part-{number:05d}"
        part.mkdir()
        rows = [[spec.items[i], flip] for i, flip in group]
        (part / ROWS).write_text(json.dumps(rows), encoding="utf-8")  # first: a killed build can be finished
        build_latent_cache(_Planned(spec.source, group), part, None, None, **build)
        encoded += len(group)
        parts[number] = part
        for row, (identity, flip) in enumerate(rows):
            found[(identity, bool(flip))] = (number, row)
    used = {found[key][0] for key in wanted}
    for number in [] if read_only else sorted(set(parts) - used):  # every row of it belongs to files that changed or went away
        shutil.rmtree(parts.pop(number))
    table = [[found[(identity, flip)] for flip in variants] for identity in spec.items]
    return CachedView(parts, table, seed=seed, sample=sample, encoded=encoded, resolution=spec.resolution,
                      captions=spec.captions, buckets=spec.buckets, records=spec.records)


def contexts_cacheable(spec: CacheSpec) -> bool:
    """Text contexts can be cached per image unless random caption options change the caption each epoch."""
    return spec.captions is None


def _by_bucket(rows: list[tuple[int, bool]], spec: CacheSpec) -> list[list[tuple[int, bool]]]:
    """The rows to encode, grouped by the bucket of their item (one group without buckets; none without rows)."""
    if not rows:
        return []
    if spec.buckets is None:
        return [rows]
    groups: dict[int, list[tuple[int, bool]]] = {}
    for row in rows:
        groups.setdefault(spec.buckets.bucket_of[row[0]], []).append(row)
    return [groups[b] for b in sorted(groups)]


def _sync_stream(folder: Path, spec: CacheSpec, variants: tuple, build: dict, seed: int,
                 sample: bool, read_only: bool = False) -> "CachedView | None":
    """An iterable dataset: one part holding all of it (its key is in the folder name), built if not complete."""
    part = folder / "part-00000"
    encoded = 0
    if not _complete(part) or _read_rows(part) is None:
        if read_only:
            return None
        print(f"latent cache {folder}: encoding the stream once with the frozen VAE")
        manifest = build_latent_cache(_Doubled(spec.source, len(variants) == 2), part, None, None, **build)
        n = manifest["num_samples"]
        rows = [[f"#{r // len(variants)}", bool(r % len(variants))] for r in range(n)]
        (part / ROWS).write_text(json.dumps(rows), encoding="utf-8")
        encoded = n
    rows = _read_rows(part)
    table = [[(0, i + v) for v in range(len(variants))] for i in range(0, len(rows), len(variants))]
    return CachedView({0: part}, table, seed=seed, sample=sample, encoded=encoded, resolution=spec.resolution,
                      captions=spec.captions)


class CachedView(Dataset):
    """Map-style dataset over a synced cache: index i -> one of its variants' rows (picked per (seed, epoch, i)).

    Items are those of `CachedLatentsDataset` ({"latents", "caption", "index"[, "context"]}), with "index" the
    dataset's index. `set_epoch` gives new posterior draws and new flip choices (and new captions, when random
    caption options are applied on read)."""

    def __init__(self, parts: dict[int, Path], table: list[list[tuple[int, int]]], seed: int = 0,
                 sample: bool = True, encoded: int = 0, resolution: int | None = None, captions=None,
                 buckets=None, records: list[list[dict]] | None = None):
        self.parts = {n: CachedLatentsDataset(p, sample=sample, seed=_mix(seed, n)) for n, p in parts.items()}
        self.table, self.seed = table, int(seed)
        self._epoch = SharedEpoch()  # persistent DataLoader workers must see set_epoch too (flips, captions)
        self.encoded, self.resolution = encoded, resolution
        self.bucket_assignment, self.records = buckets, records  # aspect-ratio buckets: latents of several shapes
        first = next(iter(self.parts.values()))
        self.latent_shape, self.context_shape = first.latent_shape, first.context_shape
        self.has_context = first.has_context
        self.captions = captions

    def __len__(self) -> int:
        return len(self.table)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.set(epoch)
        for part in self.parts.values():
            part.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        variants = self.table[int(index)]
        choice = 0 if len(variants) == 1 else _mix(self.seed, self.epoch, int(index), 1) % len(variants)
        number, row = variants[choice]
        item = self.parts[number][row]
        item["index"] = int(index)
        if self.captions is not None:
            item["caption"] = self.captions(item["caption"], int(index), self.epoch)
        if self.records is not None:
            item.update(self.records[int(index)][choice])
        return item

    def __repr__(self) -> str:
        return (f"CachedView({len(self)} samples x {len(self.table[0]) if self.table else 0} variant(s) in "
                f"{len(self.parts)} part(s), latents={self.latent_shape})")
