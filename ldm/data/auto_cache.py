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
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from ldm.data.cache_claims import STALE_SECONDS, break_if_stale, folder_lock, is_stale, try_claim
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
    shards: an iterable dataset made of shards (webdataset): one source per shard, in stream order, each reading
        its whole shard in every process (no split by rank). The cache then holds one part per shard, each built
        by the one process that claims it, so several processes (every DDP rank) share the encoding.
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
    shards: list[IterableDataset] | None = None


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


PART_SIZE = 4096  # rows per new part: the unit several processes share (one claim, one build_latent_cache)
WAIT_SECONDS = 4 * 3600.0  # how long a process waits for parts other processes are building
CLAIM = "claim"


def sync_cache(folder: str | Path, spec: CacheSpec, encode: Encode, *, store: str = "posterior",
               text: str = "caption", scaling_factor: float = 1.0, shift_factor: float = 0.0, seed: int = 0,
               sample: bool = True, batch_size: int = 32, num_workers: int = 0, progress: bool = True,
               description: dict | None = None, read_only: bool = False, part_size: int = PART_SIZE,
               wait_seconds: float = WAIT_SECONDS, stale_seconds: float = STALE_SECONDS,
               poll_seconds: float = 1.0) -> "CachedView | None":
    """Bring the cache in ``folder`` up to date with `spec` (encoding only missing items) and return its view.

    Args are those of `build_latent_cache` (store: "posterior" or "mode"; text: "context" or "caption"), plus
    `sample`/`seed` for the view (posterior draws and flip choices per (seed, epoch, index)).
    num_workers: DataLoader workers that decode (and resize) the next images while `encode` runs on these ones.
    Returns a `CachedView`; ``view.encoded`` is the number of images encoded by this call (0: all reused).
    read_only: encode and delete nothing; None when the cache is not complete yet.

    Several processes may call this on one folder at once (every DDP rank, or independent runs): under the folder's
    planning lock the first one to come plans the missing rows as parts of at most `part_size` rows (per bucket);
    then each process claims whole parts (`ldm.data.cache_claims`) and encodes them, so every part is encoded by one
    process, and the parts are the same, byte for byte, whichever processes built them. A process that finds no
    part left to claim waits (at most `wait_seconds`) for the parts others build; a part whose builder was killed
    (its claim stale) is taken over and finished from its last whole shard.
    """
    if spec.random_crop:
        raise ValueError("a random crop cannot be cached (each epoch sees another crop): use center_crop=true, or "
                         "train on the fly (data.latent_cache=null)")
    if int(part_size) <= 0:
        raise ValueError(f"part_size must be positive, got {part_size}")
    folder = Path(folder).expanduser()
    if read_only and not folder.is_dir():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if not read_only:
        _write_atomic(folder / "key.json", json.dumps(spec.settings, indent=1, default=str))
    variants = (False, True) if spec.flip else (False,)
    build = dict(store=store, text=text, batch_size=batch_size, num_workers=num_workers, seed=seed,
                 progress=progress,
                 scaling_factor=scaling_factor, shift_factor=shift_factor, description=description or {})
    if spec.items is None:
        return _sync_stream(folder, spec, variants, dict(build, encode=encode), seed, sample, read_only,
                            wait_seconds, stale_seconds, poll_seconds)

    index_of = {identity: i for i, identity in enumerate(spec.items)}
    wanted = {(identity, flip) for identity in spec.items for flip in variants}
    if read_only:
        parts, found = _scan(folder, index_of, complete_only=True)
        if not wanted <= found.keys():
            return None
    else:
        with folder_lock(folder, wait_seconds, stale_seconds):
            parts, found = _plan(folder, spec, index_of, wanted, variants, int(part_size))
    used = {found[key][0] for key in wanted}
    encoded = 0 if read_only else _build_parts(folder, {n: parts[n] for n in sorted(used)}, spec, index_of, encode,
                                               build, wait_seconds, stale_seconds, poll_seconds)
    table = [[found[(identity, flip)] for flip in variants] for identity in spec.items]
    return CachedView({n: parts[n] for n in sorted(used)}, table, seed=seed, sample=sample, encoded=encoded,
                      resolution=spec.resolution, captions=spec.captions, buckets=spec.buckets, records=spec.records)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _number(part: Path) -> int:
    tail = part.name.split("-", 1)[1]
    return int(tail) if tail.isdigit() else -1


