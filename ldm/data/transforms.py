"""Image preprocessing: any PIL image -> RGB float tensor (3, R, R) in [-1, 1].

Only PIL, numpy and torch are used (torchvision is not a dependency).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data
from PIL import Image

_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale down to 8-bit 'L'."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 1.0 if array.size and array.max() <= 1.0 else 1.0 / 255.0
        array = array * 255.0 * scale
    elif image.mode.startswith("I;16") or (array.size and array.max() > 255):
        array = array / 257.0
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) scaled to [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> RGB PIL image."""
    array = ((tensor.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round()
    return Image.fromarray(array.to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")


@dataclass(frozen=True)
class Cut:
    """One draw of an `ImageTransform`: resize to ``resized`` (width, height), crop ``box`` (left, top, right,
    bottom), flip horizontally or not. Applied alike to an image and a companion image of the same size (a ControlNet
    pair's control image), it cuts both the same way, so they line up pixel for pixel."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool = False

    def __call__(self, image: Image.Image) -> Image.Image:
        if tuple(self.resized) != image.size:
            image = image.resize(tuple(self.resized), resample=Image.Resampling.BICUBIC)
        if tuple(self.box) != (0, 0, *self.resized):
            image = image.crop(tuple(self.box))
        if self.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def record(self, original: tuple[int, int]) -> dict:
        """SDXL's micro-conditioning of the cut of an upright image of ``original`` (width, height), each
        (height, width) / (top, left) as diffusers' SDXL trainer writes it: ``original_size``, ``crop_top_left``
        the crop's offset in the resized image (after a flip: measured from the mirrored left edge, as kohya's
        train_util does), ``target_size`` the crop's size."""
        left, top, right, bottom = self.box
        if self.flip:
            left = self.resized[0] - right
        return {"original_size": (original[1], original[0]), "crop_top_left": (top, left),
                "target_size": (bottom - top, right - left)}


def at_size(companion: Image.Image, size: tuple[int, int], what: str = "the conditioning image") -> Image.Image:
    """``companion`` (an image that belongs to another, e.g. a ControlNet control image) at that image's ``size``
    (width, height), resized (bicubic) when it has another resolution, so that one `Cut` cuts both alike. One of
    another aspect ratio (beyond 1 %) cannot line up: a ValueError (kohya's ControlNet dataset asserts equal sizes)."""
    if companion.size == tuple(size):
        return companion
    (cw, ch), (w, h) = companion.size, size
    if abs((cw / ch) / (w / h) - 1) > 0.01:
        raise ValueError(f"{what} is {cw}x{ch}, its image {w}x{h}: another aspect ratio cannot be cut alike "
                         "(give it the image's aspect ratio)")
    return companion.resize((w, h), resample=Image.Resampling.BICUBIC)


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip, scale to [-1, 1].

    Args:
        resolution: output side length in pixels.
        center_crop: crop the centre (True) or a random square (False).
        random_flip: flip horizontally with probability 0.5.
        seed: seed for crop/flip randomness. With a seed, each DataLoader worker
            gets its own stream (seed mixed with the worker id); without one, the
            global `random` module is used, which PyTorch seeds per worker.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int | None = None,
    ):
        if int(resolution) <= 0:
            raise ValueError(f"ImageTransform: resolution must be a positive int, got {resolution!r}")
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.seed = seed
        self._rng: random.Random | None = None
        self._rng_worker: int | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        return pil_to_tensor(self.draw(image.size)(image))

    def draw(self, size: tuple[int, int], bucket: tuple[int, int] | None = None,
             resized: tuple[int, int] | None = None) -> Cut:
        """The cut of an image of ``size`` (width, height): without ``bucket``, resize the shorter side to
        `resolution` and crop a square; with an aspect-ratio bucket's (width, height) (``ldm.data.buckets``), resize
        to ``resized`` (it covers the bucket) and crop the bucket. The crop at the centre or at random, then a flip
        or not (in that order from the random stream)."""
        if bucket is None:
            bucket, resized = (self.resolution, self.resolution), self.cover(size)
        (bw, bh), (rw, rh) = bucket, resized
        left, top = self._offset(rw - bw, rh - bh)
        flip = self.random_flip and self._random().random() < 0.5
        return Cut((int(rw), int(rh)), (left, top, left + bw, top + bh), flip)

    def cover(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size (width, height) whose shorter side is `resolution`, the aspect ratio kept."""
        width, height = size
        scale = self.resolution / min(width, height)
        return max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize so the shorter side equals `resolution` (bicubic, antialiased by PIL)."""
        size = self.cover(image.size)
        if size == image.size:
            return image
        return image.resize(size, resample=Image.Resampling.BICUBIC)

    def crop(self, image: Image.Image) -> Image.Image:
        """Centre or random square crop of side `resolution`."""
        width, height = image.size
        r = self.resolution
        left, top = self._offset(width - r, height - r)
        if (left, top, width, height) == (0, 0, r, r):
            return image
        return image.crop((left, top, left + r, top + r))

    def _offset(self, spare_width: int, spare_height: int) -> tuple[int, int]:
        """The crop's (left, top) in an image ``spare_*`` pixels larger than the crop: centred or at random."""
        if self.center_crop:
            return spare_width // 2, spare_height // 2
        rng = self._random()
        return rng.randint(0, spare_width), rng.randint(0, spare_height)

    def _random(self):
        if self.seed is None:
            return random
        worker = _worker_id()
        if self._rng is None or self._rng_worker != worker:
            self._rng = random.Random(f"{self.seed}-{worker}")
            self._rng_worker = worker
        return self._rng

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, seed={self.seed})"
        )


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return -1 if info is None else info.id
