"""ControlNet training data: image, conditioning image and caption per sample (diffusers' train_controlnet.py
convention: the ``image``, ``conditioning_image`` and ``text`` columns of a Hugging Face dataset, or a folder of
images with captions beside a folder of conditioning images under the same relative names).

Each item is the inner dataset's ``{"image" (3, h, w) in [-1, 1], "caption", "index", ...}`` plus
``"conditioning_image"`` (C, h, w) in [0, 1] (diffusers: ToTensor, not normalised). The conditioning image is first
brought to its image's size (resized when it has another resolution; another aspect ratio is an unreadable pair,
skipped like a bad image), then cut with the very same resize, crop and flip as its image (one `Cut` drawn per
item: ``ldm.data.transforms``), so the two line up pixel for pixel under a square crop or an aspect-ratio bucket
(``data.train.buckets``, kohya's ControlNet dataset), centred or random (``center_crop``), flipped or not
(``random_flip``). The latent cache holds the control images beside the latents (uint8 pixels: exact) at the item's
bucket size, keyed by both files; with random flips both variants of the pair, mirrored together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ldm.data.bad_samples import decode_image
from ldm.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from ldm.formats.safe_paths import inside

KEY = "data.train"


class ControlPairsDataset(Dataset):
    """``ControlPairsDataset(root=<images>, conditioning_root=<control images>)`` (a folder), or
    ``ControlPairsDataset(path=<HF dataset>, conditioning_image_column="conditioning_image")``; the other keywords
    go to ImageFolderDataset / HFDataset. conditioning_channels: 3 (RGB) or 1 (grey)."""

    def __init__(self, root: str | None = None, conditioning_root: str | None = None, path: str | None = None,
                 conditioning_image_column: str = "conditioning_image", conditioning_channels: int = 3,
                 resolution: int = 256, **inner: Any):
        if conditioning_channels not in (1, 3):
            raise ValueError(f"{KEY}.conditioning_channels must be 1 or 3, got {conditioning_channels}")
        self.mode = "L" if conditioning_channels == 1 else "RGB"
        if (root is None) == (path is None):
            raise ValueError(f"{KEY}: give root=<image folder> (with conditioning_root) or path=<HF dataset>")
        common = dict(resolution=resolution, **inner)  # center_crop, random_flip, buckets, ...: cut alike
        if root is not None:
            if conditioning_root is None:
                raise ValueError(f"{KEY}.conditioning_root: the folder of conditioning images (named like the images "
                                 f"under {root}) is needed")
            self.inner = ImageFolderDataset(root, **common)
            self.conditioning_root = Path(conditioning_root).expanduser()
            if not self.conditioning_root.is_dir():
                raise FileNotFoundError(f"{KEY}.conditioning_root: folder not found: {self.conditioning_root}")
            self._by_stem = {p.relative_to(self.conditioning_root).with_suffix("").as_posix(): p
                             for p in sorted(self.conditioning_root.rglob("*"))
                             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
            missing = [k for k in self.inner.files if Path(k).with_suffix("").as_posix() not in self._by_stem]
            if missing:
                raise FileNotFoundError(f"{KEY}.conditioning_root: no conditioning image for {len(missing)} image(s), "
                                        f"e.g. {missing[0]} (looked for {self.conditioning_root}/<same name>.<png|jpg|...>)")
        else:
            from ldm.data.hf_dataset import HFDataset

            self.inner = HFDataset(path, **common)
            if conditioning_image_column not in self.inner.table.column_names:
                raise ValueError(f"{KEY}.conditioning_image_column: {conditioning_image_column!r} is not a column of "
                                 f"{path} ({', '.join(self.inner.table.column_names)})")
        self.column = conditioning_image_column
        self.inner.companion = self._conditioning_pil  # each image's control image, cut with the image's own cut

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    @property
    def resolution(self) -> int:
        return self.inner.resolution

    @property
    def captions(self) -> list[str]:
        return list(self.inner.captions)

    @property
    def bucket_assignment(self):
        """The images' aspect-ratio buckets (the batches' sampler groups the pairs by them); None without."""
        return self.inner.bucket_assignment

    def cache_spec(self):
        """The inner dataset's cache spec, with the conditioning images in its settings and item identities, and a
        source whose items carry them (the cache stores them beside the latents)."""
        import copy
        import dataclasses
        import json

        from ldm.data.auto_cache import place_digest

        spec = self.inner.cache_spec()
        folder = isinstance(self.inner, ImageFolderDataset)
        settings = {**spec.settings, "kind": "ControlPairs", "conditioning_mode": self.mode,
                    "conditioning": place_digest(self.conditioning_root) if folder else self.column}
        items = spec.items
        if folder:  # a changed control image is a changed item
            stats = [self._by_stem[Path(k).with_suffix("").as_posix()].stat() for k in self.inner.files]
            items = [json.dumps([item, s.st_size, s.st_mtime_ns]) for item, s in zip(items, stats)]
        source = copy.copy(self)
        source.inner = spec.source
        return dataclasses.replace(spec, settings=settings, items=items, source=source)

    def _conditioning_pil(self, i: int):
        """Item i's control image, in the mode of ``conditioning_channels``."""
        if isinstance(self.inner, ImageFolderDataset):
            key = Path(self.inner.files[i]).with_suffix("").as_posix()
            path = inside(self.conditioning_root, self._by_stem[key].relative_to(self.conditioning_root).as_posix(),
                          source=f"{KEY}.conditioning_root", key="conditioning image")
            return decode_image(str(path)).convert(self.mode)
        from ldm.data.hf_dataset import _to_pil

        return _to_pil(self.inner.table[i][self.column], self.inner.image_roots).convert(self.mode)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        tensor = (item.pop("companion") + 1) / 2  # (3, h, w) in [0, 1], cut like the image
        item["conditioning_image"] = tensor[:1] if self.mode == "L" else tensor
        return item
