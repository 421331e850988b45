"""MMDiT (SD3 / SD3.5) against diffusers' SD3Transformer2DModel: outputs within 1e-5 with the weights mapped both
ways (ldm.formats.sd3_diffusers_keys), the positional embedding and adaLN-Zero initialisation, and the presets'
parameter counts equal to diffusers' published configs (counted on the meta device)."""

import pytest
import torch

from ldm.formats.safe_load import CheckpointError
from ldm.formats.sd3_diffusers_keys import (mmdit_config_from_diffusers, mmdit_diffusers_config, mmdit_from_diffusers,
                                            mmdit_to_diffusers)
from ldm.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig, parameter_count

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, pooled_projection_dim=10, out_channels=4, pos_embed_max_size=12)
SD35_LIKE = {**TINY, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"}


def _random_reference(cfg: dict, seed: int = 0) -> SD3Transformer2DModel:
    """diffusers' model with every parameter random (its zero-initialised adaLN and output would hide errors)."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**mmdit_diffusers_config(MMDiT(**cfg).config)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    return ref


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    # a non-square latent whose patch grid (4 x 3) is cropped from the 12 x 12 positional table
    return (torch.randn(2, 4, 8, 6, generator=g), torch.tensor([250.0, 875.5]), torch.randn(2, 5, 12, generator=g),
            torch.randn(2, 10, generator=g))


@pytest.mark.parametrize("cfg", [TINY, SD35_LIKE], ids=["sd3", "sd35_dual_qknorm"])
def test_mmdit_matches_diffusers_with_weights_mapped_both_ways(cfg):
    ref = _random_reference(cfg)
    ours = MMDiT(**cfg).eval()
    ours.load_state_dict(mmdit_from_diffusers(ref.state_dict(), ours.config))
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        expected = ref(x, ctx, y, t, return_dict=False)[0]
        got = ours(x, t, {"crossattn": ctx, "vector": y})
    assert expected.abs().max() > 1  # a real signal
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and back: our weights (perturbed) written in diffusers' layout load into a fresh diffusers model unchanged
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = SD3Transformer2DModel(**mmdit_diffusers_config(ours.config)).eval()
    fresh.load_state_dict(mmdit_to_diffusers(ours.state_dict(), ours.config), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, {"crossattn": ctx, "vector": y}),
                                   fresh(x, ctx, y, t, return_dict=False)[0], atol=1e-5, rtol=0)
    round_trip = mmdit_from_diffusers(mmdit_to_diffusers(ours.state_dict(), ours.config), ours.config)
    assert all(torch.equal(round_trip[k], v) for k, v in ours.state_dict().items())


def test_the_last_block_is_context_pre_only_and_dual_attention_only_where_asked():
    m = MMDiT(**SD35_LIKE)
    last = m.joint_blocks[-1].context_block
    assert not hasattr(last.attn, "proj") and not hasattr(last, "mlp")
    assert last.adaLN_modulation[1].out_features == 2 * 16
    assert [hasattr(b.x_block, "attn2") for b in m.joint_blocks] == [True, True, False]
    assert m.joint_blocks[0].x_block.adaLN_modulation[1].out_features == 9 * 16
    assert hasattr(m.joint_blocks[0].x_block.attn, "ln_q") and not hasattr(MMDiT(**TINY).joint_blocks[0].x_block.attn,
                                                                            "ln_q")


def test_fresh_model_is_adaln_zero_and_its_positions_are_diffusers():
    ours, ref = MMDiT(**SD35_LIKE), SD3Transformer2DModel(**mmdit_diffusers_config(MMDiT(**SD35_LIKE).config))
    torch.testing.assert_close(ours.pos_embed, ref.pos_embed.pos_embed, atol=1e-6, rtol=0)
    x, t, ctx, y = _inputs()
    assert torch.equal(ours(x, t, {"crossattn": ctx, "vector": y}), torch.zeros_like(x))  # adaLN-Zero: output 0


def test_bad_inputs_name_what_to_fix():
    m = MMDiT(**TINY)
    x, t, ctx, y = _inputs()
    with pytest.raises(ValueError, match="crossattn"):
        m(x, t, ctx)
    with pytest.raises(ValueError, match="patch_size"):
        m(x[..., :5], t, {"crossattn": ctx, "vector": y})
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        m(torch.randn(1, 4, 26, 2), t[:1], {"crossattn": ctx[:1], "vector": y[:1]})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig(**{**TINY, "dual_attention_layers": (3,)})
    with pytest.raises(CheckpointError, match="caption_projection_dim"):
        mmdit_config_from_diffusers({**mmdit_diffusers_config(MMDiT(**TINY).config), "caption_projection_dim": 7})
    with pytest.raises(CheckpointError, match="missing"):
        sd = _random_reference(TINY).state_dict()
        del sd["proj_out.bias"]
        mmdit_from_diffusers(sd, MMDiT(**TINY).config)


def test_config_round_trips_through_diffusers_config():
    cfg = MMDiT(**SD35_LIKE).config
    assert MMDiT(**mmdit_config_from_diffusers(mmdit_diffusers_config(cfg))).config == cfg


# diffusers' published transformer/config.json values (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large)
PUBLISHED = {
    "sd3_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd35_medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                        dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=[],
                       qk_norm="rms_norm"),
}
# SD3Transformer2DModel(**PUBLISHED[name]) built on the meta device: sum of its parameters' numel (diffusers 0.42)
EXPECTED_PARAMETERS = {"sd3_medium": 2_028_328_000, "sd35_medium": 2_243_171_520, "sd35_large": 8_056_627_520}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_diffusers_parameter_counts(name):
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**PUBLISHED[name])
    assert sum(p.numel() for p in ref.parameters()) == EXPECTED_PARAMETERS[name]
    assert parameter_count(MMDIT_PRESETS[name]) == EXPECTED_PARAMETERS[name]
    # the preset writes exactly the published config (unset keys: diffusers' defaults)
    published = {"dual_attention_layers": [], "qk_norm": None, **PUBLISHED[name]}
    assert mmdit_diffusers_config(_meta_config(name)) == published


def _meta_config(name: str) -> dict:
    with torch.device("meta"):
        return MMDiT(**MMDIT_PRESETS[name]).config


@pytest.mark.parametrize("cfg", [TINY, SD35_LIKE], ids=["sd3", "sd35_dual_qknorm"])
def test_single_file_layout_is_what_diffusers_single_file_converter_reads(cfg):
    """Our single file (ComfyUI's model.diffusion_model.* keys) through diffusers' own converter
    (convert_sd3_transformer_checkpoint_to_diffusers) loads into SD3Transformer2DModel with equal outputs; the
    config read back from the tensors is ours."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from ldm.formats.sd3_single_file import mmdit_config_from_tensors, mmdit_from_single_file, mmdit_to_single_file

    ours = MMDiT(**cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    single = mmdit_to_single_file(ours.state_dict())
    assert all(k.startswith("model.diffusion_model.") for k in single)
    assert "model.diffusion_model.joint_blocks.2.context_block.attn.qkv.weight" in single
    converted = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in single.items()})
    ref = SD3Transformer2DModel(**mmdit_diffusers_config(ours.config)).eval()
    ref.load_state_dict(converted, strict=True)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, {"crossattn": ctx, "vector": y}), ref(x, ctx, y, t, return_dict=False)[0],
                                   atol=1e-5, rtol=0)
    back = mmdit_from_single_file({**single, "text_encoders.clip_l.x": torch.zeros(1)})
    assert back.keys() == ours.state_dict().keys()
    assert MMDiT(**mmdit_config_from_tensors(back, attention_head_dim=8, sample_size=8)).config == ours.config


