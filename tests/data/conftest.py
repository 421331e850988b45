"""Fixtures for the data-layer tests: tiny images written into tmp_path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers.data import image_bytes, make_image, save_image


@pytest.fixture
def images():
    """`images.make`, `images.save(path)` and `images.bytes(fmt)` helpers."""
    return SimpleNamespace(make=make_image, save=save_image, bytes=image_bytes)
