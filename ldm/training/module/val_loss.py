"""The deterministic validation loss of a loaded model, computed by the training module's own
``LatentDiffusion.validation_loss`` (fixed timesteps, noise seeded by the batch index, posterior-mean latents)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.bundle import ModelBundle


def _to(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in batch.items()}


@torch.no_grad()
def validation_loss(bundle: ModelBundle, items: Dataset, batch_size: int) -> float:
    """Mean of ``val/loss`` over ``items`` (a dataset, e.g. the evaluation set) in batches of ``batch_size``,
    weighted by batch size as Lightning averages it: with the data's validation batch size it is the number training logged for the same
    weights and items. The same weights always give the same value."""
    from ldm.data.collate import collate_image_caption
    from ldm.training.module.diffusion_module import LatentDiffusion

    if not len(items):
        raise ValueError("validation_loss: no items")
    module = LatentDiffusion(bundle.unet, bundle.autoencoder, bundle.text_encoder, bundle.schedule,
                             optimizer=None, ema_decay=None)
    param = next(bundle.unet.parameters())
    total, count = 0.0, 0
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate_image_caption)
    for batch_idx, batch in enumerate(loader):
        n = len(batch["caption"])
        total += float(module.validation_loss(_to(batch, param.device, param.dtype), batch_idx)) * n
        count += n
    return total / count