def _scan(folder: Path, index_of: dict, complete_only: bool = False):
    """The parts in `folder` and where each (identity, flip) row lies in them: ({number: part}, {row: (n, i)})."""
    parts: dict[int, Path] = {}
    found: dict[tuple[str, bool], tuple[int, int]] = {}
    for part in sorted(folder.glob("part-*")):
        rows, number = _read_rows(part), _number(part)
        if rows is None or number < 0 or (complete_only and not _complete(part)):
            continue
        parts[number] = part
        for row, (identity, flip) in enumerate(rows):
            found.setdefault((identity, bool(flip)), (number, row))
    return parts, found


def _plan(folder: Path, spec: CacheSpec, index_of: dict, wanted: set, variants: tuple, part_size: int):
    """Under the planning lock: drop parts that are unreadable or hold rows no longer wanted, and lay out the
    missing rows as new, unbuilt parts (rows.json only). Returns ({number: part}, {row: (number, index)})."""
    for leftover in folder.glob(".new-*"):  # a planner killed between mkdir and rename (we hold the lock now)
        shutil.rmtree(leftover, ignore_errors=True)
    for part in sorted(folder.glob("part-*")):
        rows = _read_rows(part)
        if rows is None or _number(part) < 0:
            logger.warning("latent cache %s: %s has no readable %s; deleting it", folder, part.name, ROWS)
            shutil.rmtree(part, ignore_errors=True)
        elif not _complete(part) and not all(r[0] in index_of for r in rows):  # an unfinished part of gone files
            shutil.rmtree(part, ignore_errors=True)
    parts, found = _scan(folder, index_of)
    missing = [(index_of[identity], flip) for identity, flip in
               sorted(wanted - found.keys(), key=lambda key: (index_of[key[0]], key[1]))]
    groups = [group[i:i + part_size] for group in _by_bucket(missing, spec) for i in range(0, len(group), part_size)]
    if missing:
        print(f"latent cache {folder}: encoding {len(missing)} image(s) once with the frozen VAE"
              + (f" ({len(wanted) - len(missing)} cached row(s) reused)" if len(wanted) > len(missing) else "")
              + (f" in {len(groups)} part(s)" if len(groups) > 1 else "")
              + (f" in {len(_by_bucket(missing, spec))} bucket(s)" if spec.buckets is not None else ""))
    for group in groups:  # one part per latent shape and per part_size rows
        number = max(parts, default=-1) + 1
        rows = [[spec.items[i], flip] for i, flip in group]
        tmp = folder / f".new-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / ROWS).write_text(json.dumps(rows), encoding="utf-8")
        part = folder / f"part-{number:05d}"
        os.rename(tmp, part)  # the part appears with its rows: a killed build can be finished by anyone
        parts[number] = part
        for row, (identity, flip) in enumerate(rows):
            found[(identity, bool(flip))] = (number, row)
    used = {found[key][0] for key in wanted}
    for number in sorted(set(parts) - used):  # every row of it belongs to files that changed or went away
        shutil.rmtree(parts.pop(number), ignore_errors=True)
    return parts, found


def _build_parts(folder: Path, parts: dict[int, Path], spec: CacheSpec, index_of: dict, encode: Encode, build: dict,
                 wait_seconds: float, stale_seconds: float, poll_seconds: float) -> int:
    """Claim and build the unfinished parts; wait for the ones others build. Returns the images encoded here."""
    encoded, deadline = 0, time.monotonic() + wait_seconds
    while todo := [n for n, part in parts.items() if not _complete(part)]:
        mine = None
        for number in todo:
            if (mine := _claim(folder, parts[number] / CLAIM, wait_seconds, stale_seconds)) is not None:
                break
        if mine is None:  # every unfinished part is being built by a live process
            _wait(folder, deadline, wait_seconds, poll_seconds, f"parts {todo}")
            continue
        try:
            part = parts[number]
            if not _complete(part):  # unless another process finished it between our look and our claim
                plan = [(index_of[identity], bool(flip)) for identity, flip in _read_rows(part)]
                if _has_shards(part):
                    print(f"finishing the interrupted latent cache part {part}")
                build_latent_cache(_Planned(spec.source, plan), part, None, None, encode=_beating(encode, mine),
                                   **build)
                encoded += len(plan)
        finally:
            mine.release()
    return encoded


