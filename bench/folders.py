"""Two image folders of our own making (neither the shapes nor the glyphs), and a judge fit on their real images.

- ``icons``: ten classes of black line art on white (cross, plus, ring, square, triangle, arrow, star, zigzag,
  house, heart), each drawn at 4x with a random size, position, rotation, stroke width and ink / paper grey, then
  downsampled; captions "a black line drawing of a cross", "an icon of a cross", ...
- ``swatches``: ten classes of colourful textures (red horizontal stripes, blue vertical stripes, green
  checkerboard, yellow polka dots, purple diagonal stripes, orange rings, cyan grid, pink waves, brown bricks, teal
  patches), each with a random period, phase and colour jitter; captions "red horizontal stripes", "a texture of
  red horizontal stripes", ...

``write_folder(kind, DIR, n)`` writes PNGs + metadata.jsonl (the layout ``data=folder`` reads); ``render(kind, n,
seed)`` gives fresh (images, labels) tensors; ``fit_judge`` a small RGB CNN fit on real images of a folder. The
same arguments always give the same images.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn

from ldm.data.class_folder import write_class_folder
from ldm.evaluation.judge import fit_shift_augmented

SUPERSAMPLE = 4
ICONS = ("cross", "plus", "ring", "square", "triangle", "arrow", "star", "zigzag", "house", "heart")
ICON_TEMPLATES = ("a black line drawing of a {c}", "an icon of a {c}", "a {c} drawn in black on white",
                  "simple line art of a {c}")
SWATCHES = ("red horizontal stripes", "blue vertical stripes", "green checkerboard", "yellow polka dots",
            "purple diagonal stripes", "orange rings", "cyan grid", "pink waves", "brown bricks", "teal patches")
SWATCH_TEMPLATES = ("{c}", "a texture of {c}", "a colourful pattern of {c}", "a swatch with {c}")


def _icon_points(cls: str) -> list[list[tuple[float, float]]]:
    """Polylines of an icon in a unit box centred on 0 (y down)."""
    if cls == "cross":
        return [[(-1, -1), (1, 1)], [(-1, 1), (1, -1)]]
    if cls == "plus":
        return [[(0, -1), (0, 1)], [(-1, 0), (1, 0)]]
    if cls == "ring":
        return [[(math.cos(t * math.pi / 24), math.sin(t * math.pi / 24)) for t in range(49)]]
    if cls == "square":
        return [[(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85), (-0.85, -0.85)]]
    if cls == "triangle":
        return [[(0, -1), (0.95, 0.8), (-0.95, 0.8), (0, -1)]]
    if cls == "arrow":
        return [[(-1, 0), (1, 0)], [(0.3, -0.6), (1, 0), (0.3, 0.6)]]
    if cls == "star":
        return [[(math.sin(k * 4 * math.pi / 5), -math.cos(k * 4 * math.pi / 5)) for k in range(6)]]
    if cls == "zigzag":
        return [[(-1 + 0.4 * k, -0.5 if k % 2 else 0.5) for k in range(6)]]
    if cls == "house":
        return [[(-0.8, 1), (-0.8, 0), (0, -0.9), (0.8, 0), (0.8, 1), (-0.8, 1)]]
    if cls == "heart":  # the classic parametric heart, scaled into the box
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                         - math.cos(4 * t))) for t in (k * math.pi / 24 for k in range(49))]
        return [[(x / 17, (y + 2) / 17) for x, y in pts]]
    raise ValueError(f"unknown icon {cls!r}")


def render_icon(cls: str, rng: random.Random, resolution: int = 32) -> Image.Image:
    big = resolution * SUPERSAMPLE
    ink, paper = rng.randint(0, 60), rng.randint(225, 255)
    image = Image.new("RGB", (big, big), (paper,) * 3)
    draw = ImageDraw.Draw(image)
    half = big * rng.uniform(0.25, 0.38)
    cx, cy = (big / 2 + rng.uniform(-0.1, 0.1) * big for _ in range(2))
    angle = math.radians(rng.uniform(-15, 15))
    cos, sin = math.cos(angle), math.sin(angle)
    width = rng.randint(big // 20, big // 11)
    for line in _icon_points(cls):
        pts = [(cx + half * (x * cos - y * sin), cy + half * (x * sin + y * cos)) for x, y in line]
        draw.line(pts, fill=(ink,) * 3, width=width, joint="curve")
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50), "yellow": (240, 210, 20),
           "purple": (130, 40, 170), "orange": (245, 130, 20), "cyan": (20, 200, 220), "pink": (245, 120, 180),
           "brown": (130, 80, 40), "teal": (20, 128, 128)}
BACKGROUNDS = {"red": (250, 250, 250), "blue": (245, 245, 235), "green": (250, 250, 250), "yellow": (40, 40, 110),
               "purple": (240, 235, 250), "orange": (255, 245, 225), "cyan": (15, 30, 60), "pink": (255, 255, 255),
               "brown": (225, 215, 200), "teal": (200, 240, 235)}


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def render_swatch(cls: str, rng: random.Random, resolution: int = 32) -> Image.Image:
    big = resolution * SUPERSAMPLE
    colour = cls.split()[0]
    fg, bg = _jitter(COLOURS[colour], rng), _jitter(BACKGROUNDS[colour], rng)
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    period = rng.uniform(0.18, 0.3) * big
    phase = rng.uniform(0, period)
    pattern = cls.split(maxsplit=1)[1]
    if pattern in ("horizontal stripes", "vertical stripes", "diagonal stripes"):
        for k in range(-4, int(big / period) + 8):
            a = phase + k * period
            if pattern == "horizontal stripes":
                draw.rectangle([0, a, big, a + period / 2], fill=fg)
            elif pattern == "vertical stripes":
                draw.rectangle([a, 0, a + period / 2, big], fill=fg)
            else:
                draw.polygon([(a - big, big), (a, 0), (a + period / 2, 0), (a + period / 2 - big, big)], fill=fg)
    elif pattern in ("checkerboard", "polka dots", "grid", "bricks"):
        n = int(big / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                x, y = phase + i * period, phase + j * period
                if pattern == "checkerboard" and (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + period, y + period], fill=fg)
                elif pattern == "polka dots":
                    r = period * 0.28
                    draw.ellipse([x + period / 2 - r, y + period / 2 - r, x + period / 2 + r, y + period / 2 + r],
                                 fill=fg)
                elif pattern == "grid":
                    draw.line([(x, 0), (x, big)], fill=fg, width=int(period / 5))
                    draw.line([(0, y), (big, y)], fill=fg, width=int(period / 5))
                elif pattern == "bricks":
                    off = period / 2 if j % 2 else 0
                    draw.rectangle([x + off, y, x + off + period * 0.9, y + period * 0.42], fill=fg)
    elif pattern == "rings":
        cx, cy = (big / 2 + rng.uniform(-0.15, 0.15) * big for _ in range(2))
        for k in range(int(1.5 * big / period), 0, -1):
            r = k * period / 2 + phase / 2
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg if k % 2 else bg)
    elif pattern == "waves":
        for k in range(-2, int(big / period) + 3):
            y0 = phase + k * period
            pts = [(x, y0 + period * 0.25 * math.sin(2 * math.pi * x / (1.3 * period))) for x in range(0, big + 4, 4)]
            draw.line(pts, fill=fg, width=int(period / 3))
    elif pattern == "patches":
        for _ in range(rng.randint(4, 7)):
            r = rng.uniform(0.12, 0.25) * big
            x, y = rng.uniform(0, big), rng.uniform(0, big)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(fg, rng, 25))
    else:
        raise ValueError(f"unknown swatch {cls!r}")
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


KINDS = {"icons": (ICONS, ICON_TEMPLATES, render_icon), "swatches": (SWATCHES, SWATCH_TEMPLATES, render_swatch)}


def classes(kind: str) -> tuple[str, ...]:
    return KINDS[kind][0]


def prompts(kind: str, per_class: int) -> tuple[list[str], list[str]]:
    """(prompts, labels): ``per_class`` captions of every class, cycling through the caption templates."""
    names, templates, _ = KINDS[kind]
    pairs = [(templates[(i + r) % len(templates)].format(c=c), c) for i, c in enumerate(names)
             for r in range(per_class)]
    return [p for p, _ in pairs], [c for _, c in pairs]


def write_folder(kind: str, root: Path, n: int, resolution: int = 32, seed: int = 0) -> Path:
    """``n`` images (balanced classes, shuffled) + metadata.jsonl captions naming the class."""
    names, templates, render_image = KINDS[kind]
    return write_class_folder(root, n, names, templates, render_image, resolution, seed)


def render(kind: str, n: int, resolution: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh images (balanced classes) as (images in [-1, 1], class indices)."""
    import numpy as np

    names, _, draw = KINDS[kind]
    rng = random.Random(seed)
    labels = [i % len(names) for i in range(n)]
    rng.shuffle(labels)
    arrays = [np.asarray(draw(names[y], rng, resolution), dtype=np.float32) for y in labels]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0, torch.tensor(labels)


def read_folder(kind: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A written folder's images and labels (the class its caption names)."""
    import numpy as np

    names = classes(kind)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    labels = [next(i for i, c in enumerate(names) if c in r["text"]) for r in rows]
    arrays = [np.asarray(Image.open(root / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0, torch.tensor(labels)


class Judge(nn.Module):
    """3 conv blocks (16, 32, 64 channels, each halving the side) on RGB + a linear layer: names the class."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        layers, c_in = [], 3
        for c in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, len(names))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.float()).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[str]:
        self.eval()
        return [self.names[i] for s in range(0, len(images), batch_size)
                for i in self(images[s:s + batch_size]).argmax(1).tolist()]


def fit_judge(kind: str, images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, batch_size: int = 64,
              lr: float = 3e-3, seed: int = 0) -> Judge:
    """Adam on cross-entropy with a random shift of up to 2 px per batch (samples are not centred exactly)."""
    return fit_shift_augmented(lambda: Judge(classes(kind)), images, labels, epochs, batch_size, lr, seed)
