"""Text-to-image and image-to-image (seed, "Full Architecture Combined": Text-To-Image, Image-To-Image)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ldm.models.bundle import ModelBundle
from ldm.diffusion.guidance import ClassifierGuidance
from ldm.diffusion.process import q_sample
from ldm.diffusion.samplers import strength_timesteps
from ldm.pipelines.common import (
    as_prompt_list,
    check_size,
    decode,
    default_size,
    encode_image,
    encode_prompts,
    eval_mode,
    initial_noise,
    make_generator,
    require_plain_unet,
    run_sampler,
    sampling_options,
)
from ldm.pipelines.controlnet import Control, controlled
from ldm.pipelines.images import expand_batch, image_batch
from ldm.pipelines.sampling_options import SamplingOptions


def text_to_image(
    bundle: ModelBundle,
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    num_images_per_prompt: int = 1,
    sampler: str | SamplingOptions = "ddim",
    steps: int | None = None,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    karras: bool | None = None,
    spacing: str | None = None,
    classifier_guidance: ClassifierGuidance | None = None,
    callback: Callable | None = None,
    control: Sequence[Control] | None = None,
) -> Tensor:
    """Prompts -> images (B, 3, H, W) in [-1, 1], B = len(prompts) * num_images_per_prompt.

    ``sampler``: a sampler name or a :class:`SamplingOptions` (a ``configs/sampler/`` node: steps, eta, karras,
    spacing, steps_offset, final_alpha_one); ``steps``, ``eta``, ``karras`` and ``spacing``, when given, replace
    its fields (defaults: 50 steps, eta 0, no Karras sigmas, leading). ``eta`` applies to ddim, ``karras`` to
    euler / euler_ancestral / dpmpp_2m. height/width default to the model's training resolution (else 512).
    The initial noise is ``torch.randn`` of the latent shape on a CPU generator seeded with ``seed``, the first
    draw in float32: diffusers' StableDiffusionPipeline with ``generator=torch.Generator().manual_seed(seed)``
    starts from the same latents. ``callback(i, t, x, x0)`` sees each step's latents. ``control``: ControlNets
    with their control images ([0, 1], the output's size) and ranges (``ldm.pipelines.controlnet.Control``):
    diffusers' StableDiffusionControlNetPipeline with the same settings gives the same latents.
    """
    prompts = as_prompt_list(prompts)
    require_plain_unet(bundle, "text_to_image")
    height, width = height or default_size(bundle), width or default_size(bundle)
    check_size(bundle, height, width)
    options = sampling_options(sampler, steps=steps, eta=eta, karras=karras, spacing=spacing)  # fails before
    f = bundle.downsample_factor
    timesteps = options.timesteps(bundle.schedule, (height // f, width // f))  # any model runs
    g = make_generator(seed, generator)
    with eval_mode(bundle):
        cond = encode_prompts(bundle, prompts, negative_prompt, num_images_per_prompt, guidance_scale,
                              size=(height, width))  # step 1
        x = initial_noise(bundle, len(prompts) * num_images_per_prompt, height, width, g)  # step 2: x_T ~ N(0, I)
        model = controlled(bundle.unet, control, timesteps, height=height, width=width, batch=x.shape[0],
                           latent_factor=bundle.downsample_factor)
        z = run_sampler(bundle, x, timesteps, cond, options=options, guidance_scale=guidance_scale,  # step 3
                        generator=g, classifier_guidance=classifier_guidance, callback=callback, model=model)
        return decode(bundle, z)  # step 5


def image_to_image(
    bundle: ModelBundle,
    image,
    prompts: str | Sequence[str],
    *,
    strength: float = 0.75,
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
    """Image (+ prompts) -> images (B, 3, H, W) in [-1, 1] of the image's size.

    ``image``: PIL image(s) or a tensor (1 or B, 3, H, W) in [-1, 1]. Only the last ``strength`` fraction of the
    ``steps`` timesteps run: strength 0 returns the VAE round trip of the image, strength 1 is text-to-image with
    the same seed (the image is not used). The image latent is the posterior mode, or a seeded sample.
    ``sampler`` and its keyword settings as in :func:`text_to_image`.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    prompts = as_prompt_list(prompts)
    image = image_batch(image)
    height, width = image.shape[-2:]
    options = sampling_options(sampler, steps=steps, eta=eta, karras=karras, spacing=spacing)
    common = dict(negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt, sampler=options,
                  guidance_scale=guidance_scale, seed=seed, generator=generator,
                  classifier_guidance=classifier_guidance, callback=callback, control=control)
    if strength == 1.0:  # all the noise: nothing of the image survives, exactly text-to-image
        expand_batch(image, len(prompts) * num_images_per_prompt, "image")
        return text_to_image(bundle, prompts, height=height, width=width, **common)

    require_plain_unet(bundle, "image_to_image")
    check_size(bundle, height, width)
    batch = len(prompts) * num_images_per_prompt
    expand_batch(image, batch, "image")
    # integer timesteps: the start x_t is made by q_sample, and every sampler then agrees on its noise level
    timesteps = strength_timesteps(options.timesteps(bundle.schedule), strength).round()
    g = make_generator(seed, generator)
    with eval_mode(bundle):
        noise = initial_noise(bundle, batch, height, width, g)  # drawn first, as in text_to_image
        z0 = expand_batch(encode_image(bundle, image, sample_posterior, g), batch, "image")  # step 1: VAE encode
        if len(timesteps) == 0:
            return decode(bundle, z0)  # no steps: the VAE round trip
        cond = encode_prompts(bundle, prompts, negative_prompt, num_images_per_prompt, guidance_scale,
                              size=(height, width))  # step 2
        t0 = timesteps[:1].long().expand(batch)
        x = q_sample(bundle.schedule, z0, t0, noise)  # step 3: x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
        model = controlled(bundle.unet, control, timesteps, height=height, width=width, batch=batch,
                           latent_factor=bundle.downsample_factor)  # the range: over the steps that run
        z = run_sampler(bundle, x, timesteps, cond, options=options, guidance_scale=guidance_scale,  # step 4
                        generator=g, classifier_guidance=classifier_guidance, callback=callback, model=model)
        return decode(bundle, z)  # step 6
