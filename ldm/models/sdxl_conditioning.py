"""SDXL's vector conditioning (Podell et al. 2023, "SDXL", sec. 2.2 "micro-conditioning"): the pooled text
embedding followed by sinusoidal embeddings of the image's original size, crop corner and target size.

Reference: SGM ``sgm/modules/encoders/modules.py`` ``ConcatTimestepEmbedderND`` (each scalar through
``timestep_embedding(x, 256)``, concatenated) inside ``GeneralConditioner``, whose "vector" outputs are
concatenated in embedder order (pooled text first); diffusers ``UNet2DConditionModel.get_aug_embed``
(``add_time_proj(time_ids.flatten())``, reshaped to (B, -1), after ``text_embeds``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.models.layers import timestep_embedding

SIZE_EMBED_DIM = 256  # per value (sd_xl_base.yaml: outdim 256)
NUM_SIZE_VALUES = 6  # original (h, w), crop (top, left), target (h, w)


def size_values(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """(B, 2) x 3 -> (B, 6) in SGM's embedder order: original_size_as_tuple, crop_coords_top_left, target_size_as_tuple
    (diffusers' ``add_time_ids`` = original_size + crops_coords_top_left + target_size)."""
    parts = [torch.as_tensor(v, dtype=torch.float32).reshape(-1, 2) for v in (original_size, crop_top_left, target_size)]
    batch = {p.shape[0] for p in parts}
    if len(batch) != 1:
        raise ValueError(f"original_size, crop_top_left and target_size have different batch sizes {sorted(batch)}")
    return torch.cat(parts, dim=1)


def size_embedding(values: Tensor, dim: int = SIZE_EMBED_DIM) -> Tensor:
    """(B, 6) micro-conditioning values -> (B, 6 * dim): each value's sinusoidal embedding, cos half first
    (SGM timestep_embedding / diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0))."""
    if values.ndim != 2:
        raise ValueError(f"size values must be (B, {NUM_SIZE_VALUES}), got shape {tuple(values.shape)}")
    B, n = values.shape
    return timestep_embedding(values.reshape(-1), dim).reshape(B, n * dim)


def sdxl_vector(pooled: Tensor, values: Tensor, dim: int = SIZE_EMBED_DIM) -> Tensor:
    """The U-Net's y: [pooled text embedding (B, P), size embedding (B, 6 * dim)] -> (B, P + 6 * dim)."""
    emb = size_embedding(values.to(pooled.device), dim).to(pooled.dtype)
    if emb.shape[0] != pooled.shape[0]:
        raise ValueError(f"{pooled.shape[0]} pooled embeddings for {emb.shape[0]} rows of size values")
    return torch.cat([pooled, emb], dim=1)


def default_size_values(batch: int, height: int, width: int) -> Tensor:
    """(B, 6) micro-conditioning of an uncropped image generated at its own size: original = target = (h, w),
    crop (0, 0) (diffusers StableDiffusionXLPipeline defaults; SGM sampling defaults)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1).clone()


def unet_conditioning(text: dict[str, Tensor], values: Tensor) -> dict[str, Tensor]:
    """The dual text encoder's {"crossattn", "pooled"} + (B, 6) size values -> the U-Net's
    {"crossattn", "vector"} (SGM GeneralConditioner output)."""
    return {"crossattn": text["crossattn"], "vector": sdxl_vector(text["pooled"], values)}
