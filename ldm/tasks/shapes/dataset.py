"""Procedural "coloured shape on a plain background" images with matching captions.

Every sample is a pure function of (seed, index), so the dataset holds no state and
can be indexed from any worker. The checker in `ldm.tasks.shapes.checker` reads colour and shape
back from an image, which makes caption/content consistency measurable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.tasks.shapes.checker import ShapesChecker
from ldm.tasks.shapes.palette import (
    DEFAULT_BACKGROUNDS,
    DEFAULT_COLORS,
    MIN_CONTRAST,
    SHAPES,
    color_distance,
    rgb,
)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one sample; sizes are in pixels."""

    shape: str
    color: str
    background: str
    side: float
    center_x: float
    center_y: float


def render_shape(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """Draw `spec` as a uint8 array (resolution, resolution, 3); no anti-aliasing."""
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = rgb(spec.background)
    image[shape_mask(spec, resolution)] = rgb(spec.color)
    return image


def shape_mask(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """The pixels (resolution, resolution) bool that `render_shape` colours."""
    ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
    dx, dy, half = xs - spec.center_x, ys - spec.center_y, spec.side / 2
    if spec.shape == "square":
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif spec.shape == "circle":
        mask = dx**2 + dy**2 <= half**2
    elif spec.shape == "triangle":  # upright isosceles, base == height == side
        depth = (dy + half) / spec.side  # 0 at the apex, 1 at the base
        mask = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known shapes: {list(SHAPES)}")
    return mask


class ShapesDataset(Dataset):
    """Map-style dataset of coloured circles/squares/triangles with captions.

    Args:
        size: number of samples (indices 0..size-1).
        resolution: image side in pixels.
        seed: dataset seed; sample i depends only on (seed, i).
        colors: shape colour names (see `palette.COLORS`).
        shapes: subset of ("circle", "square", "triangle").
        backgrounds: background colour names; a background too close to the
            shape colour is never paired with it.
        min_scale, max_scale: shape side as a fraction of `resolution`.
        template: caption format with {color}, {shape} and {background}.
    """

    def __init__(
        self,
        size: int = 10_000,
        resolution: int = 32,
        seed: int = 0,
        colors: tuple[str, ...] | list[str] = DEFAULT_COLORS,
        shapes: tuple[str, ...] | list[str] = SHAPES,
        backgrounds: tuple[str, ...] | list[str] = DEFAULT_BACKGROUNDS,
        min_scale: float = 0.35,
        max_scale: float = 0.7,
        template: str = "a {color} {shape} on a {background} background",
    ):
        if int(size) <= 0:
            raise ValueError(f"ShapesDataset: size must be positive, got {size!r}")
        if int(resolution) < 8:
            raise ValueError(f"ShapesDataset: resolution must be >= 8, got {resolution!r}")
        if not 0 < min_scale <= max_scale < 1:
            raise ValueError(
                f"ShapesDataset: need 0 < min_scale <= max_scale < 1, got {min_scale}, {max_scale}"
            )
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or not shapes:
            raise ValueError(f"ShapesDataset: shapes must be a non-empty subset of {SHAPES}, got {list(shapes)}")
        for name in (*colors, *backgrounds):
            rgb(name)  # raises with the list of known colours
        self.size = int(size)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.colors = tuple(colors)
        self.shapes = tuple(shapes)
        self.backgrounds = tuple(backgrounds)
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)
        self.template = template
        self._backgrounds_for = {c: self._distinct_backgrounds(c) for c in self.colors}

    def _distinct_backgrounds(self, color: str) -> tuple[str, ...]:
        options = tuple(b for b in self.backgrounds if color_distance(color, b) >= MIN_CONTRAST)
        if not options:
            raise ValueError(
                f"ShapesDataset: colour {color!r} is too close to every background "
                f"{list(self.backgrounds)}; add a contrasting background or drop the colour"
            )
        return options

    def backgrounds_for(self, color: str) -> tuple[str, ...]:
        """The backgrounds this colour is drawn on (those with enough contrast)."""
        return self._backgrounds_for[color]

    def __len__(self) -> int:
        return self.size

    def spec(self, index: int) -> ShapeSpec:
        """The drawing parameters of sample `index` (deterministic in seed and index)."""
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesDataset index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        shape = self.shapes[rng.integers(len(self.shapes))]
        color = self.colors[rng.integers(len(self.colors))]
        backgrounds = self._backgrounds_for[color]
        background = backgrounds[rng.integers(len(backgrounds))]
        side = rng.uniform(self.min_scale, self.max_scale) * self.resolution
        margin = 1.0 + side / 2
        center_x, center_y = rng.uniform(margin, self.resolution - margin, size=2)
        return ShapeSpec(shape, color, background, float(side), float(center_x), float(center_y))

    def caption(self, spec: ShapeSpec) -> str:
        return self.template.format(color=spec.color, shape=spec.shape, background=spec.background)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.size
        spec = self.spec(index)
        array = render_shape(spec, self.resolution)
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": image, "caption": self.caption(spec), "index": index}

    def cache_key(self) -> str:
        """Every parameter the samples depend on (they are a pure function of these): the key of latent caches."""
        return json.dumps({"type": "ShapesDataset", "version": 1, "size": self.size, "resolution": self.resolution,
                           "seed": self.seed, "colors": self.colors, "shapes": self.shapes,
                           "backgrounds": self.backgrounds, "min_scale": self.min_scale,
                           "max_scale": self.max_scale, "template": self.template}, sort_keys=True)

    def cache_spec(self):
        """The automatic latent cache's key: the parameters (`cache_key`); sample i is item i."""
        from ldm.data.auto_cache import CacheSpec

        return CacheSpec({"kind": "ShapesDataset", "key": self.cache_key()}, [str(i) for i in range(self.size)],
                         self, resolution=self.resolution)

    def checker(self) -> ShapesChecker:
        """A checker whose palette is this dataset's shape colours."""
        return ShapesChecker(colors=self.colors)
