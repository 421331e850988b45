"""Render the glyph dataset into an image folder (PNGs + metadata.jsonl), the layout `data=folder` reads.

    python -m ldm.tasks.glyphs DIR --n 2000 --resolution 32 --seed 0

Each image: one of ``CLASSES`` drawn with a random font size and stroke width at 4x the output size, a random
affine jitter (rotation, shear, scale, translation), dark ink on a light background, downsampled (Lanczos) to the
output size. The caption names the class ("the letter K", "a drawing of the letter K", ...). The same arguments
always give the same files.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ldm.data.class_folder import write_class_folder

# Ten letters whose glyphs differ at 32 px (no O/Q, I/L or C/G pairs).
CLASSES = ("A", "E", "F", "H", "K", "M", "R", "S", "W", "X")
TEMPLATES = ("the letter {c}", "a drawing of the letter {c}", "letter {c} in dark ink on white paper",
             "a printed letter {c}")
SUPERSAMPLE = 4
_CLASS_IN_CAPTION = re.compile(r"\bletter ([a-z])\b", re.IGNORECASE)


def caption_class(caption: str) -> str:
    """The class a caption names ("a drawing of the letter K" -> "K"); ValueError if it names none."""
    m = _CLASS_IN_CAPTION.search(caption)
    if m is None or m.group(1).upper() not in CLASSES:
        raise ValueError(f"caption {caption!r} names no glyph class (expected 'letter X' with X in {CLASSES})")
    return m.group(1).upper()


def font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's embedded default font (Aileron) at ``size`` px: the same on every machine with FreeType."""
    return ImageFont.load_default(size=size)


def render_glyph(cls: str, rng: random.Random, resolution: int = 32) -> Image.Image:
    """One RGB image of the glyph ``cls`` with random size, stroke, affine jitter and ink / paper greys."""
    big = resolution * SUPERSAMPLE
    ink, paper = rng.randint(0, 70), rng.randint(225, 255)
    size = int(big * rng.uniform(0.55, 0.8))
    stroke = rng.randint(0, max(1, big // 32))
    layer = Image.new("L", (big, big), 0)  # coverage mask, drawn centred, then warped
    ImageDraw.Draw(layer).text((big / 2, big / 2), cls, fill=255, font=font(size), anchor="mm",
                               stroke_width=stroke, stroke_fill=255)
    angle = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.2, 0.2)
    scale = rng.uniform(0.85, 1.1)
    tx, ty = (rng.uniform(-0.08, 0.08) * big for _ in range(2))
    # inverse map output -> input about the centre: x_in = A^-1 (x_out - c - t) + c, A = scale * R(angle) * shear
    cos, sin = math.cos(angle), math.sin(angle)
    a, b, d, e = scale * cos, scale * (cos * shear - sin), scale * sin, scale * (sin * shear + cos)
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    c = big / 2
    ox, oy = c + tx, c + ty
    coeffs = (ia, ib, c - ia * ox - ib * oy, id_, ie, c - id_ * ox - ie * oy)
    mask = layer.transform((big, big), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    image = Image.composite(Image.new("L", (big, big), ink), Image.new("L", (big, big), paper), mask)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS).convert("RGB")


def write_glyph_folder(root: str | Path, n: int = 2000, resolution: int = 32, seed: int = 0) -> Path:
    """Write ``n`` glyph PNGs (classes balanced, order shuffled) and their ``metadata.jsonl`` into ``root``."""
    return write_class_folder(root, n, CLASSES, TEMPLATES, render_glyph, resolution, seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output folder (PNGs + metadata.jsonl)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_glyph_folder(a.root, a.n, a.resolution, a.seed))


if __name__ == "__main__":
    main()
