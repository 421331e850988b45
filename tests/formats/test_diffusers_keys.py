"""Our (original SD) layout <-> diffusers: key maps and config translation.

diffusers' own ``convert_ldm_*_checkpoint`` (original -> diffusers) is the
reference; our maps must invert it exactly.
"""

import dataclasses

import pytest
import torch

from ldm.formats.diffusers_keys import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ldm.formats.safe_load import CheckpointError
from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderConfig, AutoencoderKL
from ldm.models.unet import UNET_PRESETS, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

SD1_LIKE = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1,
                attention_levels=[0, 1], num_heads=4, num_head_channels=-1, transformer_depth=1,
                context_dim=24, use_linear_projection=False, dropout=0.0)
SD2_LIKE = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                attention_levels=[0, 1], num_heads=-1, num_head_channels=16, transformer_depth=2,
                context_dim=24, use_linear_projection=True, dropout=0.0)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, base_channels=32, channel_mult=[1, 2],
                num_res_blocks=1, dropout=0.0, scaling_factor=0.18215, shift_factor=0.0, norm_groups=32,
                use_quant_conv=True, use_post_quant_conv=True)

# Hub config.json files of the real models (weights are never needed).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    **SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention": False,
    "num_class_embeds": None, "only_cross_attention": False, "upcast_attention": True,
    "use_linear_projection": True, "sample_size": 96,
}
SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

pytestmark = pytest.mark.usefixtures("one_thread")



def _defaults(config_cls):
    """The defaults of a network's config object (the one place they are written)."""
    skip = ("gradient_checkpointing", "adm_in_channels")  # adm_in_channels: recorded only when set (SDXL)
    return {f.name: f.default for f in dataclasses.fields(config_cls) if f.name not in skip}


def _plain(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def test_real_unet_configs_match_presets():
    sd15 = _plain({**_defaults(UNetConfig), **UNET_PRESETS["sd15"]})
    sd21 = _plain({**_defaults(UNetConfig), **UNET_PRESETS["sd21"]})
    assert unet_config_from_diffusers(SD15_UNET) == sd15
    assert unet_config_from_diffusers(SD21_UNET) == sd21
    for ours, hub in [(sd15, SD15_UNET), (sd21, SD21_UNET)]:
        back = unet_diffusers_config(ours, sample_size=hub["sample_size"])
        for key in ["attention_head_dim", "block_out_channels", "cross_attention_dim", "down_block_types",
                    "up_block_types", "layers_per_block", "in_channels", "out_channels", "sample_size"]:
            assert back[key] == hub[key], key
        assert back["use_linear_projection"] == hub.get("use_linear_projection", False)
        assert back["only_cross_attention"] is False


def test_real_vae_config_matches_preset():
    ours = _plain({**_defaults(AutoencoderConfig), **AUTOENCODER_PRESETS["sd"]})
    assert vae_config_from_diffusers(SD_VAE) == ours
    back = vae_diffusers_config(ours, sample_size=512)
    assert {k: back[k] for k in SD_VAE} == SD_VAE


def test_unsupported_diffusers_settings_are_refused():
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers({**SD15_UNET, "addition_embed_type": "image"})
    with pytest.raises(ValueError, match="addition_embed_type='text_time' with addition_time_embed_dim=8"):
        unet_config_from_diffusers({**SD15_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                                    "projection_class_embeddings_input_dim": 80})
    with pytest.raises(ValueError, match="up_block_types"):
        unet_config_from_diffusers({**SD15_UNET, "up_block_types": ["UpBlock2D"] * 4})


@pytest.mark.parametrize("ours", [SD1_LIKE, SD2_LIKE], ids=["sd1", "sd2"])
def test_unet_maps_invert_diffusers_converter(ours):
    dcfg = unet_diffusers_config(ours, sample_size=8)
    assert unet_config_from_diffusers(dcfg) == ours
    reference = randomize(diffusers.UNet2DConditionModel.from_config(dcfg))
    dsd = reference.state_dict()

    ldm = unet_diffusers_to_ldm(dsd, ours)
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, dcfg)
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    ours_back = unet_ldm_to_diffusers(ldm, ours)
    assert ours_back.keys() == dsd.keys() and all(ours_back[k] is dsd[k] for k in dsd)

    model = UNet(**ours).eval()
    model.load_state_dict(ldm, strict=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    with torch.no_grad():
        want = reference(x, t, ctx).sample
        got = model(x, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_vae_maps_invert_diffusers_converter():
    dcfg = vae_diffusers_config(TINY_VAE, sample_size=16)
    assert vae_config_from_diffusers(dcfg) == TINY_VAE
    reference = randomize(diffusers.AutoencoderKL.from_config(dcfg))
    dsd = reference.state_dict()

    ldm = vae_diffusers_to_ldm(dsd, TINY_VAE)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dcfg)
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    ours_back = vae_ldm_to_diffusers(ldm, TINY_VAE)
    assert ours_back.keys() == dsd.keys() and all(torch.equal(ours_back[k], dsd[k]) for k in dsd)

    model = AutoencoderKL(**TINY_VAE).eval()
    model.load_state_dict(ldm, strict=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        want = reference.decode(reference.encode(x).latent_dist.mode()).sample
        got = model.decode(model.encode(x).mode())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_unknown_keys_are_errors():
    with pytest.raises(CheckpointError, match="1 keys do not fit.*input_blocks.99.0.weight"):
        unet_ldm_to_diffusers({"input_blocks.99.0.weight": torch.zeros(1)}, SD1_LIKE)
    with pytest.raises(CheckpointError, match="encoder.down_blocks.5"):
        vae_diffusers_to_ldm({"encoder.down_blocks.5.resnets.0.conv1.weight": torch.zeros(1)}, TINY_VAE)
