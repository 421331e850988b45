"""SDXL diffusers folders: our writer's folder loads in diffusers' StableDiffusionXLPipeline (text_encoder_2/,
tokenizer_2/, the U-Net's add_embedding, force_upcast VAE) and back in ours, weights unchanged."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.formats.diffusers_folder import write_diffusers
from ldm.formats.load import load_bundle
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.sdxl_conditioning import default_size_values
from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_sdxl_clips
from ldm.models.unet import UNet
from tests.helpers.models import TINY_XL, randomize

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_write_then_read_in_diffusers_and_ours(tmp_path):
    clips = write_tiny_sdxl_clips(tmp_path / "clips")
    bundle = ModelBundle(randomize(UNet(**TINY_XL), 1), randomize(AutoencoderKL.from_preset("sdxl", base_channels=32,
                                                                                      channel_mult=(1, 2),
                                                                                      num_res_blocks=1), 2),
                         DualCLIPTextEncoder.from_pretrained(clips), NoiseSchedule.make("scaled_linear"))
    written = write_diffusers(bundle, tmp_path / "out", resolution=16)
    assert {"text_encoder_2/", "tokenizer_2/", "unet/", "vae/"} <= set(written)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out", local_files_only=True,
                                                               add_watermarker=False)
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    assert pipe.unet.config.addition_embed_type == "text_time"

    prompt = ["a red circle"]
    pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ours = bundle.text_encoder(prompt)
    torch.testing.assert_close(ours["crossattn"], pe, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pooled"], pooled, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sizes = default_size_values(1, 16, 16)
    with torch.no_grad():
        from ldm.models.sdxl_conditioning import unet_conditioning

        mine = bundle.unet(x, 400, unet_conditioning(ours, sizes))
        ref = pipe.unet(x, 400, encoder_hidden_states=pe,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)

    back = load_bundle(tmp_path / "out", device="cpu", dtype="float32")
    for a, b in [(bundle.unet, back.unet), (bundle.autoencoder, back.autoencoder),
                 (bundle.text_encoder.model_2, back.text_encoder.model_2)]:
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

