"""What the LoRA file tests share: a tiny SD bundle (random U-Net and VAE, the tiny local CLIP), the same model as a
diffusers folder, and running either with an adapter applied (ours: the network's hooks; diffusers:
load_lora_weights)."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.bundle import ModelBundle
from ldm.models.lora import LoRAConfig, LoRANetwork
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from tests.helpers.models import randomize


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    clip = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    unet = randomize(UNet.from_preset("tiny"), 1)
    vae = randomize(AutoencoderKL.from_preset("tiny"), 2)
    return ModelBundle(unet, vae, CLIPTextEncoder.from_pretrained(clip), NoiseSchedule.make("scaled_linear")).eval()


@pytest.fixture(scope="module")
def pipe(bundle, tmp_path_factory):
    from ldm.formats.diffusers_folder import write_diffusers

    folder = tmp_path_factory.mktemp("pipe")
    write_diffusers(bundle, folder, resolution=16)
    return folder


def roots(bundle):
    return {"unet": bundle.unet, "text_encoder": bundle.text_encoder}


def trained(bundle, seed=3, scale=0.3, **cfg) -> LoRANetwork:
    """A network of LoRAConfig(**cfg) as after training: every parameter random (a fresh LoRA's zero B would add
    nothing; DoRA's magnitude moved off the base's norms)."""
    torch.manual_seed(seed)
    net = LoRANetwork.build(roots(bundle), LoRAConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("magnitude"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700]), torch.randn(2, 7, 32, generator=g)


def ours_with(bundle, net, x, t, c, ids=None):
    net.attach(roots(bundle))
    try:
        with torch.no_grad():
            out = bundle.unet(x, t, c)
            ctx = bundle.text_encoder.encode_ids(ids) if ids is not None else None
    finally:
        net.detach()
    return out, ctx


def diffusers_with(folder, lora_dir_or_file, x, t, c, ids=None, weight_name=None):
    import diffusers

    p = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    p.load_lora_weights(str(lora_dir_or_file), **kwargs)
    with torch.no_grad():
        out = p.unet(x, t, encoder_hidden_states=c).sample
        ctx = p.text_encoder(ids).last_hidden_state if ids is not None else None
    return out, ctx
