"""Each of our networks follows the protocol the rest of ldm relies on (ldm.models.protocols): the members are
there, on the object, with the meaning the protocol states (no getattr fallbacks anywhere else)."""

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL, IdentityAutoencoder
from ldm.models.protocols import Autoencoder, Denoiser, TextEncoder
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.unet import UNet


def members(protocol) -> set[str]:
    return {n for n in protocol.__annotations__} | {n for n in vars(protocol) if not n.startswith("_")}


def follows(obj, protocol) -> list[str]:
    return sorted(m for m in members(protocol) if not hasattr(obj, m))


@pytest.mark.parametrize("make", [lambda: AutoencoderKL.from_preset("tiny"), lambda: IdentityAutoencoder()],
                         ids=["kl", "identity"])
def test_autoencoders(make):
    ae = make()
    assert isinstance(ae, Autoencoder) and not follows(ae, Autoencoder)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = ae.encode_latents(x, sample=False)
    assert z.shape == (1, ae.latent_channels, 16 // ae.downsample_factor, 16 // ae.downsample_factor)
    assert ae.decode_latents(z).shape == x.shape


def test_unet():
    unet = UNet.from_preset("tiny")
    assert isinstance(unet, Denoiser) and not follows(unet, Denoiser)
    f = unet.downsample_factor
    x = torch.randn(1, unet.in_channels, 2 * f, 2 * f)
    assert unet(x, torch.tensor([1]), torch.randn(1, 77, unet.config["context_dim"])).shape == x.shape


@pytest.mark.parametrize("make", [CLIPTextEncoder.from_tiny, DualCLIPTextEncoder.from_tiny], ids=["clip", "dual"])
def test_text_encoders(make):
    te = make()
    assert isinstance(te, TextEncoder) and not follows(te, TextEncoder)
    context = te(["a red square"])
    empty = te.empty_context(1)
    if te.pooled_dim is None:  # one context: cacheable, "" as the unconditional input
        assert te.context_cacheable and not te.zero_uncond
        assert context.shape[-1] == te.context_dim and empty.shape == context.shape
    else:  # SDXL's {crossattn, pooled}: encoded live
        assert not te.context_cacheable and context["pooled"].shape[-1] == te.pooled_dim
        assert context["crossattn"].shape[-1] == te.context_dim
