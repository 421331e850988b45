"""Images in a folder with captions, following Hugging Face `imagefolder` conventions.

Captions come from, in order of preference:
  1. a `metadata.jsonl` or `metadata.csv` (in the root or any subfolder) whose rows have
     `file_name` (relative to that metadata file's folder) and the caption column;
  2. a sidecar text file next to the image (`img.png` + `img.txt`; `captions.extension` picks another suffix,
     e.g. ".caption");
  3. otherwise "" (counted in `missing_captions`, logged once at start-up).

Files that cannot be decoded are skipped: warned once by name, counted in `bad_files`,
and the next index is returned instead.

A folder may be downloaded: an image that is a symbolic link resolving outside `root` is never read (skipped and
counted like an undecodable one), and a caption sidecar or metadata file linking outside `root` is ignored with a
warning, so no file elsewhere on the machine reaches the samples or the captions.

Captions are then processed per sample (prefix/suffix, wildcards, shuffle, tag dropout: `ldm.data.captions`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from torch.utils.data import Dataset

from ldm.data.bad_samples import BadSampleTracker, decode_image, upright_size
from ldm.data.bucketed import assign_source_buckets, buckets_enabled, cache_records, cut_sample
from ldm.data.captions import CaptionProcessor, SharedEpoch, caption_cache_fields
from ldm.data.transforms import ImageTransform
from ldm.formats.safe_load import CheckpointError, json_value
from ldm.formats.safe_paths import inside, is_inside

logger = logging.getLogger("ldm.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class ImageFolderDataset(Dataset):
    """Map-style dataset over every image under `root` (recursively, sorted by path).

    Args:
        root: folder holding the images (and optionally metadata files / .txt sidecars).
        resolution: output side length; see `ImageTransform`.
        caption_column: metadata column holding the caption.
        center_crop, random_flip, seed: passed to `ImageTransform`.
        extensions: image file suffixes to include (case-insensitive).
        captions: caption options (`ldm.data.captions.CaptionProcessor` fields, config `data.train.captions`),
            applied per (seed, epoch, index); None: captions as read.
        buckets: aspect-ratio buckets (`ldm.data.buckets.BucketSettings`: enabled, step, min_side, max_side,
            no_upscale); enabled, each image is resized to cover its bucket (max area resolution^2) and cropped
            to it, and its sample records original_size, crop_top_left and target_size.

    ``companion``: None, or a callable giving image i's companion image (PIL), cut with the image's own resize, crop
    and flip and returned as "companion" (a ControlNet pair's control image: ``ldm.data.control_pairs`` sets it); an
    unreadable companion makes the sample unreadable (skipped like a bad image).
    """

    companion = None

    def __init__(
        self,
        root: str | Path,
        resolution: int = 256,
        caption_column: str = "text",
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int | None = None,
        extensions: tuple[str, ...] | list[str] = IMAGE_EXTENSIONS,
        captions: CaptionProcessor | dict | None = None,
        buckets: dict | None = None,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataset: root folder does not exist: {self.root}")
        self.caption_column = caption_column
        self.caption_options = CaptionProcessor.of(captions)
        self._epoch = SharedEpoch()
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.transform = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)
        self.files = self._find_images()
        if not self.files:
            raise FileNotFoundError(
                f"ImageFolderDataset: no images ({', '.join(self.extensions)}) found under {self.root}"
            )
        self.bad_metadata_rows = 0  # metadata lines that are not UTF-8: skipped (named in a warning) and counted
        self.captions, self.missing_captions = self._load_captions()
        if self.missing_captions:
            logger.warning(
                "ImageFolderDataset(%s): %d of %d images have no caption; using an empty caption",
                self.root, self.missing_captions, len(self.files),
            )
        self._bad = BadSampleTracker(f"ImageFolderDataset({self.root})")
        self.bucket_assignment = assign_source_buckets(
            buckets, [self._size(key) for key in self.files] if buckets_enabled(buckets) else [],
            self.transform.resolution, f"ImageFolderDataset({self.root})")

    @property
    def bad_files(self) -> set[str]:
        """Paths (relative to root) that failed to decode in this process."""
        return set(self._bad.bad)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        """Sample `index`, or the next readable one if that file is bad."""
        return self._bad.first_readable(index, len(self.files), self.files.__getitem__,
                                        lambda i: self._load(i, slot=index % len(self.files)))

    def set_epoch(self, epoch: int) -> None:
        """Caption shuffle / dropout / wildcards draw anew each epoch."""
        self._epoch.set(epoch)

    def _load(self, i: int, slot: int | None = None) -> dict:
        """Image i, at the size of index ``slot``'s bucket with buckets (i replaces an unreadable ``slot``)."""
        key = self.files[i]
        image = decode_image(str(self.image_path(key)))
        companion = None if self.companion is None else self.companion(i)
        sample = cut_sample(self.transform, self.bucket_assignment, image, i if slot is None else slot, i, companion)
        return {**sample, "caption": self.caption(i), "key": key, "index": i}

    def image_path(self, key: str) -> Path:
        """``root / key``; a CheckpointError naming it when a symbolic link takes it outside root (a downloaded
        folder may link any file the user can read): `first_readable` then skips it as a bad sample."""
        return inside(self.root, key, source=f"ImageFolderDataset({self.root})", key="image")

    def _size(self, key: str) -> tuple[int, int] | None:
        """The image's size from its header; None (skipped when loaded) for one outside root, which is not read."""
        path = self.root / key
        return upright_size(str(path)) if is_inside(path, self.root) else None

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(width, height) of sample i from its file's header (nothing decoded); None when it cannot be read."""
        try:
            return self._size(self.files[i])
        except (OSError, ValueError):
            return None

    def caption(self, i: int) -> str:
        """The processed caption of sample i in the current epoch."""
        if self.caption_options.is_identity:
            return self.captions[i]
        return self.caption_options(self.captions[i], i, self._epoch.get())

    @property
    def resolution(self) -> int:
        return self.transform.resolution

    def cache_spec(self):
        """What the automatic latent cache depends on: each file's path, size, mtime and caption, the root and
        the transform (`ldm.data.auto_cache`). A changed file gets a new identity and is encoded again."""
        import copy

        from ldm.data.auto_cache import CacheSpec, place_digest

        buckets = self.bucket_assignment
        items = []
        for i, (key, caption) in enumerate(zip(self.files, self.captions)):
            stat = (self.root / key).stat()
            identity = [key, stat.st_size, stat.st_mtime_ns, caption]
            items.append(json.dumps(identity if buckets is None else identity + [list(buckets.target(i)),
                                                                         list(buckets.resized[i])]))
        t = self.transform
        settings = {"kind": "ImageFolderDataset", "root": place_digest(self.root), "resolution": t.resolution,
                    "center_crop": t.center_crop}
        if buckets is not None:  # another bucket table crops differently: another cache folder
            settings["buckets"] = {"table": [list(b) for b in buckets.table], "no_upscale": not buckets.table}
        plain = copy.copy(self)
        plain.transform = ImageTransform(t.resolution, center_crop=True, random_flip=False)
        return CacheSpec(settings, items, plain, flip=t.random_flip, random_crop=not t.center_crop,
                         resolution=t.resolution, buckets=buckets,
                         records=None if buckets is None else cache_records(buckets, t.random_flip),
                         **caption_cache_fields(plain, settings))

    def _find_images(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in self.extensions and p.is_file()
        )

    def _load_captions(self) -> tuple[list[str], int]:
        from_metadata = self._read_all_metadata()
        captions, missing = [], 0
        for key in self.files:
            caption = from_metadata.get(key) or _read_sidecar(self.root / key, self.caption_options.extension,
                                                               self.root)
            if not caption:
                missing += 1
            captions.append(caption or "")
        return captions, missing

    def _read_all_metadata(self) -> dict[str, str]:
        """{image path relative to root: caption} from every metadata file under root."""
        captions: dict[str, str] = {}
        for name in METADATA_FILES:
            for meta in sorted(self.root.rglob(name)):
                if not is_inside(meta, self.root):
                    logger.warning("%s is a symbolic link to a file outside %s: not read (its captions are "
                                   "ignored)", meta, self.root)
                    continue
                folder = meta.parent.relative_to(self.root)
                rows, bad_lines = _read_rows(meta)
                self.bad_metadata_rows += len(bad_lines)
                columns = sorted({column for row in rows for column in row})
                for required in ("file_name", self.caption_column):
                    if rows and required not in columns:
                        raise ValueError(
                            f"{meta}: no column {required!r}; available columns: {columns}"
                            + (". Set caption_column to one of them." if required == self.caption_column else "")
                        )
                for row in rows:
                    key = (folder / str(row.get("file_name", ""))).as_posix()
                    if not (self.root / key).is_file():
                        raise FileNotFoundError(f"{meta}: file_name {row.get('file_name')!r} not found at {self.root / key}")
                    value = row.get(self.caption_column)
                    captions[key] = "" if value is None else str(value)
        return captions


def _read_rows(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a metadata file, and the numbers of its lines that are not UTF-8 (skipped, each named in a
    warning without its content: the image of such a row falls back to its .txt sidecar, else "")."""
    lines, bad = _utf8_lines(path)
    if path.suffix == ".csv":
        return list(csv.DictReader(line for _, line in lines)), bad
    rows = []
    for line_number, line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json_value(line, source=f"{path}:{line_number}", key="the row"))
        except CheckpointError as error:  # invalid, too deep, an absurd number: named by file and line
            raise ValueError(str(error)) from None
    return rows, bad


def _utf8_lines(path: Path) -> tuple[list[tuple[int, str]], list[int]]:
    good, bad = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                good.append((line_number, raw.decode("utf-8")))
            except UnicodeDecodeError as error:
                bad.append(line_number)
                logger.warning("%s:%d: skipping a metadata row that is not UTF-8 (byte 0x%02x at column %d); "
                               "save the file as UTF-8 to use it", path, line_number, raw[error.start],
                               error.start + 1)
    return good, bad


def _read_sidecar(image_path: Path, extension: str, root: Path) -> str | None:
    """The caption beside the image; None when there is none, or when it is a symbolic link out of ``root``
    (ignored with a warning: the image keeps an empty caption, as without a sidecar, rather than being dropped,
    since the image itself is the folder's own; the linked file's words never become a caption)."""
    sidecar = image_path.with_suffix(extension)
    if not sidecar.is_file():
        return None
    if not is_inside(sidecar, root):
        logger.warning("%s is a symbolic link to a file outside %s: not read as a caption", sidecar, root)
        return None
    return sidecar.read_text(encoding="utf-8").strip()
