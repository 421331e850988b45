"""SDXL U-Net: per-level transformer depth, vector conditioning (label_emb), parity with diffusers'
UNet2DConditionModel (addition_embed_type="text_time") through our key map, and the sdxl preset's size."""

import pytest
import torch

from ldm.formats.diffusers_keys import unet_config_from_diffusers, unet_diffusers_config, unet_ldm_to_diffusers
from ldm.models.sdxl_conditioning import sdxl_vector, size_values
from ldm.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16
# SDXL-shaped: no attention at the first level, per-level depth, 16-channel heads, linear projections
TINY_XL = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
               transformer_depth=(0, 1, 2), num_heads=-1, num_head_channels=16, use_linear_projection=True,
               context_dim=48, adm_in_channels=POOLED + 6 * 256)

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (the settings that size the model)
SDXL_BASE_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_UNET_PARAMETERS = 2_567_463_684


@torch.no_grad()
def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        p.copy_(r / p[0].numel() ** 0.5 if p.ndim >= 2 else (1 + 0.2 * r if name.endswith("norm.weight") else 0.2 * r))
    return model.eval()


def test_sdxl_preset_has_sdxl_base_parameter_count():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet.from_preset("sdxl")
        ref = UNet2DConditionModel(**{k: v for k, v in SDXL_BASE_UNET.items() if not k.startswith("_")})
    count = sum(p.numel() for p in ours.parameters())
    assert count == SDXL_UNET_PARAMETERS
    assert count == sum(p.numel() for p in ref.parameters())
    # the key map covers every tensor, shape for shape
    mapped = unet_ldm_to_diffusers({k: v for k, v in ours.state_dict().items()}, ours.config)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.state_dict()["label_emb.0.0.weight"].shape == (1280, 2816)
    assert "label_emb.0.2.bias" in ours.state_dict()
    assert not any(k.startswith("input_blocks.1.1.") for k in ours.state_dict())  # no attention at level 0


def test_sdxl_config_translates_both_ways():
    ours = unet_config_from_diffusers(SDXL_BASE_UNET)
    with torch.device("meta"):
        preset = UNet.from_preset("sdxl").config
    assert {k: ours[k] for k in ours} == {k: preset[k] for k in ours}
    back = unet_diffusers_config(preset)
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "attention_head_dim", "transformer_layers_per_block", "down_block_types", "cross_attention_dim"):
        assert back[key] == SDXL_BASE_UNET[key], key


def test_our_key_map_equals_diffusers_converter_for_sdxl():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = UNet(**TINY_XL)
    dcfg = unet_diffusers_config(ours.config)
    sd = ours.state_dict()
    ref = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in sd.items()}, dcfg)
    mapped = unet_ldm_to_diffusers(sd, ours.config)
    assert set(mapped) == set(ref)
    assert all(mapped[k] is ref[k] or torch.equal(mapped[k], ref[k]) for k in ref)


def test_tiny_sdxl_unet_equals_diffusers_text_time():
    from diffusers import UNet2DConditionModel

    ours = randomize_(UNet(**TINY_XL))
    dcfg = unet_diffusers_config(ours.config)
    ref = UNet2DConditionModel(**{k: v for k, v in dcfg.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(unet_ldm_to_diffusers(ours.state_dict(), ours.config), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    sizes = size_values(torch.tensor([[1024, 768], [512, 512]]), torch.tensor([[0, 32], [16, 0]]),
                        torch.tensor([[1024, 1024], [512, 640]]))
    t = torch.tensor([3, 871])
    with torch.no_grad():
        out = ours(x, t, ctx, sdxl_vector(pooled, sizes))
        as_dict = ours(x, t, {"crossattn": ctx, "vector": sdxl_vector(pooled, sizes)})
        expected = ref(x, t, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        other_sizes = ours(x, t, ctx, sdxl_vector(pooled, sizes + torch.tensor([0, 0, 8, 0, 0, 0.0])))
    assert out.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_dict, out, atol=0, rtol=0)
    assert (other_sizes - out).abs().max() > 1e-3  # the crop coordinates reach the output


def test_vector_conditioning_errors():
    unet = UNet(**TINY_XL)
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 48)
    with pytest.raises(ValueError, match="adm_in_channels=1552"):
        unet(x, 1, ctx)
    plain = UNet.from_preset("tiny")
    with pytest.raises(ValueError, match="no adm_in_channels"):
        plain(x, 1, torch.zeros(1, 3, 32), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="0 at attention levels"):
        UNet(**{**TINY_XL, "transformer_depth": (1, 0, 2)})
    with pytest.raises(ValueError, match="one depth per level"):
        UNet(**{**TINY_XL, "transformer_depth": (1, 2)})


def test_stored_sdxl_config_is_built_by_safe_build():
    from ldm.formats.safe_build import build_network

    config = UNet(**TINY_XL).config
    rebuilt = build_network("unet", config, source="test", key="unet")
    assert rebuilt.config == config
