"""Names and RGB values shared by the shapes dataset and its checker, plus caption parsing."""

from __future__ import annotations

import re

UNKNOWN = "unknown"

SHAPES = ("circle", "square", "triangle")

# Saturated colours that stay far apart (>= ~90 in RGB distance) and far from the backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 40, 220),
    "yellow": (250, 220, 20),
    "orange": (250, 130, 10),
    "purple": (130, 30, 170),
    "cyan": (20, 200, 220),
    "magenta": (220, 30, 200),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

DEFAULT_COLORS = ("red", "green", "blue", "yellow", "orange", "purple")
DEFAULT_BACKGROUNDS = ("white", "black", "gray")

# A shape colour and its background must be at least this far apart (RGB, 0-255).
MIN_CONTRAST = 100.0


def rgb(name: str) -> tuple[int, int, int]:
    """RGB value of a palette colour, with an error listing the known names."""
    try:
        return COLORS[name]
    except KeyError:
        raise ValueError(f"unknown colour {name!r}; known colours: {sorted(COLORS)}") from None


def color_distance(a: str, b: str) -> float:
    """Euclidean RGB distance between two named colours."""
    return sum((x - y) ** 2 for x, y in zip(rgb(a), rgb(b))) ** 0.5


_WORD = re.compile(r"[a-z]+")


def parse_caption(caption: str) -> tuple[str, str]:
    """Extract (colour, shape) from a caption such as "a red circle on a white background".

    The colour is the last colour word before the shape word; "unknown" where missing.
    """
    words = _WORD.findall(caption.lower())
    singular = [w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w for w in words]
    shape_at = next((i for i, w in enumerate(singular) if w in SHAPES), None)
    if shape_at is None:
        colour = next((w for w in words if w in COLORS), UNKNOWN)
        return colour, UNKNOWN
    colour = next((w for w in reversed(words[:shape_at]) if w in COLORS), UNKNOWN)
    return colour, singular[shape_at]
