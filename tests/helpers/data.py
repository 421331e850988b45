"""Stand-ins and tiny images for the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


class CountingEncoder:
    """A stand-in first stage: mean = 2x2 average pool of the image, logvar = -30 (so a draw is the mean)."""

    def __init__(self):
        self.calls, self.images = 0, 0

    def __call__(self, images, captions, generator=None):
        self.calls += 1
        self.images += len(images)
        mean = F.avg_pool2d(images, 2)
        return {"mean": mean, "logvar": torch.full_like(mean, -30.0)}


def make_image(size=(24, 20), color=(200, 30, 40), mode="RGB") -> Image.Image:
    """A small solid image with a black top-left block so crops and flips are visible."""
    image = Image.new("RGB", size, color)
    image.paste((0, 0, 0), (0, 0, size[0] // 3, size[1] // 3))
    return image if mode == "RGB" else image.convert(mode)


def save_image(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(**kwargs).save(path)
    return path


def image_bytes(fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    make_image(**kwargs).save(buffer, format=fmt)
    return buffer.getvalue()


def write_captioned_noise(folder: Path, n: int = 6, size: int = 16) -> Path:
    """n random size x size PNGs, each with a .txt caption ("a red circle" / "a blue square" in turn)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red circle", "a blue square"][i % 2])
    return folder


def write_green_shards(folder: Path, shards: int = 2, per_shard: int = 3, stem: str = "train") -> str:
    """Webdataset tars ``{stem}-000.tar``... of ``per_shard`` 20 px green PNGs captioned "green i"; returns their
    brace URL ``{stem}-{000..NNN}.tar``."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{stem}-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"{s}_{i}", "png": image_bytes(size=(20, 20), color=(0, 40 * i, 0)),
                            "txt": f"green {i}"})
    return str(folder / f"{stem}-{{000..{shards - 1:03d}}}.tar")
