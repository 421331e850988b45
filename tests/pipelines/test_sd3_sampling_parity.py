"""Flow Euler sampling of a tiny SD3-like model (tiny MMDiT + two tiny projected CLIPs, with and without a tiny T5)
through our
text_to_image against diffusers' StableDiffusion3Pipeline on a tiny local folder: the final latents within 1e-5."""

import pytest
import torch

from ldm.diffusion.flow import FlowMatching
from ldm.formats.sd3_diffusers_keys import mmdit_diffusers_config, mmdit_from_diffusers
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.bundle import ModelBundle
from ldm.models.mmdit import MMDiT
from ldm.models.text_encoder_sd3 import SD3TextEncoder, TinySD3TextConfig, write_tiny_sd3_clips
from tests.helpers.sd3 import tiny_t5

diffusers = pytest.importorskip("diffusers")

T5_LENGTH = 8
CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
           joint_attention_dim=96, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
           dual_attention_layers=(0,), qk_norm="rms_norm")


@pytest.mark.parametrize("scale,steps,use_t5", [(4.5, 4, False), (1.0, 3, False), (4.5, 3, True)])
def test_flow_euler_latents_equal_stable_diffusion3_pipeline(tmp_path, scale, steps, use_t5):
    from diffusers import (AutoencoderKL as DiffusersVAE, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.pipelines import text_to_image

    folder = write_tiny_sd3_clips(TinySD3TextConfig(folder=str(tmp_path / "clips")))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**mmdit_diffusers_config(MMDiT(**CFG).config)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    vae = DiffusersVAE(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    t5, t5_tok = tiny_t5() if use_t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), text_encoder_3=t5, tokenizer_3=t5_tok)
    prompts = ["a red circle", "a blue square"]
    expected = pipe(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(7), output_type="latent", max_sequence_length=T5_LENGTH,
                    return_dict=False)[0]

    unet = MMDiT(**CFG).eval()
    unet.load_state_dict(mmdit_from_diffusers(transformer.state_dict(), unet.config))
    te = SD3TextEncoder.from_pretrained(folder, use_t5=False, joint_dim=96, t5_length=T5_LENGTH)
    if use_t5:
        te = SD3TextEncoder(te.model, te.tokenizer, te.model_2, te.tokenizer_2, t5, t5_tok, joint_dim=96,
                            t5_length=T5_LENGTH)
        # the T5 tokens are the encoder's, not zeros
        assert te(["a red circle"])["crossattn"][:, 77:].abs().max() > 0
    bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, FlowMatching(shift=3.0))
    seen = []
    text_to_image(bundle, prompts, sampler="flow_euler", steps=steps, guidance_scale=scale, height=16, width=16,
                  seed=7, callback=lambda i, t, x, x0: seen.append(x))
    assert expected.abs().max() > 0.5  # a real signal
    torch.testing.assert_close(seen[-1], expected, atol=1e-5, rtol=0)


def test_sampling_can_fail_on_a_wrong_shift(tmp_path):
    """The comparison above is sensitive: the same model sampled with shift 1.0 instead of 3.0 lands elsewhere."""
    folder = write_tiny_sd3_clips(TinySD3TextConfig(folder=str(tmp_path / "clips")))
    torch.manual_seed(0)
    unet = MMDiT(**CFG).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    te = SD3TextEncoder.from_pretrained(folder, use_t5=False, joint_dim=96, t5_length=T5_LENGTH)
    from ldm.pipelines import text_to_image

    finals = []
    for shift in (3.0, 1.0):
        seen = []
        bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, FlowMatching(shift=shift))
        text_to_image(bundle, ["a red circle"], sampler="flow_euler", steps=4, guidance_scale=4.5, height=16,
                      width=16, seed=7, callback=lambda i, t, x, x0: seen.append(x))
        finals.append(seen[-1])
    assert (finals[0] - finals[1]).abs().max() > 1e-2
