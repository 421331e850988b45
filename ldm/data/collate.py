"""Batch samples `{"image", "caption", ...}` into `{"image": (B,3,H,W), "caption": list[str], ...}`."""

from __future__ import annotations

from typing import Any

import torch


TENSOR_FIELDS = ("image", "latents", "context", "conditioning_image")  # pixels, or cached VAE latents and text
# contexts; a ControlNet pair's control image
# SDXL's micro-conditioning, each (B, 2) long: (height, width), (top, left), (height, width); with buckets
RECORD_FIELDS = ("original_size", "crop_top_left", "target_size")


def collate_image_caption(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images (or cached latents/contexts), keep captions as a list; "index" becomes a tensor, "key" a
    list."""
    if not samples:
        raise ValueError("collate_image_caption: got an empty list of samples")
    batch: dict[str, Any] = {"caption": [s["caption"] for s in samples]}
    for field in TENSOR_FIELDS:
        if field not in samples[0]:
            continue
        sizes = {tuple(s[field].shape) for s in samples}
        if len(sizes) > 1:
            raise ValueError(
                f"collate_image_caption: {field} have different shapes {sorted(sizes)}; "
                "set one `resolution` for the dataset so every image is cropped to the same size, or enable "
                "data.train.buckets (batches of one bucket each)"
            )
        batch[field] = torch.stack([s[field] for s in samples])
    for field in RECORD_FIELDS:
        if all(field in s for s in samples):
            batch[field] = torch.as_tensor([tuple(s[field]) for s in samples], dtype=torch.long)
    if all("index" in s for s in samples):
        batch["index"] = torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.long)
    if all("key" in s for s in samples):
        batch["key"] = [s["key"] for s in samples]
    return batch
