"""A tiny SD3 model twice: diffusers' StableDiffusion3Pipeline (tiny SD3Transformer2DModel, two tiny projected CLIPs,
optionally a tiny T5) and our ModelBundle with the same weights (MMDiT mapped by ldm.formats.sd3_diffusers_keys,
SD3TextEncoder on the same CLIP folder)."""

from __future__ import annotations

import torch

T5_LENGTH = 8
CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
           joint_attention_dim=96, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
           dual_attention_layers=(0,), qk_norm="rms_norm")


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


def tiny_sd3(folder, use_t5: bool = False, shift: float = 3.0, seed: int = 0):
    """-> (diffusers pipeline, our bundle): the same random transformer and CLIPs (and T5) in both."""
    from diffusers import (AutoencoderKL as DiffusersVAE, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.diffusion.flow import FlowMatching
    from ldm.formats.sd3_diffusers_keys import mmdit_diffusers_config, mmdit_from_diffusers
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.bundle import ModelBundle
    from ldm.models.mmdit import MMDiT
    from ldm.models.text_encoder_sd3 import SD3TextEncoder, TinySD3TextConfig, write_tiny_sd3_clips

    clips = write_tiny_sd3_clips(TinySD3TextConfig(folder=str(folder)))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**mmdit_diffusers_config(MMDiT(**CFG).config)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.1)
    vae = DiffusersVAE(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    t5, t5_tok = tiny_t5() if use_t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(clips / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(clips / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(clips / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(clips / "tokenizer_2"), text_encoder_3=t5, tokenizer_3=t5_tok)

    unet = MMDiT(**CFG).eval()
    unet.load_state_dict(mmdit_from_diffusers(transformer.state_dict(), unet.config))
    te = SD3TextEncoder.from_pretrained(clips, use_t5=False, joint_dim=96, t5_length=T5_LENGTH)
    if use_t5:
        te = SD3TextEncoder(te.model, te.tokenizer, te.model_2, te.tokenizer_2, t5, t5_tok, joint_dim=96,
                            t5_length=T5_LENGTH)
    bundle = ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, FlowMatching(shift=shift))
    return pipe, bundle
