"""A tiny FLUX.1 text folder: tokenizer/ + text_encoder/ (tiny CLIP) and tokenizer_2/ + text_encoder_2/ (a 24-d T5
with word-level tokens), as FluxPipeline's text parts are laid out."""

import torch

from ldm.models.tiny_clip import write_tiny_clip

T5_LENGTH = 8
PROMPTS = ["a red circle", "a blue square"]


def tiny_flux_text_folder(folder):
    """tokenizer/ + text_encoder/ (tiny CLIP) and tokenizer_2/ + text_encoder_2/ (a 24-d T5, word-level tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    write_tiny_clip(folder)
    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(3)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(folder / "text_encoder_2")
    return folder


# a tiny FLUX.1-dev-like transformer (guidance embedding) on the 16-channel VAE: 24-d joint context = the tiny T5,
# 32-d pooled vector = the tiny CLIP's width
FLUX_TINY_FOLDER = dict(in_channels=16, out_channels=16, patch_size=2, num_layers=1, num_single_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# the Hydra overrides that make model=flux_dev's networks this folder's (its Flux, VAE and text encoders' sizes)
FLUX_TINY_MODEL = ["model.unet._target_=ldm.models.flux.Flux", "~model.unet.name",
                   *[f"+model.unet.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in FLUX_TINY_FOLDER.items()],
                   "model.unet.gradient_checkpointing=false", "+model.autoencoder.base_channels=8",
                   "+model.autoencoder.channel_mult=[1,2]", "+model.autoencoder.num_res_blocks=1",
                   "+model.autoencoder.norm_groups=8", "+model.text_encoder.joint_dim=24",
                   f"model.text_encoder.t5_length={T5_LENGTH}"]


def tiny_flux_pipeline(tmp, shift: dict | None = None):
    """diffusers' FluxPipeline of tiny random networks: FluxTransformer2DModel, a 16-channel AutoencoderKL without
    quant convs (FLUX.1's scaling 0.3611 / shift 0.1159), CLIPTextModel + T5EncoderModel (written under tmp/text)
    and FLUX.1-dev's scheduler config (or ``shift``'s fields: FLUX.1-schnell's {"use_dynamic_shifting": False,
    "shift": 1.0})."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from ldm.formats.flux_keys import flux_diffusers_config
    from ldm.models.flux import Flux

    text = tiny_flux_text_folder(tmp / "text")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**flux_diffusers_config(Flux(**FLUX_TINY_FOLDER).config)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**(shift or dict(  # black-forest-labs/FLUX.1-dev's
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        shift=3.0)))
    return FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                        text_encoder=CLIPTextModel.from_pretrained(text / "text_encoder").eval(),
                        tokenizer=CLIPTokenizer.from_pretrained(text / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(text / "text_encoder_2").eval(),
                        tokenizer_2=AutoTokenizer.from_pretrained(text / "tokenizer_2"))


def write_tiny_flux_folder(tmp, shift: dict | None = None):
    """(folder, pipeline): the tiny FluxPipeline saved by diffusers under tmp/flux (as a hub FLUX.1 repo is laid
    out: model_index.json, transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/)."""
    from pathlib import Path

    pipe = tiny_flux_pipeline(Path(tmp), shift)
    folder = Path(tmp) / "flux"
    pipe.save_pretrained(folder)
    return folder, pipe


def pipeline_latents(pipe, prompts, *, steps=3, scale=3.5, seed=7, size=16, **options):
    """FluxPipeline's final latents, unpacked to (B, 16, size / 2, size / 2) as our sampler's last step gives them
    (options: more of the pipeline's arguments, e.g. max_sequence_length)."""
    from diffusers import FluxPipeline

    packed = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
                  generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False,
                  **options)[0]
    return FluxPipeline._unpack_latents(packed, size, size, pipe.vae_scale_factor)


def our_latents(bundle, prompts=PROMPTS, *, steps=3, scale=3.5, seed=7):
    """Our flow_euler sampler's last latents for the same prompts and seed."""
    from ldm.pipelines import text_to_image

    seen = []
    text_to_image(bundle, prompts, sampler="flow_euler", steps=steps, guidance_scale=scale, height=16, width=16,
                  seed=seed, callback=lambda i, t, x, x0: seen.append(x))
    return seen[-1]


def flux_run(folder, images, *extra, model="flux_dev", tiny=True):
    """train.py overrides: model=flux_dev (made this tiny folder's sizes unless not tiny) filled from ``folder``,
    FLUX.1-dev's flow schedule, trained on the image folder ``images`` on the CPU."""
    from tests.helpers.training import FOLDER_RUN

    return [f"model={model}", "schedule=flow_flux", "sampler=flow_euler", "module.timesteps.kind=logit_normal",
            f"model.pretrained={folder}", "data=folder", f"data.train.root={images}",
            *(FLUX_TINY_MODEL if tiny else []), *FOLDER_RUN, *extra]
