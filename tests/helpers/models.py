"""Tiny random networks and the fixtures that build them (pytest finds a fixture a test module imports)."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet

# An SDXL-shaped U-Net small enough for a CPU test: three levels, transformer depth [0, 1, 2], linear projections,
# the dual encoders' 80-d context and the 6 micro-conditioning values on top of the pooled text.
TINY_XL = dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_levels=[1, 2],
               transformer_depth=[0, 1, 2], num_heads=-1, num_head_channels=64, use_linear_projection=True,
               context_dim=80, adm_in_channels=16 + 6 * 256)


def randomize(module, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def tiny_bundle(clip_folder, seed=1, **unet_overrides):
    """Tiny U-Net (f=2) + tiny KL VAE (f=2): 16x16 images, 8x8 latents, 4x4 at the U-Net bottom."""
    unet = randomize(UNet.from_preset("tiny", **unet_overrides), seed)
    vae = randomize(AutoencoderKL.from_preset("tiny"), seed + 1)
    te = CLIPTextEncoder.from_pretrained(clip_folder)
    return ModelBundle(unet, vae, te, NoiseSchedule.make("scaled_linear"), source="tiny").eval()


@pytest.fixture(scope="module")
def bundle(clip_folder):
    return tiny_bundle(clip_folder)


def tiny_sdxl_bundle(clips):
    """TINY_XL + a tiny KL VAE + the dual encoders of ``write_tiny_sdxl_clips(clips)``."""
    return ModelBundle(randomize(UNet(**TINY_XL), 1), randomize(AutoencoderKL.from_preset("tiny"), 2),
                       DualCLIPTextEncoder.from_pretrained(clips), NoiseSchedule.make("scaled_linear"))


def perturbed(bundle):
    """The bundle with every weight of its denoiser, VAE and text encoder moved (seeded): an export must write these,
    not copy the folder it came from."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in (bundle.unet, bundle.autoencoder, bundle.text_encoder):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return bundle
