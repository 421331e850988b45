"""A tiny ControlNet data set made on the spot: 16x16 pictures of a coloured square at a random place, the square's
white silhouette on black as the conditioning image (same file name), a caption sidecar per picture."""

from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def write_control_pairs(root: Path, n: int = 16, size: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """(images folder with .txt captions, conditioning folder) of ``n`` pairs."""
    rng = np.random.default_rng(seed)
    images, controls = Path(root) / "images", Path(root) / "controls"
    images.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        color = list(COLORS)[i % len(COLORS)]
        side = size // 2
        top, left = rng.integers(0, size - side + 1, size=2)
        picture = np.full((size, size, 3), 255, np.uint8)
        picture[top:top + side, left:left + side] = COLORS[color]
        mask = np.zeros((size, size, 3), np.uint8)
        mask[top:top + side, left:left + side] = 255
        Image.fromarray(picture).save(images / f"{i:03d}.png")
        Image.fromarray(mask).save(controls / f"{i:03d}.png")
        (images / f"{i:03d}.txt").write_text(f"a {color} square")
    return images, controls


# at resolution 16, buckets of step 8: 52x16 -> bucket (24, 8) (resized to 26x8: 2 columns to spare for a random crop),
# 16x52 -> (8, 24) (8x26), 20x22 -> (16, 16) (16x18)
MIXED_SIZES = [(52, 16)] * 3 + [(16, 52)] * 3 + [(20, 22)] * 2


def write_mixed_pairs(root: Path, sizes=MIXED_SIZES, seed: int = 0) -> tuple[Path, Path]:
    """(images folder with .txt captions, conditioning folder): random pictures of the given (width, height) sizes,
    each conditioning image the picture's negative (255 - pixel), a function of the picture that shows any shift,
    mirror or rescale of one against the other."""
    rng = np.random.default_rng(seed)
    images, controls = Path(root) / "images", Path(root) / "controls"
    images.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        picture = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(picture).save(images / f"{i:03d}.png")
        Image.fromarray(255 - picture).save(controls / f"{i:03d}.png")
        shape = "wide" if width > 1.5 * height else "tall" if height > 1.5 * width else "square"
        (images / f"{i:03d}.txt").write_text(f"a {shape} picture")
    return images, controls
