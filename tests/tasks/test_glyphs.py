"""The glyph task: a deterministic folder of dark-on-white letters captioned by class, and a classifier of them."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from ldm.tasks.glyphs.dataset import CLASSES, TEMPLATES, caption_class, render_glyph, write_glyph_folder


def test_folder_is_balanced_captioned_and_deterministic(tmp_path):
    a, b = write_glyph_folder(tmp_path / "a", n=40, resolution=24, seed=3), write_glyph_folder(tmp_path / "b", n=40,
                                                                                               resolution=24, seed=3)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and sorted({r["label"] for r in rows}) == sorted(CLASSES)
    assert all(sum(r["label"] == c for r in rows) == 4 for c in CLASSES)
    assert all(caption_class(r["text"]) == r["label"] for r in rows)
    for r in rows:
        assert (a / r["file_name"]).read_bytes() == (b / r["file_name"]).read_bytes()
    other = write_glyph_folder(tmp_path / "c", n=40, resolution=24, seed=4)
    assert (other / "00000.png").read_bytes() != (a / "00000.png").read_bytes()


def test_glyphs_are_dark_on_white_and_jittered():
    rng = random.Random(0)
    images = [np.asarray(render_glyph("K", rng, 32).convert("L"), dtype=float) for _ in range(20)]
    for im in images:
        assert im.shape == (32, 32)
        assert np.median(im) > 200 and im.min() < 110  # paper light, ink dark
    ink = [np.argwhere(im < 128).mean(0) for im in images]  # the glyph's centre moves (affine jitter)
    assert np.ptp(np.stack(ink), axis=0).max() > 2


def test_caption_class():
    assert caption_class("a drawing of the letter k") == "K"
    assert all(caption_class(t.format(c=c)) == c for t in TEMPLATES for c in CLASSES)
    with pytest.raises(ValueError, match="names no glyph class"):
        caption_class("a red circle")


def test_classifier_learns_the_glyphs():
    import torch

    from ldm.tasks.glyphs.classifier import accuracy, fit_classifier, render_set

    torch.manual_seed(0)
    x, y = render_set(600, resolution=32, seed=1)
    tx, ty = render_set(200, resolution=32, seed=2)
    model = fit_classifier(x, y, epochs=4)
    assert accuracy(model, tx, [CLASSES[i] for i in ty]) > 0.8
    untrained = fit_classifier(x[:1], y[:1], epochs=1)  # a failing classifier scores near chance
    assert accuracy(untrained, tx, [CLASSES[i] for i in ty]) < 0.5
