"""Fixtures for the data-layer tests: tiny images written into tmp_path."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image


def make_image(size=(24, 20), color=(200, 30, 40), mode="RGB") -> Image.Image:
    """A small solid image with a black top-left block so crops and flips are visible."""
    image = Image.new("RGB", size, color)
    image.paste((0, 0, 0), (0, 0, size[0] // 3, size[1] // 3))
    return image if mode == "RGB" else image.convert(mode)


def save_image(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(**kwargs).save(path)
    return path


def image_bytes(fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    make_image(**kwargs).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def images():
    """`images.make`, `images.save(path)` and `images.bytes(fmt)` helpers."""
    return SimpleNamespace(make=make_image, save=save_image, bytes=image_bytes)
