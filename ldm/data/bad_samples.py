"""Bookkeeping for samples that cannot be decoded: warn once per sample, count, go on."""

from __future__ import annotations

import io
import logging
from typing import Any, Callable

from PIL import Image, ImageOps

logger = logging.getLogger("ldm.data")


class BadSampleTracker:
    """Remembers bad samples by name; logs a warning the first time each one is seen.

    Note: with DataLoader workers each worker process holds its own copy, so
    counts seen from the main process only cover samples read in-process.
    """

    def __init__(self, source: str):
        self.source = source
        self.bad: set[str] = set()
        self.errors = 0

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
        logger.warning("%s: skipping unreadable sample %s (%s)", self.source, name, _describe(error))

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
