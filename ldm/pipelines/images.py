"""Image and mask conversions for the pipelines: PIL <-> tensors in [-1, 1], masks, feathering, grids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def image_batch(image) -> Tensor:
    """A PIL image, a list of them, or a tensor (3, H, W) / (B, 3, H, W) in [-1, 1] -> float (B, 3, H, W)."""
    if isinstance(image, Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
    elif isinstance(image, (list, tuple)):
        x = torch.cat([image_batch(im) for im in image])
    else:
        x = pil_to_tensor(image)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image must be RGB with shape (B, 3, H, W) or (3, H, W); got {tuple(x.shape)}")
    return x.float()


def mask_batch(mask) -> Tensor:
    """A PIL mask (white = repaint), a list of them, or a tensor (H, W) / (1, H, W) / (B, 1, H, W) in [0, 1]
    -> binary float (B, 1, H, W): 1 where the image is repainted, 0 where it is kept."""
    if isinstance(mask, Tensor):
        m = mask
        while m.ndim < 4:
            m = m.unsqueeze(0)
    elif isinstance(mask, (list, tuple)):
        m = torch.cat([mask_batch(x) for x in mask])
    else:
        m = pil_to_mask(mask)
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"mask must have one channel, shape (B, 1, H, W) or (H, W); got {tuple(m.shape)}")
    return (m.float() >= 0.5).float()


def pil_to_tensor(img) -> Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1]."""
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)


def pil_to_mask(img) -> Tensor:
    """PIL mask (any mode; white = repaint) -> (1, 1, H, W) in [0, 1]."""
    import numpy as np

    arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None, None]


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_pil(images: Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


def make_grid(images: Tensor, ncols: int | None = None) -> Tensor:
    """(B, 3, H, W) -> one (1, 3, rows*H, cols*W) image; empty cells are black (-1). Default: a near-square grid."""
    B, C, H, W = images.shape
    ncols = ncols or math.ceil(math.sqrt(B))
    nrows = math.ceil(B / ncols)
    grid = images.new_full((C, nrows * H, ncols * W), -1.0)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    return grid.unsqueeze(0)


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """Pixel mask (B, 1, H, W) -> latent-grid mask (B, 1, H/f, W/f) for the per-step blend.

    A latent cell is repainted if any pixel of its f x f patch is: the regenerated region covers the whole mask,
    and the pixel composite afterwards puts the kept pixels of partly-masked cells back.
    """
    return F.max_pool2d(mask, factor) if factor > 1 else mask


def composite_weight(mask: Tensor, feather: int = 0) -> Tensor:
    """Weight of the generated pixels in the final composite (seed, Inpainting step 9).

    feather = 0: the binary mask. feather > 0: the edge is softened *inside* the mask over about ``feather``
    pixels (w = clamp(2 blur(mask) - 1, 0, 1)), so every pixel outside the mask stays exactly the original.
    """
    if feather <= 0:
        return mask
    sigma = feather / 2
    radius = int(math.ceil(3 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (k / sigma) ** 2)
    k = (k / k.sum()).to(mask)
    padded = F.pad(mask, (radius,) * 4, mode="replicate")
    blur = F.conv2d(F.conv2d(padded, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))  # separable Gaussian
    w = (2 * blur - 1).clamp(0, 1) * mask
    return torch.where(w > 1 - 1e-4, torch.ones_like(w), w)  # the interior is exactly the generated image


def expand_batch(x: Tensor, batch: int, what: str) -> Tensor:
    """A batch of 1 is repeated to ``batch``; otherwise the sizes must match."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{what} has batch {x.shape[0]}, but {batch} images are generated; give 1 or {batch}")


def check_same_size(image: Tensor, mask: Tensor) -> None:
    if image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mask size {tuple(mask.shape[-2:])} (H, W) differs from image size "
                         f"{tuple(image.shape[-2:])}; give a mask of the image's size")


def labelled_grid(images: list, labels: list[str] | None = None, ncol: int | None = None, scale: int = 1,
                  pad: int = 2, line_px: int = 11):
    """Tile images (enlarged ``scale`` times) into a grid, each with its label word-wrapped underneath (the
    default bitmap font is ~6 px per character; a newline in a label starts a new line). Images of several sizes
    (aspect-ratio buckets) each sit at the top left of a cell of the largest width and height."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("labelled_grid needs at least one image")
    images = [im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST) for im in images] if scale > 1 else images
    w, h = max(im.size[0] for im in images), max(im.size[1] for im in images)
    ncol = ncol or math.ceil(math.sqrt(len(images)))
    nrow = math.ceil(len(images) / ncol)
    wrapped = [_wrap(t, w) for t in labels] if labels else None
    lh = line_px * max(len(lines) for lines in wrapped) if wrapped else 0
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + lh + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + lh + pad)
        grid.paste(img, (x, y))
        for k, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + h + k * line_px), line, fill=(0, 0, 0))
    return grid


def _wrap(text: str, width: int, char_px: int = 6) -> list[str]:
    """Greedy word wrap to lines of at most width // char_px characters (long words are cut); a newline in the
    text starts a new line."""
    n = max(width // char_px, 4)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        start = len(lines)
        for word in paragraph.split():
            if len(lines) > start and len(lines[-1]) + 1 + len(word) <= n:
                lines[-1] += " " + word
            else:
                lines.append(word[:n])
    return lines or [""]
