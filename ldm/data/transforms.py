"""Image preprocessing: any PIL image -> RGB float tensor (3, R, R) in [-1, 1].

Only PIL, numpy and torch are used (torchvision is not a dependency).
"""

from __future__ import annotations

import random

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
        image = self.resize(to_rgb(image))
        image = self.crop(image)
        if self.random_flip and self._random().random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(image)

    def to_bucket(self, image: Image.Image, bucket: tuple[int, int], resized: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """An aspect-ratio bucket's crop (``ldm.data.buckets``): resize to ``resized`` (width, height; it covers
        ``bucket``), crop ``bucket`` (width, height) at the centre or at random, maybe flip, scale to [-1, 1].

        Returns the tensor (3, h, w) and SDXL's micro-conditioning record, each (height, width) / (top, left) as
        diffusers' SDXL trainer writes it: ``original_size`` the upright image's size, ``crop_top_left`` the crop's
        offset in the resized image (after a flip: measured from the mirrored left edge, as kohya's
        train_util does), ``target_size`` the bucket's size."""
        image = to_rgb(image)
        original = (image.size[1], image.size[0])
        if tuple(resized) != image.size:
            image = image.resize(tuple(resized), resample=Image.Resampling.BICUBIC)
        (bw, bh), (rw, rh) = bucket, image.size
        if self.center_crop:
            left, top = (rw - bw) // 2, (rh - bh) // 2
        else:
            rng = self._random()
            left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
        if (left, top, bw, bh) != (0, 0, rw, rh):
            image = image.crop((left, top, left + bw, top + bh))
        if self.random_flip and self._random().random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = rw - bw - left
        record = {"original_size": original, "crop_top_left": (top, left), "target_size": (bh, bw)}
        return pil_to_tensor(image), record

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize so the shorter side equals `resolution` (bicubic, antialiased by PIL)."""
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if size == image.size:
            return image
        return image.resize(size, resample=Image.Resampling.BICUBIC)

    def crop(self, image: Image.Image) -> Image.Image:
        """Centre or random square crop of side `resolution`."""
        width, height = image.size
        r = self.resolution
        if self.center_crop:
            left, top = (width - r) // 2, (height - r) // 2
        else:
            rng = self._random()
            left, top = rng.randint(0, width - r), rng.randint(0, height - r)
        if (left, top, width, height) == (0, 0, r, r):
            return image
        return image.crop((left, top, left + r, top + r))

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
