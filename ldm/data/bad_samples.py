"""Bookkeeping for samples that cannot be decoded: warn once per sample, count, go on."""

from __future__ import annotations

import io
import logging

from PIL import Image

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


def _describe(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def decode_image(data: bytes | str) -> Image.Image:
    """Open and fully decode an image from bytes or a path (PIL is lazy: force `load()`)."""
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    image.load()
    return image