def test_transformer_folder_is_read_and_written_as_diffusers_does(tmp_path):
    """Our transformer/ folder loads with SD3Transformer2DModel.from_pretrained unchanged (equal outputs), and a
    folder diffusers saved reads back into our MMDiT; a config out of bounds is refused before anything is built."""
    import json

    from ldm.formats.sd3_diffusers_keys import read_sd3_transformer, write_sd3_transformer

    ours = MMDiT(**SD35_LIKE).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    write_sd3_transformer(ours, tmp_path / "ours")
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "ours").eval()
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        expected = ours(x, t, {"crossattn": ctx, "vector": y})
        torch.testing.assert_close(loaded(x, ctx, y, t, return_dict=False)[0], expected, atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "theirs")
    back = read_sd3_transformer(tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, {"crossattn": ctx, "vector": y}), expected, atol=1e-5, rtol=0)
    cfg = json.loads((tmp_path / "theirs" / "config.json").read_text())
    (tmp_path / "theirs" / "config.json").write_text(json.dumps({**cfg, "num_layers": 10**6}))
    with pytest.raises(CheckpointError, match="num_layers"):
        read_sd3_transformer(tmp_path / "theirs")


@pytest.mark.parametrize("preset,expected", [("attention", 15), ("attention_ff", 25)])
def test_lora_on_the_mmdit_round_trips_through_its_kohya_file(tmp_path, preset, expected):
    """adapter=lora finds the MMDiT's layers (its own lora_targets), and its kohya-layout file (the original MMDiT
    names: lora_unet_joint_blocks_N_..., as sd-scripts' SD3 LoRAs) merged into a copy gives the adapted outputs."""
    import copy

    from ldm.formats.lora_files import apply_lora_files, save_lora_file
    from ldm.models.lora import LoRAConfig, LoRANetwork

    base = MMDiT(**SD35_LIKE).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3)
    merged = copy.deepcopy(base)
    roots = {"unet": base}
    network = LoRANetwork.build(roots, LoRAConfig(preset=preset, rank=2))
    # attention: blocks 0, 1 (dual): x qkv, proj, attn2.qkv, attn2.proj + context qkv, proj; block 2: x qkv, proj +
    # context qkv (pre-only: no proj) = 15; attention_ff: + the x MLPs (3 x 2) and the context MLPs (2 x 2) = 25
    assert len(network.weights()) == expected
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.2)
    network.attach(roots)
    x, t, ctx, y = _inputs()
    with torch.no_grad():
        adapted = base(x, t, {"crossattn": ctx, "vector": y})
    network.detach()
    path = save_lora_file(network, roots, tmp_path / "mmdit_lora.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-3/lora"
    apply_lora_files({"unet": merged}, [str(path)], report=lambda m: None)
    with torch.no_grad():
        got = merged(x, t, {"crossattn": ctx, "vector": y})
        assert (got - base(x, t, {"crossattn": ctx, "vector": y})).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-5)
