"""A small CNN that names the glyph in an image: the judge of the own-data benchmark's samples.

It is fit once on real glyph images (grey levels, each image normalised to its own mean and spread, so that only
the glyph's form counts, not the ink or paper grey) and scored on held-out real images before it judges samples.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ldm.evaluation.judge import fit_shift_augmented
from ldm.tasks.glyphs.dataset import CLASSES, render_glyph


class GlyphClassifier(nn.Module):
    """3 conv blocks (16, 32, 64 channels, each halving the side) + a linear layer over ``len(CLASSES)``."""

    def __init__(self, n_classes: int = len(CLASSES)):
        super().__init__()
        layers, c_in = [], 1
        for c in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, n_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) grey, each image standardised."""
        grey = images.float().mean(dim=1, keepdim=True)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        std = grey.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)
        return (grey - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.features(self.prepare(images))
        return self.head(h.mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[str]:
        was_training = self.training
        self.eval()
        out = [i for s in range(0, len(images), batch_size)
               for i in self(images[s:s + batch_size]).argmax(1).tolist()]
        self.train(was_training)
        return [CLASSES[i] for i in out]


def render_set(n: int, resolution: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` freshly rendered glyphs (balanced classes) as (images in [-1, 1], labels)."""
    import numpy as np

    rng = random.Random(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    rng.shuffle(labels)
    arrays = [np.asarray(render_glyph(CLASSES[y], rng, resolution), dtype=np.float32) for y in labels]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, torch.tensor(labels)


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 6, batch_size: int = 64,
                   lr: float = 3e-3, seed: int = 0) -> GlyphClassifier:
    """A GlyphClassifier fit on real glyphs (ldm.evaluation.judge.fit_shift_augmented: Adam, 2 px random shifts)."""
    return fit_shift_augmented(GlyphClassifier, images, labels, epochs, batch_size, lr, seed)


def accuracy(model: GlyphClassifier, images: torch.Tensor, labels: list[str]) -> float:
    """Fraction of ``images`` the classifier names as ``labels``."""
    predicted = model.predict(images)
    return sum(p == y for p, y in zip(predicted, labels)) / max(1, len(labels))
