"""Bookkeeping for samples that cannot be decoded: warn once per sample, count, go on."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageOps

logger = logging.getLogger("ldm.data")


class BadSampleTracker:
    """Remembers bad samples by name; logs a warning the first time each one is seen.

    Each DataLoader worker and DDP rank holds its own copy. With ``shared_dir`` set (a folder of the run, see
    `share_bad_sample_log`) the first process to meet a bad sample creates a marker file for it there
    (exclusively, so exactly one process wins) and only that one warns: each bad sample is named once per run
    across workers, ranks and resumes, and `bad_sample_names(shared_dir)` counts them from any process.
    """

    def __init__(self, source: str, shared_dir: str | Path | None = None):
        self.source = source
        self.bad: set[str] = set()
        self.errors = 0
        self.shared_dir = None if shared_dir is None else Path(shared_dir)

    def __contains__(self, name: str) -> bool:
        return name in self.bad

    def __len__(self) -> int:
        return len(self.bad)

    def report(self, name: str, error: BaseException | str) -> None:
        """Record `name` as bad; warn (via logging) only the first time."""
        self.errors += 1
        if name in self.bad:
            return
        self.bad.add(name)
        if self.shared_dir is not None and not self._first_in_run(name, error):
            return  # another worker or rank named it already
        logger.warning("%s: skipping unreadable sample %s (%s)", self.source, name, _describe(error))

    def _first_in_run(self, name: str, error: BaseException | str) -> bool:
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        marker = self.shared_dir / f"{hashlib.sha1(f'{self.source}|{name}'.encode()).hexdigest()[:20]}.txt"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{self.source}\t{name}\t{_describe(error)[:500]}\n")
        return True

    def first_readable(self, index: int, n: int, name_of: Callable[[int], str],
                       load: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
        """Sample ``index`` of ``n``, or the next one (wrapping) that loads: a bad one is reported once and
        skipped from then on, so a corrupt file never stops a run."""
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for offset in range(n):
            i = (index + offset) % n
            name = name_of(i)
            if name in self.bad:
                continue
            try:
                return load(i)
            except Exception as error:  # corrupt, truncated, unreadable
                self.report(name, error)
        raise RuntimeError(f"{self.source}: none of the {n} samples could be decoded")


def share_bad_sample_log(dataset, folder: str | Path | None) -> None:
    """Make the bad-sample tracker of `dataset` (also under a Subset) record into `folder` (see
    BadSampleTracker); call it before the DataLoader starts its workers."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    for inner in dataset.bad_sample_sources() if callable(getattr(dataset, "bad_sample_sources", None)) else []:
        share_bad_sample_log(inner, folder)  # a dataset made of others (DreamBooth's instance + class folders)
    tracker = getattr(dataset, "_bad", None)
    if isinstance(tracker, BadSampleTracker):
        tracker.shared_dir = None if folder is None else Path(folder)


def bad_sample_names(folder: str | Path) -> list[str]:
    """The bad samples recorded in a run's folder, as "source: name" (sorted)."""
    folder = Path(folder)
    names = []
    for marker in sorted(folder.glob("*.txt")) if folder.is_dir() else []:
        try:
            source, name = marker.read_text(encoding="utf-8").split("\t")[:2]
        except (OSError, ValueError):  # a marker being written right now
            continue
        names.append(f"{source}: {name}")
    return sorted(names)


def _describe(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def decode_image(data: bytes | str) -> Image.Image:
    """Open and fully decode an image from bytes or a path (PIL is lazy: force `load()`), upright."""
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    image.load()
    return upright(image)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a phone photo stored sideways with "rotate 90" in its EXIF is trained as
    it is displayed, not as stored)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image


def upright_size(data: bytes | str) -> tuple[int, int] | None:
    """(width, height) of an image as `decode_image` returns it (EXIF orientations 5-8 swap the sides), from its
    header only; None when the file cannot be opened (it is skipped, and reported, when loaded)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as image:
            width, height = image.size
            return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)
    except Exception:  # corrupt, truncated, not an image
        return None
