"""Batch samples `{"image", "caption", ...}` into `{"image": (B,3,H,W), "caption": list[str], ...}`."""

from __future__ import annotations

from typing import Any

import torch


def collate_image_caption(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, keep captions as a list; "index" becomes a tensor, "key" a list."""
    if not samples:
        raise ValueError("collate_image_caption: got an empty list of samples")
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"collate_image_caption: images have different shapes {sorted(sizes)}; "
            "set one `resolution` for the dataset so every image is cropped to the same size"
        )
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }
    if all("index" in s for s in samples):
        batch["index"] = torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.long)
    if all("key" in s for s in samples):
        batch["key"] = [s["key"] for s in samples]
    return batch
