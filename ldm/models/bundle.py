"""A complete latent diffusion model: the three networks and the noise schedule they were trained with.

Every loader (training checkpoint, our export, SD single file, diffusers folder) returns one of these; pipelines,
sample.py, export and evaluation take one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.diffusion.schedules import NoiseSchedule


@dataclass
class ModelBundle:
    unet: nn.Module  # UNet: (x, t, context) -> eps / v
    autoencoder: nn.Module  # AutoencoderKL or IdentityAutoencoder: encode_latents / decode_latents
    text_encoder: nn.Module  # CLIPTextEncoder: list[str] -> (B, 77 * chunks, D), .empty_context(B)
    schedule: NoiseSchedule
    source: str = ""  # where it was loaded from (for messages and PNG metadata)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the training config, global step

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelBundle":
        """Move / cast the networks; with meta["vae_fp32"] (SDXL's VAE, which overflows in float16: diffusers
        ``force_upcast``) the autoencoder stays float32 whatever ``dtype`` is."""
        for m in (self.unet, self.autoencoder, self.text_encoder):
            m_dtype = torch.float32 if (m is self.autoencoder and self.meta.get("vae_fp32")) else dtype
            m.to(device=device, dtype=m_dtype) if m_dtype is not None else m.to(device)
        return self

    def eval(self) -> "ModelBundle":
        for m in (self.unet, self.autoencoder, self.text_encoder):
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)
