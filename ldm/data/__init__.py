"""Data layer: image/caption sources, transforms, collate and the LightningDataModule.

Every source yields `{"image": FloatTensor (3, H, W) in [-1, 1], "caption": str}`
(plus optional "key"/"index"); `collate_image_caption` batches them.
Names are imported lazily so that `import ldm.data` does not pull in `datasets`. The synthetic shapes are a task
(ldm/tasks/shapes/), not part of the library.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageTransform": "ldm.data.transforms",
    "collate_image_caption": "ldm.data.collate",
    "ImageFolderDataset": "ldm.data.image_folder",
    "HFDataset": "ldm.data.hf_dataset",
    "WebDatasetSource": "ldm.data.webdataset",
    "ImageCaptionDataModule": "ldm.data.datamodule",
    "CachedLatentsDataset": "ldm.data.cached_latents",
    "ResumableSampler": "ldm.data.resumable_sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
