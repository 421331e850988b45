"""Flow Euler sampling of a tiny FLUX.1-dev-like model (tiny Flux with a guidance embedding, a tiny CLIP for the
pooled vector and a tiny T5 for the tokens) through our text_to_image against diffusers' FluxPipeline on the same
weights: the final latents within 1e-5 (FluxPipeline's sigmas 1, 1 - 1/n, ..., 1/n with the resolution-dependent
shift: schedule=flow_flux; the guidance scale as the model's guidance input, no CFG)."""

import pytest
import torch

from ldm.diffusion.flow import FlowMatching
from ldm.formats.flux_keys import flux_diffusers_config, flux_from_diffusers
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.bundle import ModelBundle
from ldm.models.flux import Flux
from ldm.models.text_encoder_flux import FluxTextEncoder
from tests.helpers.flux import T5_LENGTH, tiny_flux_text_folder

diffusers = pytest.importorskip("diffusers")

CFG = dict(in_channels=4, out_channels=4, patch_size=2, num_layers=1, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))


def _pipeline(folder, transformer):
    from diffusers import AutoencoderKL as DiffusersVAE, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    vae = DiffusersVAE(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    # FLUX.1-dev's scheduler config: dynamic shifting between (256 tokens, 0.5) and (4096, 1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2"),
                        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"))


@pytest.mark.parametrize("scale,steps", [(3.5, 4), (1.0, 3)])
def test_flow_euler_latents_equal_flux_pipeline(tmp_path, scale, steps):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from ldm.pipelines import text_to_image

    folder = tiny_flux_text_folder(tmp_path / "flux")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**flux_diffusers_config(Flux(**CFG).config)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    pipe = _pipeline(folder, transformer)
    prompts = ["a red circle", "a blue square"]
    packed = pipe(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=scale,
                  generator=torch.Generator().manual_seed(7), output_type="latent", max_sequence_length=T5_LENGTH,
                  return_dict=False)[0]
    expected = FluxPipeline._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)  # (2, 4, 8, 8)

    unet = Flux(**CFG).eval()
    unet.load_state_dict(flux_from_diffusers(transformer.state_dict(), unet.config))
    te = FluxTextEncoder.from_pretrained(folder, joint_dim=24, t5_length=T5_LENGTH)
    bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, FlowMatching(dynamic_shift=True, spacing="flux"))
    seen = []
    text_to_image(bundle, prompts, sampler="flow_euler", steps=steps, guidance_scale=scale, height=16, width=16,
                  seed=7, callback=lambda i, t, x, x0: seen.append(x))
    assert len(seen) == steps and expected.abs().max() > 0.5  # a real signal
    torch.testing.assert_close(seen[-1], expected, atol=1e-5, rtol=0)
    # sensitive: SD3's spacing of the same steps lands elsewhere
    other = []
    bundle.schedule = FlowMatching(dynamic_shift=True)
    text_to_image(bundle, prompts, sampler="flow_euler", steps=steps, guidance_scale=scale, height=16, width=16,
                  seed=7, callback=lambda i, t, x, x0: other.append(x))
    assert (other[-1] - expected).abs().max() > 1e-3


def test_flux_spacing_closed_form_and_a_bad_spacing_is_named():
    sigmas = FlowMatching(spacing="flux").inference_sigmas(4)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), atol=1e-7, rtol=0)
    shifted = FlowMatching(spacing="flux", dynamic_shift=True).inference_sigmas(4, image_seq_len=4096)
    a = torch.exp(torch.tensor(1.15, dtype=torch.float64))  # mu = max_shift at max_seq_len
    torch.testing.assert_close(shifted, a * sigmas / (1 + (a - 1) * sigmas), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="schedule.spacing"):
        FlowMatching(spacing="linear")
