"""encode_prompts with long prompts (max_chunks > 1): the prompt and the negative prompt, whichever is longer, are
padded to the same number of 77-token chunks with the empty prompt's chunk, so both CFG branches run in one batch."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.models.bundle import ModelBundle
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import CLIPTextEncoder
from ldm.models.tiny_clip import write_tiny_clip
from ldm.models.unet import UNet
from ldm.pipelines.common import encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = " ".join(["a red circle on a white background"] * 15)  # 105 tokens: 2 chunks
SHORT = "a blue square"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    clip = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    te = CLIPTextEncoder.from_pretrained(clip, max_chunks=3)
    return ModelBundle(UNet.from_preset("tiny"), AutoencoderKL.from_preset("tiny"), te,
                       NoiseSchedule.make("scaled_linear"))


@pytest.mark.parametrize("prompt, negative", [(LONG, SHORT), (SHORT, LONG), (LONG, None), (SHORT, [LONG])])
def test_prompt_and_negative_prompt_get_the_same_chunks(bundle, prompt, negative):
    te = bundle.text_encoder
    cond = encode_prompts(bundle, [prompt], negative, num_images_per_prompt=2, guidance_scale=5.0)
    assert cond.context.shape == (2, 154, 32) and cond.uncond_context.shape[1:] == (154, 32)
    torch.testing.assert_close(cond.context[1], te.pad_context(te([prompt]), 154)[0])
    negative_text = "" if negative is None else negative if isinstance(negative, str) else negative[0]
    torch.testing.assert_close(cond.uncond_context[0], te.pad_context(te([negative_text]), 154)[0])
    if SHORT in (prompt, negative_text):  # the short one's second chunk is the empty prompt's
        short_ctx = cond.context if prompt == SHORT else cond.uncond_context
        torch.testing.assert_close(short_ctx[0, 77:], te.empty_context(1)[0])


def test_without_guidance_nothing_is_padded(bundle):
    cond = encode_prompts(bundle, [SHORT], LONG, num_images_per_prompt=1, guidance_scale=1.0)
    assert cond.uncond_context is None and cond.context.shape == (1, 77, 32)


def test_sdxl_long_prompt_zero_uncond_and_negative_padding(tmp_path):
    """SDXL's dual encoder: the zero unconditional text is as long as the prompt; a shorter negative prompt (or
    prompt) is padded with the empty prompt's chunks; pooled and size vector stay per image."""
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
    from ldm.models.tiny_clip import write_tiny_sdxl_clips

    te = DualCLIPTextEncoder.from_pretrained(write_tiny_sdxl_clips(tmp_path / "clips"), max_chunks=3)
    unet = UNet(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                context_dim=te.context_dim, adm_in_channels=te.pooled_dim + 6 * 256)
    bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, NoiseSchedule.make("scaled_linear"))
    cond = encode_prompts(bundle, [LONG], None, num_images_per_prompt=2, guidance_scale=5.0, size=(16, 16))
    assert cond.context["crossattn"].shape == (2, 154, 80) and cond.uncond_context["crossattn"].shape == (1, 154, 80)
    assert not cond.uncond_context["crossattn"].any()
    cond = encode_prompts(bundle, [SHORT], LONG, num_images_per_prompt=1, guidance_scale=5.0, size=(16, 16))
    torch.testing.assert_close(cond.context["crossattn"], te([SHORT, LONG])["crossattn"][:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.uncond_context["crossattn"], te([LONG])["crossattn"], atol=1e-6, rtol=0)
    assert cond.context["vector"].shape == (1, unet.config["adm_in_channels"])
