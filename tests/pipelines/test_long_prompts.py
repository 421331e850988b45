"""encode_prompts with long prompts (max_chunks > 1): the prompt and the negative prompt, whichever is longer, are
padded to the same number of 77-token chunks with the empty prompt's chunk, so both CFG branches run in one batch."""

import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule
from ldm.formats.bundle import ModelBundle
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
