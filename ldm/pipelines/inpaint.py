"""Inpainting (seed, "Full Architecture Combined": Inpainting): repaint the white part of a mask.

Plain (4-channel) U-Nets: after every sampler step the latent outside the mask is replaced by the original
latent forward-noised to the same noise level (seed step 6, "combines the masked image with the original latent
at each time step"). SD inpainting U-Nets (9 input channels) instead see cat[x_t, mask, masked-image latent]
(seed step 6 d-e). Both end with the pixel composite of step 9, so pixels outside the mask are the input's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.models.bundle import ModelBundle
from ldm.diffusion.guidance import ClassifierGuidance
from ldm.diffusion.process import q_sample
from ldm.diffusion.samplers import strength_timesteps
from ldm.pipelines.common import (
    as_prompt_list,
    check_size,
    decode,
    encode_image,
    encode_prompts,
    eval_mode,
    initial_noise,
    make_generator,
    run_sampler,
    sampling_options,
    unet_kind,
)
from ldm.pipelines.controlnet import Control, controlled
from ldm.pipelines.images import check_same_size, composite_weight, expand_batch, image_batch, latent_mask, mask_batch
from ldm.pipelines.sampling_options import SamplingOptions


class KeepKnownRegion:
    """Sampler step hook: outside the latent mask, the sample becomes the original latent at the same noise level."""

    def __init__(self, z0: Tensor, noise: Tensor, mask: Tensor):
        self.z0, self.noise, self.mask = z0, noise, mask  # (B, C, h, w), (B, C, h, w), (B, 1, h, w)

    def __call__(self, i: int, x: Tensor, a: float, s: float) -> Tensor:
        known = a * self.z0 + s * self.noise  # forward process, DDPM eq. (4), at the sampler's next level
        return torch.where(self.mask > 0, x, known.to(x.dtype))  # after the last step (a=1, s=0): exactly z0


class InpaintingUNet:
    """An SD inpainting U-Net seen as a plain model: input = cat[x_t, mask (1ch), masked-image latent]."""

    def __init__(self, unet, mask: Tensor, masked_latent: Tensor):
        self.unet = unet
        self.extra = torch.cat([mask.to(masked_latent.dtype), masked_latent], dim=1)  # (B, 1 + C, h, w)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor | None, **unet_kwargs) -> Tensor:
        extra = self.extra.repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)  # CFG doubles the batch
        return self.unet(torch.cat([x, extra.to(x.dtype)], dim=1), t, context, **unet_kwargs)  # control=...


def inpaint(
    bundle: ModelBundle,
    image,
    mask,
    prompts: str | Sequence[str],
    *,
    strength: float = 1.0,
    feather: int = 0,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    sampler: str | SamplingOptions = "ddim",
    steps: int | None = None,
    guidance_scale: float = 7.5,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    karras: bool | None = None,
    spacing: str | None = None,
    sample_posterior: bool = False,
    classifier_guidance: ClassifierGuidance | None = None,
    callback: Callable | None = None,
    control: Sequence[Control] | None = None,
) -> Tensor:
    """Image + mask (white = repaint) + prompts -> images (B, 3, H, W) in [-1, 1].

    ``mask``: PIL mask(s) or a tensor in [0, 1] of the image's size (thresholded at 0.5). ``strength`` < 1 starts
    the masked region from the noised original instead of pure noise. ``feather`` softens the composite edge
    over about that many pixels inside the mask; outside the mask the output always equals the input.
    ``sampler`` and its keyword settings as in :func:`~ldm.pipelines.text_to_image.text_to_image`; ``control``:
    ControlNets seeing the latents (an inpainting U-Net's extra channels are not theirs: diffusers'
    StableDiffusionControlNetInpaintPipeline).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    prompts = as_prompt_list(prompts)
    image, mask = image_batch(image), mask_batch(mask)
    check_same_size(image, mask)
    height, width = image.shape[-2:]
    check_size(bundle, height, width)
    kind = unet_kind(bundle)
    options = sampling_options(sampler, steps=steps, eta=eta, karras=karras, spacing=spacing)
    batch = len(prompts) * num_images_per_prompt
    image, mask = expand_batch(image, batch, "image"), expand_batch(mask, batch, "mask")
    timesteps = options.timesteps(bundle.schedule)
    if strength < 1.0:
        timesteps = strength_timesteps(timesteps, strength).round()  # integer: the start is made by q_sample
    g = make_generator(seed, generator)
    with eval_mode(bundle):
        noise = initial_noise(bundle, batch, height, width, g)  # drawn first, as in text_to_image
        device = noise.device
        m = mask.to(device)
        z0 = encode_image(bundle, image, sample_posterior, g)  # step 2: VAE encode the original
        if len(timesteps) == 0:
            generated = decode(bundle, z0)
        else:
            cond = encode_prompts(bundle, prompts, negative_prompt, num_images_per_prompt, guidance_scale,
                                  size=(height, width))
            if strength == 1.0:
                x = noise  # step 5: pure noise
            else:
                x = q_sample(bundle.schedule, z0, timesteps[:1].long().expand(batch), noise)
            model, hook = bundle.unet, None
            if kind == "inpaint":  # the U-Net sees the mask and the masked image
                masked = encode_image(bundle, image * (mask < 0.5), sample_posterior, g)  # step 4: cut out
                small = F.interpolate(m, size=z0.shape[-2:], mode="nearest")  # mask on the latent grid
                model = InpaintingUNet(bundle.unet, small, masked)
            else:  # the sampler keeps the known region on the forward process
                hook = KeepKnownRegion(z0, noise, latent_mask(m, bundle.downsample_factor).to(z0.dtype))
            model = controlled(model, control, timesteps, height=height, width=width, batch=batch,
                               latent_factor=bundle.downsample_factor)
            z = run_sampler(bundle, x, timesteps, cond, options=options, guidance_scale=guidance_scale,
                            generator=g, classifier_guidance=classifier_guidance, callback=callback,
                            step_hook=hook, model=model)
            generated = decode(bundle, z)  # step 8
    # step 9: composite; where the weight is 0 the pixel is the input's, bit for bit
    original = image.to(generated)
    w = composite_weight(m, feather).to(generated)
    return torch.where(w > 0, w * generated + (1 - w) * original, original)
