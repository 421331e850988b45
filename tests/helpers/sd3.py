"""A tiny SD3 diffusers folder laid out like the real one (transformer/, vae/ without quant convs, two projected
CLIPs, an optional T5, FlowMatchEulerDiscreteScheduler), built with diffusers' and transformers' own classes and
written by ``StableDiffusion3Pipeline.save_pretrained``."""

from pathlib import Path

import torch

# the tiny MMDiT: SD3.5's options on (dual attention in block 0, QK RMSNorm); 96-d joint context = the tiny T5's
MMDIT_TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=64, out_channels=4,
                  pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
# the Hydra overrides that make model=sd35_medium's networks this folder's (its MMDiT, VAE and text encoders)
SD3_TINY_MODEL = ["model.unet._target_=ldm.models.mmdit.MMDiT", "~model.unet.name",
                  *[f"+model.unet.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in MMDIT_TINY.items()],
                  "model.unet.gradient_checkpointing=false", "model.autoencoder.preset=sd3",
                  "+model.autoencoder.base_channels=8", "+model.autoencoder.channel_mult=[1,2]",
                  "+model.autoencoder.num_res_blocks=1", "+model.autoencoder.norm_groups=8",
                  "+model.autoencoder.latent_channels=4", "+model.text_encoder.joint_dim=96"]


def tiny_t5():
    """A tiny T5 encoder (transformers' T5EncoderModel, 96-d as the joint width) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "blue", "square"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(3)
    return T5EncoderModel(T5Config(vocab_size=len(words), d_model=96, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=2)).eval(), tok


def tiny_sd3_pipeline(tmp: Path, use_t5: bool = True, shift: float = 3.0):
    """diffusers' StableDiffusion3Pipeline of tiny random networks (the CLIPs written under tmp/clips)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.formats.sd3_diffusers_keys import mmdit_diffusers_config
    from ldm.models.mmdit import MMDiT
    from ldm.models.text_encoder_sd3 import TinySD3TextConfig, write_tiny_sd3_clips

    # as SD3's: both CLIPs project to their own width... (CLIP-L 32, CLIP-G 48 -> 32 here; pooled 64)
    clips = write_tiny_sd3_clips(TinySD3TextConfig(folder=str(Path(tmp) / "clips"), projection_dim=32))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**mmdit_diffusers_config(MMDiT(**MMDIT_TINY).config)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5305).eval()
    t5, t5_tok = tiny_t5() if use_t5 else (None, None)
    clip_l = CLIPTextModelWithProjection.from_pretrained(clips / "text_encoder")
    with torch.no_grad():  # ... and CLIP-L's projection is the identity (SD3 pools CLIP-L unprojected: ComfyUI's
        clip_l.text_projection.weight.copy_(torch.eye(32))  # SD3 clip_l, diffusers' from_single_file sets eye)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(clips / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(clips / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(clips / "tokenizer_2"), text_encoder_3=t5, tokenizer_3=t5_tok)


def write_tiny_sd3_folder(tmp: Path, use_t5: bool = True) -> tuple[Path, object]:
    """(folder, pipeline): the tiny pipeline saved by diffusers under tmp/sd3 (as a hub SD3 repo is laid out)."""
    pipe = tiny_sd3_pipeline(tmp, use_t5)
    folder = Path(tmp) / "sd3"
    pipe.save_pretrained(folder)
    return folder, pipe


def pipeline_latents(pipe, prompts, *, steps=3, scale=4.5, seed=7, size=16):
    """The pipeline's final latents (before the VAE), as our sampler's last step gives them."""
    return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
                generator=torch.Generator().manual_seed(seed), output_type="latent",
                return_dict=False)[0]
