"""Builders that Hydra configs point at: the frozen autoencoder (from a preset, a weights file or the shipped
asset), and the whole model bundle with pretrained Stable Diffusion weights and consistency checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.models.bundle import ModelBundle
from ldm.formats.training_checkpoint import load_weights_into
from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.assets import resolve_weights
from ldm.formats.autoencoder_file import load_autoencoder
from ldm.models.autoencoder import AutoencoderKL, IdentityAutoencoder

@torch.no_grad()
@torch.no_grad()  # 16 batches of the VAE's activations were kept for a backward that never came
def calibrate_scaling_factor(ae: AutoencoderKL, loader, batches: int = 16) -> float:
    """Set the latent scaling factor to 1 / std of posterior samples, so the diffusion model sees unit-variance
    latents (Rombach et al. 2022, sec. 4.3 and appendix G: SD's 0.18215 was found this way)."""
    was_training = ae.training
    ae.eval()
    samples = []
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        samples.append(ae.encode(batch["image"].to(next(ae.parameters()).device)).sample().flatten().float())
    ae.train(was_training)
    factor = float(1.0 / torch.cat(samples).std())
    ae.scaling_factor = factor
    ae.config["scaling_factor"] = factor
    return factor


def autoencoder(preset: str | None = "sd", weights: str | None = None, pixel_space: bool = False,
                **overrides: Any) -> nn.Module:
    """The first stage. ``pixel_space`` gives the identity (plain DDPM); ``weights`` loads our safetensors file
    (its stored config wins over the preset) or ``builtin:<name>``; otherwise a fresh preset (to train, or to be
    filled by ``pretrained`` weights)."""
    if pixel_space:
        return IdentityAutoencoder(**overrides)
    if weights is None:
        return AutoencoderKL.from_preset(preset, **overrides)
    return load_autoencoder(resolve_weights(weights), preset, **overrides)


def check_compatible(unet: nn.Module, ae: nn.Module, text_encoder: nn.Module) -> None:
    """Stop before training when the three networks cannot work together, naming the config keys to fix."""
    cfg = unet.config
    latent = int(ae.latent_channels)
    if cfg["in_channels"] not in (latent, 2 * latent + 1):
        raise ValueError(f"model.unet.in_channels={cfg['in_channels']} does not match the autoencoder's "
                         f"latent_channels={latent} (model.autoencoder): set model.unet.in_channels={latent}")
    if cfg["out_channels"] != latent:
        raise ValueError(f"model.unet.out_channels={cfg['out_channels']} must equal the autoencoder's "
                         f"latent_channels={latent}")
    ctx = int(text_encoder.context_dim)
    key = "context_dim" if "context_dim" in cfg else "joint_attention_dim"  # U-Net / MMDiT
    if cfg[key] != ctx:
        raise ValueError(f"model.unet.{key}={cfg[key]} does not match the text encoder's hidden size "
                         f"{ctx} (model.text_encoder): set model.unet.{key}={ctx}")
    if "pooled_projection_dim" in cfg:  # MMDiT: the pooled text is its own input, no size embeddings
        pooled = getattr(text_encoder, "pooled_dim", None)
        if cfg["pooled_projection_dim"] != pooled:
            raise ValueError(f"model.unet.pooled_projection_dim={cfg['pooled_projection_dim']} does not match the "
                             f"text encoder's pooled size {pooled} (model.text_encoder: SD3's CLIP-L + CLIP-G, "
                             f"SD3TextEncoder): set model.unet.pooled_projection_dim={pooled}")
        return
    check_vector_conditioning(cfg, text_encoder)


def check_vector_conditioning(cfg: dict, text_encoder: nn.Module) -> None:
    """SDXL: the U-Net's adm_in_channels = the dual encoder's pooled size + 6 x 256 size embeddings."""
    from ldm.models.sdxl_conditioning import NUM_SIZE_VALUES, SIZE_EMBED_DIM

    adm, pooled = cfg.get("adm_in_channels"), text_encoder.pooled_dim
    if adm is None and pooled is None:
        return
    if adm is None or pooled is None:
        raise ValueError(f"model.unet.adm_in_channels={adm} and model.text_encoder "
                         f"({type(text_encoder).__name__}) disagree: SDXL's vector conditioning needs both a U-Net "
                         "with adm_in_channels and the dual text encoder (DualCLIPTextEncoder)")
    want = int(pooled) + NUM_SIZE_VALUES * SIZE_EMBED_DIM
    if adm != want:
        raise ValueError(f"model.unet.adm_in_channels={adm} does not match the text encoder's pooled size {pooled} + "
                         f"{NUM_SIZE_VALUES} x {SIZE_EMBED_DIM}: set model.unet.adm_in_channels={want}")


def build_bundle(unet: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, schedule: NoiseSchedule,
                 pretrained: str | None = None, use_ema_weights: bool = False) -> ModelBundle:
    """Compose the model; with ``pretrained`` (an SD single file or a diffusers folder / hub id) load all three
    networks' weights strictly into the configured architectures, before anything trains."""
    check_compatible(unet, autoencoder, text_encoder)
    source = "config"
    if pretrained:
        source = str(pretrained)
        local = Path(pretrained).expanduser()
        try:
            load_weights_into(local if local.exists() else pretrained, unet, autoencoder, text_encoder,
                              use_ema=use_ema_weights)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"model.pretrained: {err}") from err
    return ModelBundle(unet, autoencoder, text_encoder, schedule, source=source)


