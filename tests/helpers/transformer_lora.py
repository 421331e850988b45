"""What the LoRA tests of the transformers in diffusers' layout share (SD3's MMDiT: tests/formats/test_sd3_lora.py,
FLUX.1's Flux: tests/formats/test_flux_lora_peft.py): the comparison of (denoiser output, text context) pairs, and
flow-Euler sampling with a LoRA against the pipeline's latents."""

import torch

from ldm.formats.lora_files import apply_lora_files
from tests.helpers.lora import roots


def assert_same(a, b, atol=1e-5):
    """(denoiser output, {"crossattn", "vector"}) pairs equal within atol (rtol 1e-5)."""
    (out_a, text_a), (out_b, text_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-5)
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(text_a[key], text_b[key], atol=atol, rtol=1e-5)


def flow_latents(bundle, prompts, guidance_scale, steps=3, seed=7, size=16):
    """Our flow_euler sampler's final latents (what a diffusers pipeline's output_type="latent" gives)."""
    from ldm.pipelines import text_to_image

    seen = []
    text_to_image(bundle, prompts, sampler="flow_euler", steps=steps, guidance_scale=guidance_scale, height=size,
                  width=size, seed=seed, callback=lambda i, t, x, x0: seen.append(x))
    return seen[-1]


def assert_samples_with_lora(bundle, net, lora, expected, prompts, guidance_scale):
    """Sampling with ``net`` attached gives ``expected`` (the pipeline's latents with the LoRA file ``lora``) within
    1e-5 and differs from the base's; merged as sample.py merges the file, within 1e-4."""
    base = flow_latents(bundle, prompts, guidance_scale)
    net.attach(roots(bundle))
    try:
        got = flow_latents(bundle, prompts, guidance_scale)
    finally:
        net.detach()
    assert (got - base).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    apply_lora_files(roots(bundle), [str(lora)], report=lambda m: None)  # sample.py's way: merged
    torch.testing.assert_close(flow_latents(bundle, prompts, guidance_scale), expected, atol=1e-4, rtol=0)
