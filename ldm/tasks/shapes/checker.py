"""Read (colour, shape) back from a shapes image, to score caption/content agreement.

Method: the background is the median colour of the image border; foreground is every
pixel far from it. The colour is the palette entry nearest the median of the strongest
foreground pixels. The shape comes from the foreground's bounding box: how much of it
is filled (square ~1, circle ~0.785, triangle ~0.5) and whether its top and bottom
corners are occupied (square: all; triangle: bottom only; circle: none).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.tasks.shapes.palette import DEFAULT_COLORS, UNKNOWN, parse_caption, rgb

# (top-corner occupancy, bottom-corner occupancy, fill ratio) of ideal shapes.
_PROTOTYPES = {
    "square": (1.0, 1.0, 1.0),
    "circle": (0.0, 0.0, np.pi / 4),
    "triangle": (0.0, 0.75, 0.5),
}


def image_to_array(image) -> np.ndarray:
    """Tensor (3,H,W) in [-1,1], PIL image or uint8 (H,W,3) array -> float (H,W,3) in [0,255]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
        tensor = (image.detach().cpu().float().clamp(-1, 1) + 1) * 127.5
        return tensor.permute(1, 2, 0).numpy().astype(np.float64)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {array.shape}")
    return array


class ShapesChecker:
    """Deterministic classifier of (colour, shape) for single-shape images.

    Args:
        colors: palette names the colour is matched against.
        min_contrast: foreground must differ from background by at least this
            (RGB distance, 0-255) or the image is "unknown".
        min_area: smallest foreground, as a fraction of the image, worth classifying.
    """

    def __init__(
        self,
        colors: Sequence[str] = DEFAULT_COLORS,
        min_contrast: float = 60.0,
        min_area: float = 0.005,
    ):
        self.colors = tuple(colors)
        self.palette = np.array([rgb(c) for c in self.colors], dtype=np.float64)
        self.min_contrast = float(min_contrast)
        self.min_area = float(min_area)

    # What prompt accuracy scores: the prompt-checker protocol of ldm.evaluation.metrics.PromptAccuracy
    # (``aspects`` and ``hits``), which the metrics get from the dataset's ``checker()``.
    aspects = ("color", "shape")

    def __call__(self, image) -> tuple[str, str]:
        return self.classify(image)

    def hits(self, images: torch.Tensor | Iterable, captions: Sequence[str]) -> dict[str, int]:
        """How many of ``images`` show the colour / the shape their caption names (an unknown one never counts).
        ``images``: a (B, 3, H, W) tensor in [-1, 1] or a sequence of images."""
        images = list(images)
        if len(images) != len(captions):
            raise ValueError(f"prompt_accuracy: {len(images)} images but {len(captions)} captions")
        color_hits = shape_hits = 0
        for image, caption in zip(images, captions):
            want_color, want_shape = parse_caption(caption)
            got_color, got_shape = self.classify(image)
            color_hits += got_color == want_color != UNKNOWN
            shape_hits += got_shape == want_shape != UNKNOWN
        return {"color": color_hits, "shape": shape_hits}

    def _foreground(self, pixels: np.ndarray):
        """(foreground mask, distance to the background, its 99th percentile), or None when no clear shape."""
        height, width, _ = pixels.shape
        background = np.median(_border(pixels), axis=0)
        distance = np.linalg.norm(pixels - background, axis=2)
        peak = np.percentile(distance, 99)
        if peak < self.min_contrast:
            return None
        foreground = distance > peak / 2
        if foreground.sum() < max(4, self.min_area * height * width):
            return None
        return foreground, distance, peak

    def foreground(self, image) -> np.ndarray:
        """The shape's pixels (H, W) bool: those far from the border's median colour; all False when there is no
        clear shape."""
        pixels = image_to_array(image)
        found = self._foreground(pixels)
        return found[0] if found is not None else np.zeros(pixels.shape[:2], dtype=bool)

    def classify(self, image) -> tuple[str, str]:
        """Return (colour, shape); ("unknown", "unknown") when no clear shape is found."""
        pixels = image_to_array(image)
        found = self._foreground(pixels)
        if found is None:
            return UNKNOWN, UNKNOWN
        foreground, distance, peak = found
        core = distance >= 0.75 * peak
        if core.sum() < 4:
            core = foreground
        colour = np.median(pixels[core], axis=0)
        level = np.median(distance[core])  # how far a fully covered pixel is from the background
        coverage = np.clip(distance / level, 0.0, 1.0)
        return self._color(colour), self._shape(foreground, coverage)

    def _color(self, colour: np.ndarray) -> str:
        return self.colors[int(np.argmin(np.linalg.norm(self.palette - colour, axis=1)))]

    def _shape(self, foreground: np.ndarray, coverage: np.ndarray) -> str:
        """Match corner occupancy and fill ratio (soft coverage) against ideal shapes."""
        box = _bounding_box(_drop_speckles(foreground))
        if box is None:
            return UNKNOWN
        top, bottom, left, right = box
        region = coverage[top:bottom, left:right]
        h, w = region.shape
        if h < 3 or w < 3:
            return UNKNOWN
        ky, kx = max(1, round(0.12 * h)), max(1, round(0.12 * w))
        top_corners = (region[:ky, :kx].mean() + region[:ky, -kx:].mean()) / 2
        bottom_corners = (region[-ky:, :kx].mean() + region[-ky:, -kx:].mean()) / 2
        features = np.array([top_corners, bottom_corners, region.mean()])
        return min(_PROTOTYPES, key=lambda s: np.linalg.norm(features - np.array(_PROTOTYPES[s])))


def _border(pixels: np.ndarray) -> np.ndarray:
    height, width, _ = pixels.shape
    b = max(1, min(height, width) // 16)
    mask = np.zeros((height, width), dtype=bool)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
    return pixels[mask]


def _drop_speckles(mask: np.ndarray) -> np.ndarray:
    """Keep pixels with at least 3 foreground pixels among their 8 neighbours."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    )
    return mask & (neighbours >= 3)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


_DEFAULT_CHECKER = ShapesChecker()


def classify_shapes_image(image, checker: ShapesChecker | None = None) -> tuple[str, str]:
    """(colour, shape) of a tensor in [-1, 1], PIL image or uint8 array."""
    return (checker or _DEFAULT_CHECKER).classify(image)


def prompt_accuracy(
    images: torch.Tensor | Iterable,
    captions: Sequence[str],
    checker: ShapesChecker | None = None,
) -> dict:
    """Fraction of images whose checked colour/shape match their caption.

    `images` is a (B, 3, H, W) tensor in [-1, 1] or a sequence of images.
    Returns {"color_acc": float, "shape_acc": float, "n": int}.
    """
    images = list(images)
    hits = (checker or _DEFAULT_CHECKER).hits(images, captions)
    n = len(images)
    return {"color_acc": hits["color"] / max(n, 1), "shape_acc": hits["shape"] / max(n, 1), "n": n}
