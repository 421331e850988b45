"""sample.py on a tiny SDXL diffusers folder makes the latents (and images) of diffusers'
StableDiffusionXLPipeline for the same seed and settings: DDIMScheduler with SD's config, classifier-free
guidance with SDXL's zero unconditional text (force_zeros_for_empty_prompt) or a negative prompt, micro-conditioning
(original = target = (height, width), crop (0, 0)) in both branches, and the VAE at scale 0.13025."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ldm.formats.diffusers_keys import unet_diffusers_config
from ldm.models.tiny_clip import write_tiny_sdxl_clips
from ldm.pipelines.cli import register_configs, sample
from ldm.pipelines.sampling_options import SamplingOptions

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
PROMPT, SEED, STEPS, GUIDANCE, N, SIZE = "a red circle", 3, 6, 5.0, 2, 16
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
            attention_levels=[1, 2], transformer_depth=[0, 1, 2], num_heads=-1, num_head_channels=16,
            use_linear_projection=True, context_dim=32 + 48, adm_in_channels=16 + 6 * 256)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random SDXL pipeline written by diffusers' own save_pretrained."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = tmp_path_factory.mktemp("sdxl")
    clips = write_tiny_sdxl_clips(root / "clips")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in unet_diffusers_config(UNET, SIZE // 2).items()
                                            if not k.startswith("_")})
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                                  norm_num_groups=32, sample_size=SIZE, scaling_factor=0.13025, force_upcast=True)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=CLIPTextModel.from_pretrained(clips / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(clips / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(clips / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(clips / "tokenizer_2"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_run(pipe, output_type, negative_prompt=None):
    return pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                height=SIZE, width=SIZE, num_images_per_prompt=N, generator=torch.Generator().manual_seed(SEED),
                output_type=output_type).images


@pytest.mark.parametrize("negative", [None, "blue"], ids=["zero-uncond", "negative-prompt"])
def test_pipeline_latents_equal_stable_diffusion_xl_pipeline(folder, pipe, negative):
    from ldm.formats.load import load_bundle
    from ldm.models.text_encoder_sdxl import DualCLIPTextEncoder
    from ldm.pipelines import text_to_image

    bundle = load_bundle(folder, device="cpu", dtype="float32")
    assert isinstance(bundle.text_encoder, DualCLIPTextEncoder)
    assert bundle.unet.config["adm_in_channels"] == 1552 and bundle.autoencoder.scaling_factor == 0.13025
    ref = diffusers_run(pipe, "latent", negative)
    assert ref.std() > 0.1

    def ours(options, size=(SIZE, SIZE)):
        seen = []
        text_to_image(bundle, PROMPT, negative_prompt=negative, num_images_per_prompt=N, sampler=options,
                      guidance_scale=GUIDANCE, height=size[0], width=size[1], seed=SEED,
                      callback=lambda i, t, x, x0: seen.append(x))
        return seen[-1]

    # A random U-Net does not predict the noise, so DDIM's x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) grows to
    # |x| ~ 20 here: the tolerance is float32 rounding relative to that size (measured 1.3e-6 of max |x|).
    sd = SamplingOptions(name="ddim", steps=STEPS, steps_offset=1, final_alpha_one=False)
    scale = ref.abs().max()
    assert (ours(sd) - ref).abs().max() <= 5e-6 * scale
    # what SDXL's settings change moves the latents by far more: an empty-prompt (not zero) unconditional text,
    # another size in the micro-conditioning
    if negative is None:
        bundle.text_encoder.zero_uncond = False
        bundle.text_encoder._clear_cache()
        assert (ours(sd) - ref).abs().max() > 1e-3 * scale
        bundle.text_encoder.zero_uncond = True
        bundle.text_encoder._clear_cache()


def test_micro_conditioning_reaches_the_latents(folder):
    """The same noise with another micro-conditioning gives other latents: the vector path is live."""
    from ldm.formats.load import load_bundle
    from ldm.pipelines.common import encode_prompts

    bundle = load_bundle(folder, device="cpu", dtype="float32")
    a = encode_prompts(bundle, [PROMPT], None, 1, GUIDANCE, size=(SIZE, SIZE))
    b = encode_prompts(bundle, [PROMPT], None, 1, GUIDANCE, size=(2 * SIZE, SIZE))
    assert a.context["vector"].shape == (1, 1552) and not a.uncond_context["vector"][:, :16].any()
    torch.testing.assert_close(a.context["crossattn"], b.context["crossattn"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (bundle.unet(x, 500, a.context) - bundle.unet(x, 500, b.context)).abs().max() > 1e-4


def test_sample_py_equals_stable_diffusion_xl_pipeline_images(folder, pipe, tmp_path):
    ref = np.stack([np.asarray(im) for im in diffusers_run(pipe, "pil")]).astype(np.int16)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[
            f"ckpt={folder}", f"out_dir={tmp_path}", f"prompt='{PROMPT}'", f"seed={SEED}", f"n_images={N}",
            f"batch_size={N}", f"guidance_scale={GUIDANCE}", f"height={SIZE}", f"width={SIZE}", "grid=false",
            "sampler=ddim_diffusers", f"sampler.steps={STEPS}", "dtype=float32"])
    paths = sample(cfg)
    mine = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.int16)
    assert mine.shape == ref.shape == (N, SIZE, SIZE, 3)
    assert ref.std() > 5
    assert np.abs(mine - ref).max() <= 1  # within 1/255 per pixel


def test_the_sdxl_vae_stays_float32(folder):
    from ldm.formats.load import load_bundle

    bundle = load_bundle(folder, device="cpu", dtype="bfloat16")
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16
    assert next(bundle.autoencoder.parameters()).dtype == torch.float32  # force_upcast: SDXL's VAE overflows in fp16
    from ldm.pipelines import text_to_image

    images = text_to_image(bundle, PROMPT, steps=2, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, seed=SEED)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()  # bf16 U-Net, float32 decode
