"""SDXL training conditioning from a batch: the dual encoder's text (zeroed where the caption was dropped) and the
micro-conditioning values the data recorded, as the U-Net's {"crossattn", "vector"}.

- Caption dropout: SGM's GeneralConditioner zeroes an embedder's outputs with probability ``ucg_rate``
  (sgm/modules/encoders/modules.py, ``GeneralConditioner.forward``: ``bernoulli(1 - ucg_rate) * emb``), so a
  dropped caption gives a zero context and a zero pooled embedding, the unconditional input SDXL samples with
  (diffusers ``force_zeros_for_empty_prompt``). One draw per sample covers both (SGM draws per output; diffusers'
  and kohya's trainers encode "" instead, which ``zero_uncond=False`` reproduces).
- Size values stay in the unconditional rows (SGM's size embedders have no ucg_rate; diffusers passes the same
  ``add_time_ids`` to both CFG branches).
- ``original_size`` / ``crop_top_left`` / ``target_size`` ((B, 2) each, (h, w) / (top, left) / (h, w)) come from
  the data (aspect-ratio buckets record them); a batch without them is an uncropped image of its own size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ldm.models.sdxl_conditioning import default_size_values, size_values, unet_conditioning

SIZE_KEYS = ("original_size", "crop_top_left", "target_size")


def is_dual_text(context: Any) -> bool:
    return isinstance(context, dict) and "pooled" in context


def batch_size_values(batch: dict[str, Any], n: int, image_size: tuple[int, int]) -> Tensor:
    """(n, 6) micro-conditioning of a batch: its recorded keys, else (image_size, (0, 0), image_size)."""
    present = [k for k in SIZE_KEYS if k in batch]
    if not present:
        return default_size_values(n, *image_size)
    if len(present) != len(SIZE_KEYS):
        missing = sorted(set(SIZE_KEYS) - set(present))
        raise ValueError(f"the batch has {present} but not {missing}: SDXL's micro-conditioning needs all three")
    values = size_values(*(batch[k] for k in SIZE_KEYS))
    if values.shape[0] != n:
        raise ValueError(f"{values.shape[0]} micro-conditioning rows for a batch of {n}")
    return values


def training_conditioning(text: dict[str, Tensor], batch: dict[str, Any], dropped: Tensor,
                          image_size: tuple[int, int], zero_dropped: bool) -> dict[str, Tensor]:
    """{"crossattn", "pooled"} of the (possibly dropped) captions -> the U-Net's {"crossattn", "vector"}."""
    n = text["pooled"].shape[0]
    if zero_dropped and bool(dropped.any()):
        keep = (~dropped.to(text["pooled"].device)).to(text["pooled"].dtype)
        text = {"crossattn": text["crossattn"] * keep[:, None, None], "pooled": text["pooled"] * keep[:, None]}
    values = batch_size_values(batch, n, image_size).to(text["pooled"].device)
    return unet_conditioning(text, values)
