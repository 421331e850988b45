"""Masked loss: a per-image mask in [0, 1] weights the per-element loss in latent space, so only the masked part of
an image is learned (white: learned, black: ignored, grey: in between).

Follows kohya-ss/sd-scripts library/custom_train_functions.py ``apply_masked_loss``: the mask (B, 1, H, W) at pixel
resolution is resized to the loss's spatial size with ``mode="area"`` and multiplies the element-wise loss; the mean
over (C, h, w) that follows is NOT renormalised by the mask's mean (a half-masked image contributes half the loss of
an unmasked one, as in kohya; renormalising would let a tiny mask blow its few latent cells up).

Why area: each latent cell summarises a ``f x f`` block of pixels (f = the VAE's downsampling, 8 for SD, 4 for the
shapes VAE), and area interpolation gives the block's mean mask value, i.e. the fraction of the cell that is
masked. Bilinear (align_corners=False) samples only the pixels near each block's centre, so a thin masked stroke
between two centres would vanish and a mask edge would move by up to half a cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) or (B, H, W) mask in [0, 1] -> (B, 1, h, w) mask at ``size`` (area interpolation)."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"a loss mask must be (B, 1, H, W) or (B, H, W), got {tuple(mask.shape)}")
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def apply_masked_loss(per_element: Tensor, mask: Tensor) -> Tensor:
    """loss (B, C, h, w) x mask resized to (h, w), broadcast over the channels (kohya ``apply_masked_loss``)."""
    if mask.shape[0] != per_element.shape[0]:
        raise ValueError(f"loss mask batch {mask.shape[0]} != loss batch {per_element.shape[0]}")
    return per_element * latent_mask(mask, per_element.shape[-2:]).to(per_element)
