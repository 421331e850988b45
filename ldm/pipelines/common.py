"""Steps shared by every pipeline (seed, "Full Architecture Combined"): prompt -> CLIP context, seeded noise,
the sampler loop over the U-Net (all math in ``ldm.diffusion``), VAE decode.

All randomness comes from one CPU ``torch.Generator``, drawn in a fixed order (initial noise first, then the
VAE posterior sample if asked for, then the sampler's own noise), so a seed gives the same images on any device.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ldm.models.bundle import ModelBundle
from ldm.diffusion.guidance import ClassifierGuidance, Conditioning, map_context
from ldm.diffusion.samplers import get_sampler
from ldm.pipelines.sampling_options import SamplingOptions

DEFAULT_RESOLUTION = 512


def as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    return prompts


def make_generator(seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
    """The generator to draw from: the one given, else a CPU generator seeded with ``seed`` (random if None)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("give either seed or generator, not both")
        return generator
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def sampling_options(sampler: str | SamplingOptions, **changes) -> SamplingOptions:
    """The pipelines' sampler settings: ``sampler`` (a name, a SamplingOptions or a config node) with the keyword
    settings that are not None (steps, eta, karras, spacing) replacing its fields; checked before any model runs."""
    return SamplingOptions.of(sampler).replace(**changes)


def size_multiple(bundle: ModelBundle) -> int:
    """Image sides must be multiples of the VAE factor times the U-Net's downsampling."""
    return bundle.downsample_factor * bundle.unet.downsample_factor


def default_size(bundle: ModelBundle) -> int:
    """The model's training resolution when its loader knows it, else 512."""
    return int(bundle.meta.get("resolution") or DEFAULT_RESOLUTION)


def check_size(bundle: ModelBundle, height: int, width: int) -> None:
    m = size_multiple(bundle)
    if height <= 0 or width <= 0 or height % m or width % m:
        raise ValueError(
            f"height and width must be positive multiples of {m} for this model (VAE factor "
            f"{bundle.downsample_factor} x U-Net downsampling {m // bundle.downsample_factor}); got {height}x{width}"
        )


def unet_kind(bundle: ModelBundle) -> str:
    """"plain" (in_channels = latent channels) or "inpaint" (SD inpainting: latent + mask + masked-image latent)."""
    c, in_ch = bundle.latent_channels, int(bundle.unet.config["in_channels"])
    if in_ch == c:
        return "plain"
    if in_ch == 2 * c + 1:
        return "inpaint"
    raise ValueError(f"U-Net takes {in_ch} input channels; expected {c} (latents) or {2 * c + 1} (inpainting)")


def require_plain_unet(bundle: ModelBundle, pipeline: str) -> None:
    if unet_kind(bundle) != "plain":
        raise ValueError(f"{pipeline} needs a plain U-Net; this one takes {bundle.unet.config['in_channels']} input "
                         "channels (an inpainting model): use inpaint()")


