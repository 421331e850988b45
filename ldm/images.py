"""Tensor <-> PIL conversions and labelled image grids (used by sample.py and the training callbacks)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of RGB PIL images (rounded to nearest, clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in x]


def image_grid(images: list[Image.Image], labels: list[str] | None = None, ncol: int | None = None,
               label_height: int = 12, pad: int = 2) -> Image.Image:
    """Tile images (all the same size) into a grid, with a line of text under each when labels are given."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    ncol = ncol or math.ceil(math.sqrt(len(images)))
    nrow = math.ceil(len(images) / ncol)
    lh = label_height if labels else 0
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + lh + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + lh + pad)
        grid.paste(img, (x, y))
        if labels:
            draw.text((x, y + h), _fit(labels[i], w), fill=(0, 0, 0))
    return grid


def _fit(text: str, width: int, char_px: int = 6) -> str:
    """Shorten a label to what fits under an image of this width (default bitmap font ~6 px per char)."""
    n = max(width // char_px, 4)
    return text if len(text) <= n else text[: n - 1] + "…"
