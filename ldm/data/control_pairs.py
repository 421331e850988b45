"""ControlNet training data: image, conditioning image and caption per sample (diffusers' train_controlnet.py
convention: the ``image``, ``conditioning_image`` and ``text`` columns of a Hugging Face dataset, or a folder of
images with captions beside a folder of conditioning images under the same relative names).

Each item is the inner dataset's ``{"image" (3, R, R) in [-1, 1], "caption", "index", ...}`` plus
``"conditioning_image"`` (C, R, R) in [0, 1] (diffusers: Resize, CenterCrop, ToTensor, not normalised), through the
same resize and centre crop as its image; flips and random crops are refused (the pair would no longer line up).
The latent cache holds the control images beside the latents (uint8 pixels: exact), keyed by both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
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
                 resolution: int = 256, center_crop: bool = True, random_flip: bool = False, **inner: Any):
        if random_flip or not center_crop:
            raise ValueError(f"{KEY}: ControlNet pairs need center_crop=true and random_flip=false (the image and "
                             "its conditioning image must be cut alike)")
        if inner.get("buckets") and dict(inner["buckets"]).get("enabled"):
            raise ValueError(f"{KEY}.buckets: aspect-ratio buckets are not supported for ControlNet pairs yet")
        if conditioning_channels not in (1, 3):
            raise ValueError(f"{KEY}.conditioning_channels must be 1 or 3, got {conditioning_channels}")
        self.mode = "L" if conditioning_channels == 1 else "RGB"
        if (root is None) == (path is None):
            raise ValueError(f"{KEY}: give root=<image folder> (with conditioning_root) or path=<HF dataset>")
        common = dict(resolution=resolution, center_crop=True, random_flip=False, **inner)
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
        self.transform = self.inner.transform  # the same deterministic resize + centre crop

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
        if isinstance(self.inner, ImageFolderDataset):
            key = Path(self.inner.files[i]).with_suffix("").as_posix()
            path = inside(self.conditioning_root, self._by_stem[key].relative_to(self.conditioning_root).as_posix(),
                          source=f"{KEY}.conditioning_root", key="conditioning image")
            return decode_image(str(path))
        from ldm.data.hf_dataset import _to_pil

        return _to_pil(self.inner.table[i][self.column], self.inner.image_roots)

    def __getitem__(self, index: int) -> dict:
        item = self.inner[index]
        pil = self._conditioning_pil(int(item["index"])).convert(self.mode)  # the row the inner dataset returned
        tensor = self.transform(pil.convert("RGB"))  # (3, R, R) in [-1, 1], cut like the image
        tensor = (tensor + 1) / 2
        item["conditioning_image"] = tensor[:1] if self.mode == "L" else tensor
        return item
