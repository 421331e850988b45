"""Flow Euler sampling of a tiny SD3-like model (tiny MMDiT + two tiny projected CLIPs, with and without a tiny T5)
through our
text_to_image against diffusers' StableDiffusion3Pipeline on a tiny local folder: the final latents within 1e-5."""

import pytest
import torch

from ldm.diffusion.flow import FlowMatching
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.bundle import ModelBundle
from ldm.models.mmdit import MMDiT
from ldm.models.text_encoder_sd3 import SD3TextEncoder, TinySD3TextConfig, write_tiny_sd3_clips
from tests.helpers.sd3 import CFG, T5_LENGTH, tiny_sd3

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("scale,steps,use_t5", [(4.5, 4, False), (1.0, 3, False), (4.5, 3, True)])
def test_flow_euler_latents_equal_stable_diffusion3_pipeline(tmp_path, scale, steps, use_t5):
    from ldm.pipelines import text_to_image

    pipe, bundle = tiny_sd3(tmp_path / "clips", use_t5=use_t5)
    prompts = ["a red circle", "a blue square"]
    expected = pipe(prompts, height=16, width=16, num_inference_steps=steps, guidance_scale=scale,
                    generator=torch.Generator().manual_seed(7), output_type="latent", max_sequence_length=T5_LENGTH,
                    return_dict=False)[0]
    if use_t5:  # the T5 tokens are the encoder's, not zeros
        assert bundle.text_encoder(["a red circle"])["crossattn"][:, 77:].abs().max() > 0
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