@contextmanager
def eval_mode(bundle: ModelBundle) -> Iterator[None]:
    """Run in eval mode (no dropout) and give each module its train/eval mode back afterwards."""
    modules = [m for m in (bundle.unet, bundle.autoencoder, bundle.text_encoder) if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def model_dtype(bundle: ModelBundle) -> torch.dtype:
    return _dtype_of(bundle.unet, torch.float32)


def _dtype_of(module, default: torch.dtype) -> torch.dtype:
    """The dtype a network computes in: that of its first parameter stored in one (a base stored quantized,
    model.quantize_base, holds int8 / uint8 / float8 weights that are dequantized in forward); ``default`` when none
    is (IdentityAutoencoder has no parameters)."""
    return next((p.dtype for p in module.parameters() if p.dtype in COMPUTE_DTYPES), default)


@torch.no_grad()
def encode_prompts(bundle: ModelBundle, prompts: list[str], negative_prompt: str | Sequence[str] | None,
                   num_images_per_prompt: int, guidance_scale: float,
                   size: tuple[int, int] | None = None) -> Conditioning:
    """Step 1 (CLIP text encoder): prompts -> context (B, L, D), B = len(prompts) * num_images_per_prompt.

    The unconditional branch of CFG is the empty prompt's context, or the negative prompt's when one is given
    (one string for all prompts, or one per prompt). With guidance_scale 1 it is not needed. Long prompts
    (``max_chunks`` > 1): prompt and negative prompt are padded to the same number of 77-token chunks with
    empty-prompt chunks (A1111's CFG padding), as the two branches run in one batch.
    SDXL (a dual encoder giving {"crossattn", "pooled"}): both branches become the U-Net's {"crossattn", "vector"}
    with the micro-conditioning of an uncropped ``size`` = (height, width) image (diffusers' defaults); the
    unconditional text is zeros (SDXL's force_zeros_for_empty_prompt) unless a negative prompt is given.
    """
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    te = bundle.text_encoder
    if te is None:  # an unconditional model
        return Conditioning(None, None)
    dtype = model_dtype(bundle)

    def prepared(c, repeat):  # (n, ...) -> (n * repeat, ...) on the U-Net's device and dtype
        c = map_context(lambda v: v.to(bundle.device, dtype).repeat_interleave(repeat, 0), c)
        return with_size_conditioning(c, size)

    context = prepared(te(prompts), num_images_per_prompt)  # (B, L, D)
    if guidance_scale == 1.0:
        return Conditioning(context, None)
    length = (context["crossattn"] if isinstance(context, dict) else context).shape[1]
    if negative_prompt is None:  # (1, L, D), broadcast over the batch; as many chunks as the prompts
        uncond = prepared(te.empty_context(1, chunks=max(1, length // te.max_length)), 1)
    elif isinstance(negative_prompt, str):
        uncond = prepared(te([negative_prompt]), 1)
    else:
        negative_prompt = list(negative_prompt)
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        uncond = prepared(te(negative_prompt), num_images_per_prompt)
    uncond_length = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[1]
    if uncond_length != length:
        length = max(uncond_length, length)
        context, uncond = te.pad_context(context, length), te.pad_context(uncond, length)
    return Conditioning(context, uncond)


def with_size_conditioning(context, size: tuple[int, int] | None):
    """A dual encoder's {"crossattn", "pooled"} -> the SDXL U-Net's {"crossattn", "vector"}; others unchanged."""
    if not (isinstance(context, dict) and "pooled" in context):
        return context
    if size is None:
        raise ValueError("an SDXL text encoder needs the image size for its micro-conditioning (size=(h, w))")
    from ldm.models.sdxl_conditioning import default_size_values, unet_conditioning

    batch = context["pooled"].shape[0]
    return unet_conditioning(context, default_size_values(batch, *size).to(context["pooled"].device))


def initial_noise(bundle: ModelBundle, batch: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """Step 2: unit Gaussian latents (B, latent_channels, H/f, W/f), drawn on the CPU generator, then moved."""
    f = bundle.downsample_factor
    shape = (batch, bundle.latent_channels, height // f, width // f)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(bundle.device, model_dtype(bundle))


def run_sampler(bundle: ModelBundle, x: Tensor, timesteps: Tensor, cond: Conditioning, *, options: SamplingOptions,
                guidance_scale: float, generator: torch.Generator,
                classifier_guidance: ClassifierGuidance | None, callback: Callable | None,
                step_hook: Callable | None = None, model: Callable | None = None) -> Tensor:
    """Step 3 (U-Net + sampler): denoise x from timesteps[0] over every given timestep; returns the latent x0."""
    opts = options.sampler_kwargs()
    if step_hook is not None:
        opts["step_hook"] = step_hook
    return get_sampler(options.name)(
        model if model is not None else bundle.unet, x, bundle.schedule, timesteps, cond=cond,
        guidance_scale=guidance_scale, generator=generator, callback=callback, classifier=classifier_guidance,
        **opts,
    )


@torch.no_grad()
def encode_image(bundle: ModelBundle, image: Tensor, sample_posterior: bool, generator: torch.Generator) -> Tensor:
    """VAE encoder: image (B, 3, H, W) in [-1, 1] -> scaled latents; the posterior mode, or a seeded sample."""
    vae = bundle.autoencoder
    dtype = _dtype_of(vae, model_dtype(bundle))
    z = vae.encode_latents(image.to(bundle.device, dtype), sample=sample_posterior, generator=generator)
    return z.to(model_dtype(bundle))


@torch.no_grad()
def decode(bundle: ModelBundle, z: Tensor) -> Tensor:
    """Step 5 (VAE decoder): latents -> images (B, 3, H, W), clamped to [-1, 1], float32."""
    vae = bundle.autoencoder
    return vae.decode_latents(z.to(_dtype_of(vae, z.dtype))).float().clamp(-1, 1)