def _beating(encode: Encode, claim) -> Encode:
    """`encode`, touching `claim` at every batch: the heartbeat by which others see the part is still being built."""
    def beating(images, captions, generator=None):
        claim.beat()
        return encode(images, captions, generator)

    return beating


def _has_shards(part: Path) -> bool:
    return any(part.glob("shard-*.safetensors"))


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


def _sync_stream(folder: Path, spec: CacheSpec, variants: tuple, build: dict, seed: int, sample: bool,
                 read_only: bool, wait_seconds: float, stale_seconds: float, poll_seconds: float
                 ) -> "CachedView | None":
    """An iterable dataset, read in one order. With `spec.shards` part k holds shard k's samples, each part claimed
    and built by one process, so processes share the encoding shard by shard; else one part holds the whole
    stream, built by the process that claims it (the others wait for it). The view joins the parts in order: the
    stream a one-process build reads, and the same bytes whichever processes built which parts."""
    sources = spec.shards if spec.shards is not None else [spec.source]
    parts = {k: folder / f"part-{k:05d}" for k in range(len(sources))}
    claims = {k: folder / (f"{part.name}.{CLAIM}" if spec.shards is not None else f"stream.{CLAIM}")
              for k, part in parts.items()}
    encoded, deadline = 0, time.monotonic() + wait_seconds
    while todo := [k for k, part in parts.items() if not _stream_part_done(part)]:
        if read_only:
            return None
        mine = None
        for k in todo:
            if (mine := _claim(folder, claims[k], wait_seconds, stale_seconds)) is not None:
                break
        if mine is None:  # every unfinished part is being built by a live process
            _wait(folder, deadline, wait_seconds, poll_seconds,
                  f"the parts of shard(s) {', '.join(str(k + 1) for k in todo)} of {len(parts)}"
                  if spec.shards is not None else "the stream's part")
            continue
        try:
            if not _stream_part_done(parts[k]):
                print(f"latent cache {folder}: encoding " + (f"shard {k + 1} of {len(parts)}" if spec.shards
                                                             is not None else "the stream") + " once with the "
                      "frozen VAE")
                doubled = _Doubled(sources[k], len(variants) == 2)
                manifest = build_latent_cache(doubled, parts[k], None, None,
                                              **dict(build, encode=_beating(build["encode"], mine)))
                n = manifest["num_samples"]
                rows = [[f"#{r // len(variants)}", bool(r % len(variants))] for r in range(n)]
                _write_atomic(parts[k] / ROWS, json.dumps(rows))
                encoded += n
        finally:
            mine.release()
    used, table = {}, []
    for number, part in parts.items():
        rows = _read_rows(part)
        if rows:  # a shard with no readable sample adds no rows
            used[number] = part
        table += [[(number, i + v) for v in range(len(variants))] for i in range(0, len(rows), len(variants))]
    if not used:
        raise ValueError(f"latent cache {folder}: the stream has no readable sample to cache")
    return CachedView(used, table, seed=seed, sample=sample, encoded=encoded, resolution=spec.resolution,
                      captions=spec.captions)


def _stream_part_done(part: Path) -> bool:
    return _complete(part) and _read_rows(part) is not None


def _claim(folder: Path, path: Path, wait_seconds: float, stale_seconds: float):
    """The claim at `path` for this process (taking over a stale one), or None while a live process holds it."""
    mine = try_claim(path)
    if mine is None and is_stale(path, stale_seconds):
        with folder_lock(folder, wait_seconds, stale_seconds):  # one process breaks it and takes it
            if break_if_stale(path, stale_seconds):
                mine = try_claim(path)
    return mine


def _wait(folder: Path, deadline: float, wait_seconds: float, poll_seconds: float, what) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"latent cache {folder}: {what} not finished by the processes building them within "
                           f"{wait_seconds:.0f} s")
    time.sleep(poll_seconds)


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
